"""What the spool holds, and the renames every transition is made of.

The names of the spool's folders and files (the layout drawn in `mercli.spool`), the `Item`
that stands for one published item, and the primitives the other spool modules build on:
locking a group directory, making a freshly built item durable, and writing the few files
that live inside items. A leaf: it imports nothing of the spool, so `Spool`, claims and
recovery share one copy of each rule and depend on each other in one direction only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.errors import SpoolError
from mercli.fsutil import fsync_dir, remove_tree, rename_noreplace, unlink_quietly, write_new


INCOMING, OUTGOING, SUCCESS, DISCARD, ERROR = "incoming", "outgoing", "success", "discard", "error"
STATES: tuple[str, ...] = (INCOMING, OUTGOING, SUCCESS, DISCARD, ERROR)
GROUP_STATES = frozenset({INCOMING})  # states whose items keep growing after publish
TMP, LEASES, CLAIMS, HINTS = "tmp", "leases", "claims", "hints"
STAGING = "staging"  # what storescp is writing (`receive --engine dcmtk` only)
JOB_FILE = "job.json"
ERROR_FILE = "error.json"
INSTANCE_SUFFIX, SIDECAR_SUFFIX = ".dcm", ".tags"
KEY_SEPARATOR = "~"
ITEM, OUT_TMP, OUT = "item", "out.tmp", "out"
LEASE_BIRTH_PREFIX = "lease."
TMP_GRACE_SECONDS = 24 * 3600


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


@contextmanager
def locked_dir(path: Path, operation: int) -> Iterator[int | None]:
    """flock a directory; yields its fd, or None if it vanished or was replaced meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        yield None
        return
    try:
        fcntl.flock(fd, operation)
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
    """Hard-link every instance and sidecar of one item into another: fan-out without copies."""
    count = 0
    with os.scandir(source) as entries:
        for entry in entries:
            if entry.name.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX)) and entry.is_file():
                os.link(entry.path, destination / entry.name)
                count += entry.name.endswith(INSTANCE_SUFFIX)
    return count


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
