"""Delivery to a `folder` target: the job appears as `DEST/<job id>/`, complete or not at all.

The protocol, the same as the spool's publish step but across into the admin's folder:

1. remove leftovers `DEST/.<job id>.tmp-*` of an earlier attempt that crashed half-way;
2. if `DEST/<job id>` already exists, an earlier attempt crashed after its rename but before
   the spool recorded success: the job is delivered, nothing is written again;
3. fill `DEST/.<job id>.tmp-<random>` (hidden, so folder watchers that skip dot-files never
   see it): each file hard-linked when DEST is on the spool's filesystem (no pixel data is
   copied), else copied with `sendfile`; each file and the folder fsync'ed;
4. rename it to `DEST/<job id>` without replacing anything (renameat2 RENAME_NOREPLACE);
5. fsync DEST, so the rename survives a power cut before dispatch records success.

A failure (ENOSPC, EACCES, EROFS, ...) removes the temporary folder and raises `TargetError`
with the reason; `DEST/<job id>` never exists half-written.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from mercli.dispatch.targets.base import Attempt
from mercli.errors import MercliError
from mercli.fsutil import fsync_dir, remove_tree, rename_noreplace
from mercli.jobs import JobInfo, Progress
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX

_LINK_FALLBACK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES})


class TargetError(MercliError):
    """A target could not take the job; the message says what and where."""


def deliver(folder: Path, job: JobInfo, progress: Progress) -> Attempt:
    """Deliver the job's instances and sidecars as `<path>/<job id>/` (all or nothing)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (INSTANCE_SUFFIX, SIDECAR_SUFFIX))
    try:
        deliver_to_folder(files, Path(str(job.target.path)), job.name)
    except TargetError as exc:
        return Attempt(error=str(exc))
    return Attempt(delivered=sum(p.suffix == INSTANCE_SUFFIX for p in files))


def deliver_to_folder(files: Sequence[Path], dest: Path, job_id: str, *, link: bool = True) -> Path:
    """Publish `files` as `dest/job_id/` atomically; returns that folder.

    `link=False` forces copies even on one filesystem (for targets whose consumers modify
    files in place, which would otherwise change the spool's copy too).
    """
    _check_job_id(job_id)
    final = dest / job_id
    if dest.exists() and not dest.is_dir():
        raise TargetError(f"cannot deliver to folder target: not a folder ({dest})")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(dest, job_id)
        if final.exists() or final.is_symlink():
            return _already_delivered(final)
        temporary = dest / f".{job_id}.tmp-{secrets.token_hex(4)}"
        temporary.mkdir()
    except OSError as exc:
        raise TargetError(_reason(exc, dest)) from exc
    try:
        _fill(temporary, files, link)
        rename_noreplace(temporary, final)
        fsync_dir(dest)
    except FileExistsError:  # another worker delivered the same job meanwhile
        remove_tree(temporary)
        return _already_delivered(final)
    except OSError as exc:
        remove_tree(temporary)
        raise TargetError(_reason(exc, dest)) from exc
    except BaseException:
        remove_tree(temporary)
        raise
    return final


def _check_job_id(job_id: str) -> None:
    """The job id becomes a folder name: one plain component, not hidden, no tricks."""
    if (
        not job_id
        or job_id.startswith(".")
        or "/" in job_id
        or "\x00" in job_id
        or len(job_id.encode()) > 200
        or not job_id.isprintable()
    ):
        raise TargetError(f"job id {job_id!r} is not a safe folder name")


def _remove_leftovers(dest: Path, job_id: str) -> None:
    prefix = f".{job_id}.tmp-"
    for entry in os.scandir(dest):
        if entry.name.startswith(prefix):
            remove_tree(entry.path)


def _already_delivered(final: Path) -> Path:
    if final.is_symlink() or not final.is_dir():
        raise TargetError(f"{final} exists and is not a folder mercli delivered")
    return final


def _fill(folder: Path, files: Sequence[Path], link: bool) -> None:
    names: set[str] = set()
    for source in files:
        if source.name in names:
            raise TargetError(f"two files of the job are named {source.name} ({folder.parent})")
        names.add(source.name)
        target = folder / source.name
        if not (link and _link(source, target)):
            _copy(source, target)
    fsync_dir(folder)


def _link(source: Path, target: Path) -> bool:
    """Hard-link; False when the filesystem says a copy is needed instead."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in _LINK_FALLBACK:
            return False
        raise
    return True  # the spool's files are fsync'ed already; the link is made durable by dir fsync


def _copy(source: Path, target: Path) -> None:
    """Copy inside the kernel (sendfile: no pass through Python's buffers) and fsync."""
    with source.open("rb") as reader, target.open("xb") as writer:
        size = os.fstat(reader.fileno()).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(writer.fileno(), reader.fileno(), offset, size - offset)
            if sent == 0:
                break  # the file shrank; spool files do not, but never loop forever
            offset += sent
        os.fsync(writer.fileno())


def _reason(exc: OSError, dest: Path) -> str:
    what = {
        errno.ENOSPC: "no space left",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only filesystem",
        errno.ENOTDIR: "not a folder",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    where = exc.filename or dest
    return f"cannot deliver to folder target: {what} ({where})"
