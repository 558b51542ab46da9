"""What the spool holds, and the renames every transition is made of.

The names of the spool's folders and files (the layout drawn in `mercli.spool`), the `Item`
that stands for one published item, and the primitives the other spool modules build on:
locking a group directory (with a deadline: another process holding a lock, a hostile one
included, delays a publish or a claim by at most `LOCK_DEADLINE` seconds, then `LockTimeout`),
making a freshly built item durable, reading the files inside items without following
symlinks, and writing the few files that live inside items. A leaf: it imports nothing of the
spool, so `Spool`, claims and recovery share one copy of each rule and depend on each other in
one direction only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.errors import SpoolError
from mercli.fsutil import fsync_dir, unlink_quietly, write_new

INCOMING, OUTGOING, SUCCESS, DISCARD, ERROR = "incoming", "outgoing", "success", "discard", "error"
STUDIES, PROCESSING = "studies", "processing"
# notifications (SPEC §8): the outbox, and where each ends, apart from jobs (resend, the job
# states' readers and their retention never mistake one for a job)
NOTIFY, NOTIFY_SENT, NOTIFY_FAILED = "notify", "notify_sent", "notify_failed"
STATES: tuple[str, ...] = (
    *(INCOMING, STUDIES, PROCESSING, OUTGOING, SUCCESS, DISCARD, ERROR),
    *(NOTIFY, NOTIFY_SENT, NOTIFY_FAILED),
)
NOTIFICATION_FILE = "notification.json"
GROUP_STATES = frozenset({INCOMING, STUDIES})  # states whose items keep growing after publish
TMP, LEASES, CLAIMS, HINTS = "tmp", "leases", "claims", "hints"
STAGING = "staging"  # what storescp is writing (`receive --engine dcmtk` only)
JOB_FILE = "job.json"
ERROR_FILE = "error.json"
INSTANCE_SUFFIX, SIDECAR_SUFFIX = ".dcm", ".tags"
KEY_SEPARATOR = "~"
ITEM, OUT_TMP, OUT = "item", "out.tmp", "out"
LEASE_BIRTH_PREFIX = "lease."
TMP_GRACE_SECONDS = 24 * 3600
LOCK_DEADLINE = 3.0  # seconds a lock is waited for (SPEC §9: never forever)
_LOCK_POLL_MAX = 0.01  # a waiting claimer must find the gaps between publishers


class LockTimeout(SpoolError, TimeoutError):
    """A lock in the spool stayed taken past its deadline; the operation did nothing.

    An OSError too (errno EWOULDBLOCK), so callers that already keep going after a spool
    write error (receive answers 0xA700, route retries the series later) handle it alike.
    """


class NotRegularFile(SpoolError, OSError):
    """An item holds a symlink, FIFO, device or folder where a plain file belongs."""


def now_iso() -> str:
    """UTC now to the second, as leases and error.json record it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Item:
    """A published item: a series batch, a job, or a discarded/failed item."""

    state: str
    name: str
    path: Path
    claimed_by: str | None = None


def lock(fd: int, operation: int, where: str | os.PathLike[str], deadline: float) -> None:
    """flock `fd`, polling without blocking until `deadline` (time.monotonic); LockTimeout."""
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(
                    errno.EWOULDBLOCK, "locked by another process past the deadline", str(where)
                ) from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LOCK_POLL_MAX)


def lock_deadline(seconds: float | None = None) -> float:
    """The time.monotonic() by which a lock taken now must be had (LOCK_DEADLINE from now)."""
    return time.monotonic() + (LOCK_DEADLINE if seconds is None else seconds)


@contextmanager
def locked_dir(path: Path, operation: int, deadline: float | None = None) -> Iterator[int | None]:
    """flock a directory; yields its fd, or None if it vanished or was replaced meanwhile.

    Waits for the lock until `deadline` (time.monotonic(); default LOCK_DEADLINE from now),
    then raises LockTimeout. A path that is not a folder (a file, a symlink) is an error.
    """
    deadline = lock_deadline() if deadline is None else deadline
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotADirectoryError(errno.ENOTDIR, "not a folder (a symlink)", str(path)) from exc
        raise
    try:
        lock(fd, operation, path, deadline)
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            yield None
            return
        mine = os.fstat(fd)
        if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # drops the lock


