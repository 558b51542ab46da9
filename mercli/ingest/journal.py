"""The drop folder's journal: what the watcher has published from which file.

`DIR/.done/.journal`, NDJSON, one fsync'ed line per step, so that a watcher killed at any
point neither loses nor repeats a file's instances when it starts again:

- `{"pub": KEY, "n": N}` once instance N of the file (0 for a plain file, the member's index in
  an archive) is durable in incoming/;
- `{"done": KEY, "to": "done"|"delete"|"failed", "reason": ...}` once the whole file is
  decided, before it is moved to `.done/`/`.failed/` or deleted.

KEY is the file's path below DIR, inode, size and mtime (ns): a file dropped again later (a
new inode, a new mtime) is a new file. Records of files no longer in DIR are dropped when the
journal is compacted (at start, and every `COMPACT_EVERY` lines).

One watcher per folder: it holds an exclusive `flock` on `DIR/.done` for its lifetime (the
kernel drops it however the watcher dies); a second one exits with an error.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercli.errors import UsageError
from mercli.fsutil import fsync_dir, make_dir, open_new, unlink_quietly, write_fd
from mercli.names import new_id

JOURNAL = ".journal"
COMPACT_EVERY = 10_000


@dataclass
class FileRecord:
    published: set[int] = field(default_factory=set)
    done: dict[str, Any] | None = None


def file_key(rel: str, info: os.stat_result) -> str:
    return f"{rel}\x00{info.st_ino}\x00{info.st_size}\x00{info.st_mtime_ns}"


class Journal:
    """The journal of one drop folder; `open()` takes the folder's lock."""

    def __init__(self, done_dir: Path) -> None:
        self.done_dir = done_dir
        self.path = done_dir / JOURNAL
        self.records: dict[str, FileRecord] = {}
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._lines = 0

    def open(self, still_there: Callable[[str], bool]) -> Journal:
        """Lock, read, and compact to the records of files `still_there(key)`."""
        make_dir(self.done_dir, exist_ok=True)
        fd = os.open(self.done_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            message = f"another watcher is running on this folder ({self.done_dir})"
            raise UsageError(message) from None
        self._lock_fd = fd
        self._read()
        self.compact(still_there)
        return self

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: its step was not durable, so not taken
            if isinstance(entry, dict):
                self._apply(entry)

    def _apply(self, entry: dict[str, Any]) -> None:
        if "pub" in entry:
            self.records.setdefault(str(entry["pub"]), FileRecord()).published.add(int(entry["n"]))
        elif "done" in entry:
            self.records.setdefault(str(entry["done"]), FileRecord()).done = entry

    def get(self, key: str) -> FileRecord:
        return self.records.get(key) or FileRecord()

    def append(self, entry: dict[str, Any]) -> None:
        """Add one step, durably (written and fsync'ed before this returns)."""
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o640)
        os.write(self._fd, json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        os.fsync(self._fd)
        self._apply(entry)
        self._lines += 1

    def compact_if_long(self, still_there: Callable[[str], bool]) -> None:
        if self._lines >= COMPACT_EVERY:
            self.compact(still_there)

    def compact(self, still_there: Callable[[str], bool]) -> None:
        """Rewrite with only the records of files still in the folder (tmp + rename)."""
        self.records = {k: r for k, r in self.records.items() if still_there(k)}
        lines = []
        for key, record in self.records.items():
            lines += [{"pub": key, "n": n} for n in sorted(record.published)]
            if record.done is not None:
                lines.append(record.done)
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in lines)
        temporary = self.done_dir / f".journal.{new_id()}"
        try:
            write_fd(open_new(temporary), data)
            os.replace(temporary, self.path)
        except BaseException:
            unlink_quietly(temporary)
            raise
        fsync_dir(self.done_dir)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lines = 0
