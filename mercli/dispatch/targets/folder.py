"""Delivery to a `folder` target: the job appears as `DEST/<job id>/`, complete or not at all.

A study job appears as `DEST/<job id>/<series>/` (one sub-folder per series), in one rename.

The protocol, the same as the spool's publish step but across into the admin's folder:

1. remove leftovers `DEST/.<job id>.tmp-*` of an earlier attempt that crashed half-way;
2. if `DEST/<job id>` already exists, an earlier attempt crashed after its rename but before
   the spool recorded success: the job is delivered, nothing is written again;
3. fill `DEST/.<job id>.tmp-<random>` (hidden, so folder watchers that skip dot-files never
   see it): each file copied with `sendfile`, or, for a target with `link = true` whose DEST
   is on the spool's filesystem, hard-linked (no pixel data is copied, but DEST then holds the
   spool's own files: see `Target.link`); each file and the folder fsync'ed;
4. rename it to `DEST/<job id>` without replacing anything (renameat2 RENAME_NOREPLACE);
5. fsync DEST, so the rename survives a power cut before dispatch records success.

A failure (ENOSPC, EACCES, EROFS, ...) removes the temporary folder and raises `TargetError`
with the reason; `DEST/<job id>` never exists half-written.

The job's files are opened without following symlinks and must be regular files: a symlink
in a job (to a root-only file, say) fails the job for good, naming the file, and nothing of
what it points to reaches DEST. Copies and folders get the spool's modes (0640, 0750), as
linked files have them: a consumer reads DEST through its group.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from mercli.dispatch.targets.base import Attempt
from mercli.errors import MercliError
from mercli.fsutil import DIR_MODE, fsync_dir, make_dir, open_new, remove_tree, rename_noreplace
from mercli.jobs import JobInfo, Progress
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX, NotRegularFile, open_regular

_LINK_FALLBACK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES})


class TargetError(MercliError):
    """A target could not take the job; the message says what and where."""


def deliver(folder: Path, job: JobInfo, progress: Progress) -> Attempt:
    """Deliver the job's instances and sidecars as `<path>/<job id>/` (all or nothing)."""
    folders = [folder / series for series in job.series] or [folder]
    files = sorted(
        p for f in folders for p in f.iterdir() if p.suffix in (INSTANCE_SUFFIX, SIDECAR_SUFFIX)
    )
    base = folder if job.series else None
    try:
        dest = Path(str(job.target.path))
        deliver_to_folder(files, dest, job.name, link=job.target.link, base=base)
    except NotRegularFile as exc:  # dispatch checks first; this is the race-free second look
        return Attempt(
            error=f"job file {Path(str(exc.filename)).name}: {exc.strerror}", permanent=True
        )
    except TargetError as exc:
        return Attempt(error=str(exc))
    return Attempt(delivered=sum(p.suffix == INSTANCE_SUFFIX for p in files))


def deliver_to_folder(
    files: Sequence[Path],
    dest: Path,
    job_id: str,
    *,
    link: bool = False,
    base: Path | None = None,
) -> Path:
    """Publish `files` as `dest/job_id/` atomically; returns that folder.

    With `base`, each file keeps its path below `base` (a study job's `<series>/NAME`);
    otherwise only its name.

    Copies, unless `link`: then hard links where `dest` is on the files' filesystem (for
    targets whose consumers never modify files in place: theirs would be the spool's too).
    NotRegularFile for a file that is a symlink or not a regular file (nothing is delivered).
    """
    check_job_id(job_id)
    final = dest / job_id
    if dest.exists() and not dest.is_dir():
        raise TargetError(f"cannot deliver to folder target: not a folder ({dest})")
    try:
        dest.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        _remove_leftovers(dest, job_id)
        if final.exists() or final.is_symlink():
            return _already_delivered(final)
        temporary = dest / f".{job_id}.tmp-{secrets.token_hex(4)}"
        make_dir(temporary)
    except OSError as exc:
        raise TargetError(_reason(exc, dest)) from exc
    try:
        _fill(temporary, files, link, base)
        rename_noreplace(temporary, final)
        fsync_dir(dest)
    except FileExistsError:  # another worker delivered the same job meanwhile
        remove_tree(temporary)
        return _already_delivered(final)
    except NotRegularFile:
        remove_tree(temporary)
        raise
    except OSError as exc:
        remove_tree(temporary)
        raise TargetError(_reason(exc, dest)) from exc
    except BaseException:
        remove_tree(temporary)
        raise
    return final


def check_job_id(job_id: str) -> None:
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


def _fill(folder: Path, files: Sequence[Path], link: bool, base: Path | None = None) -> None:
    names: set[str] = set()
    subfolders: set[Path] = set()
    for source in files:
        name = str(source.relative_to(base)) if base is not None else source.name
        if name in names:
            raise TargetError(f"two files of the job are named {name} ({folder.parent})")
        names.add(name)
        target = folder / name
        if target.parent != folder and target.parent not in subfolders:
            make_dir(target.parent)
            subfolders.add(target.parent)
        reader = open_regular(source)  # never through a symlink; regular files only
        try:
            if not (link and _link(reader, source, target)):
                _copy(reader, target)
        finally:
            os.close(reader)
    for subfolder in subfolders:
        fsync_dir(subfolder)
    fsync_dir(folder)


def _link(reader: int, source: Path, target: Path) -> bool:
    """Hard-link the file open as `reader`; False when the filesystem wants a copy instead."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _LINK_FALLBACK:
            return False
        raise
    linked, opened = os.lstat(target), os.fstat(reader)
    if (linked.st_dev, linked.st_ino) != (opened.st_dev, opened.st_ino):
        os.unlink(target)  # the name was swapped after it was opened: link nothing else
        raise NotRegularFile(errno.EINVAL, "replaced while being delivered", str(source))
    return True  # the spool's files are fsync'ed already; the link is made durable by dir fsync


def _copy(reader: int, target: Path) -> None:
    """Copy inside the kernel (sendfile: no pass through Python's buffers) and fsync."""
    writer = open_new(target)
    try:
        size = os.fstat(reader).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(writer, reader, offset, size - offset)
            if sent == 0:
                break  # the file shrank; spool files do not, but never loop forever
            offset += sent
        os.fsync(writer)
    finally:
        os.close(writer)


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