# -- building items -----------------------------------------------------------------------------


def fsync_tree(path: Path) -> None:
    """fsync every directory of a freshly built item (file data was fsync'ed when written)."""
    for directory, _dirs, _files in os.walk(path, topdown=False):
        fsync_dir(directory)


def link_instances(source: Path, destination: Path) -> int:
    """Hard-link every instance and sidecar of one item into another: fan-out without copies.

    Only plain files: a symlink or anything else under an instance's name raises
    NotRegularFile (link(2) would copy the symlink itself, and a reader follow it later).
    """
    count = 0
    with os.scandir(source) as entries:
        for entry in entries:
            if entry.name.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX)):
                if not entry.is_file(follow_symlinks=False):
                    raise not_regular(Path(entry.path))
                os.link(entry.path, destination / entry.name, follow_symlinks=False)
                count += entry.name.endswith(INSTANCE_SUFFIX)
    return count


_KINDS = (
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def not_regular(path: Path) -> NotRegularFile:
    """The error for an entry of an item that is not a plain file, saying what it is."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return NotRegularFile(errno.ENOENT, "gone while being read", str(path))
    kind = next((name for test, name in _KINDS if test(mode)), "a device")
    return NotRegularFile(errno.EINVAL, f"not a regular file ({kind}), refused", str(path))


def irregular_entry(folder: Path) -> NotRegularFile | None:
    """The first entry of an item that is not a plain file (sub-folders aside), or None.

    Instances and sidecars must be plain files; so must job.json and the other records. A
    symlink is never followed: it could point anywhere, a root-only file included.
    """
    for path in list_entries(folder):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        is_instance = path.name.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX))
        if not stat.S_ISREG(mode) and (is_instance or not stat.S_ISDIR(mode)):
            return not_regular(path)
    return None


def open_regular(path: Path) -> int:
    """Open an item's file for reading, never through a symlink; NotRegularFile otherwise.

    Nothing but a regular file is even opened (opening a device can act on it); the open
    itself does not follow a symlink swapped in meanwhile (O_NOFOLLOW), nor wait on a FIFO.
    """
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise not_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a symlink; a socket
            raise not_regular(path) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular(path)
    return fd


def read_regular(path: Path) -> bytes:
    """The whole of an item's file (job.json, a sidecar), never read through a symlink."""
    fd = open_regular(path)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write a new JSON file (inside an item being prepared), fsync'ed."""
    write_new(path, json_bytes(record))


def replace_file(tmp: Path, path: Path, data: bytes) -> None:
    """Write a whole new version of `path` via the unused scratch path `tmp`, durably."""
    write_new(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def json_bytes(record: dict[str, Any]) -> bytes:
    """The one JSON encoding of spool records, so getdcmtags and Python write alike."""
    return json.dumps(record, indent=1).encode()  # ASCII-escaped, as getdcmtags writes it


def error_record(reason: str, origin: str, detail: dict[str, Any]) -> dict[str, Any]:
    """The one shape of error.json: why, when, from which stage, then the details."""
    return {"reason": reason, "at": now_iso(), "from": origin, **detail}


# -- listing ------------------------------------------------------------------------------------


def list_subdirs(path: Path) -> list[Path]:
    """Sorted sub-folders (symlinks not followed); none if `path` is gone meanwhile."""
    try:
        with os.scandir(path) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def list_entries(path: Path) -> list[Path]:
    """Sorted entries of any kind; none if `path` is gone meanwhile."""
    try:
        with os.scandir(path) as entries:
            return sorted(Path(e.path) for e in entries)
    except FileNotFoundError:
        return []
