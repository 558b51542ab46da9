"""The notification log: a transaction's notifications made durable for one `fdatasync`.

Protocol step 5b of `mercli.spool`. SPEC §8 wants the notification of an event written in
the same transaction as the event's state change. As an item of its own in `out.tmp/notify/`
it cost two folders, a file and four fsyncs of new metadata: on a disk where each is a
flush, a fifth of routing a ten-instance series. So a transaction appends its notifications
as one line to a **log** of its worker, into blocks the log already owns, and `fdatasync`s it
before the commit rename (beside the transaction's other fsyncs, so the flushes overlap);
`mercli notify` later turns the lines of committed transactions into notification items in
`notify/` (`mercli.notify.collect`).

Layout: `notices/<owner>/<n>.log`, the segments of one worker (n = 00000001, 00000002...;
each written full of zeros and fsync'ed, with its folder, before use, so a write into it and
its `fdatasync` change no metadata), and `notices/<owner>/cursor.json`, where the collector
has got to.

A segment holds lines of compact JSON, each written whole by one `pwrite`; its **valid
prefix** ends at the first line that is not a whole JSON object (zeros: not written yet; a
torn line: its writer died). Three kinds of line:

    {"txn": T, "key": "<state>~<name>", "notifications": [...]}
        written and fdatasync'ed before transaction T's commit rename (T is unique, a
        `new_id`; key is its claim's folder under claims/<owner>/). A notification is
        notification.json's record without its rendering (`variables` instead) and, as
        written now, without `id`: the collector gives it `<T>.<nnnn>`, n its index here
    {"commit": T}    written once the rename is durable (not synced itself: see below)
    {"abort": T}     written and synced when T failed before its rename, before the claim
                     is released

A transaction's line keeps MARK_ROOM bytes of its segment for its marker, so a marker is
always a write into blocks the log owns: a full disk cannot refuse it.

A transaction's notifications are sent iff it committed. The **fate** of T is its marker;
without one (the worker died between the lines, or a power cut took the unsynced marker),
recovery of the dead owner (step 4) decides from the claim before it settles it: `out/`
there, or the claimed item gone (rolled forward), means committed; the item there without
`out/` means not (recovery then gives the item back), and it writes the markers, synced, into
a new segment of the dead owner's log. For that answer to be about T's claim and not a
later claim of the same name, a worker syncs its log before it claims a key whose commit
marker is not durable yet (`before_claim`: rare, a series that grew after it was routed),
and syncs a full segment before it moves to the next. A collector never guesses: it waits
at a line without a marker while its owner's lease exists. It takes such a line as
committed only once the owner is gone without recovery having marked it, which happens only
if writing a marker failed with an I/O error (the worker logs it): then a transaction that
failed may be told of, a notification is never lost.

Segments are never reused: a full one is left for the collector, which deletes a segment
once its cursor has passed into a later one, and an owner's folder once the owner is gone
and everything in it collected.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercli.fsutil import fsync_dir, make_dir, open_new, unlink_quietly
from mercli.spool.items import ITEM, OUT

NOTICES_DIR = "notices"
CURSOR_FILE = "cursor.json"
SEGMENT_SUFFIX = ".log"
FIRST_SEGMENT_SIZE = 256 * 1024  # a `route --once` from cron writes a few lines
MAX_SEGMENT_SIZE = 4 * 1024 * 1024
READ_BLOCK = 256 * 1024
COMMIT, ABORT = "commit", "abort"
MARK_ROOM = 128  # bytes a transaction line keeps for its marker ({"commit": "<new_id>"})


def owner_folder(root: Path, owner: str) -> Path:
    return root / NOTICES_DIR / owner


def segment_numbers(folder: Path) -> list[int]:
    """The segments of one owner's log, oldest first (none if the folder is gone)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        stem, dot, suffix = name.partition(".")
        if dot and suffix == SEGMENT_SUFFIX[1:] and stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def segment_path(folder: Path, number: int) -> Path:
    return folder / f"{number:08d}{SEGMENT_SUFFIX}"


def _line(record: dict[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
    return text.encode() + b"\n"


def _create_segment(folder: Path, number: int, size: int) -> int:
    """A new segment of `size` zeros, committed (file and folder) before any line goes in."""
    path = segment_path(folder, number)
    fd = open_new(path, os.O_RDWR)
    try:
        zeros = bytes(min(size, 1024 * 1024))
        written = 0
        while written < size:
            written += os.pwrite(fd, zeros[: size - written], written)
        os.fsync(fd)
        fsync_dir(folder)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    return fd


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class NoticeLog:
    """The log one worker appends to (thread-safe: dispatch and process share a worker
    between threads). Made when the worker first notifies; `close` at the worker's stop.

    A transaction's line keeps MARK_ROOM bytes of its segment for its marker (for every
    transaction open at once), so a marker never needs a new segment: it is a write into
    blocks the log owns, which a full disk cannot refuse.
    """

    def __init__(self, root: Path, owner: str, first: int = 1) -> None:
        self.folder = owner_folder(root, owner)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._number = first - 1
        self._size = 0
        self._offset = 0
        self._open: set[str] = set()  # transactions whose marker is still to come
        self._unsynced: set[str] = set()  # claim keys whose commit marker is not synced yet
        self._closed = False

    def open_transaction(self, txn: str, key: str, notifications: list[dict[str, Any]]) -> None:
        """The line of transaction `txn` (claim `key`), durable when this returns."""
        data = _line({"txn": txn, "key": key, "notifications": notifications})
        with self._lock:
            fd = self._room(len(data) + (len(self._open) + 1) * MARK_ROOM)
            self._write(fd, data)
            self._open.add(txn)
            self._sync(fd)

    def mark(self, txn: str, key: str, fate: str) -> None:
        """The marker of an opened transaction: `commit` (left unsynced: a power cut that
        takes it is recovery's to decide, see `before_claim`) or `abort` (synced)."""
        data = _line({fate: txn})
        with self._lock:
            if txn not in self._open:
                return  # its line was never written: nothing to mark, no room to take
            self._open.discard(txn)
            fd = self._room(len(data))  # within the room kept for it
            self._write(fd, data)
            if fate == ABORT:
                self._sync(fd)
            else:
                self._unsynced.add(key)

    def before_claim(self, key: str) -> None:
        """Sync an unsynced commit marker of claim `key` before the key is claimed again:
        recovery decides an unmarked line from the claim of that key, which a new claim of
        the same name would misrepresent."""
        with self._lock:
            if key in self._unsynced and self._fd is not None:
                self._sync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        """Any line, synced (recovery's markers for a dead owner)."""
        data = _line(record)
        with self._lock:
            fd = self._room(len(data))
            self._write(fd, data)
            self._sync(fd)

    def _write(self, fd: int, data: bytes) -> None:
        _pwrite_all(fd, data, self._offset)
        self._offset += len(data)

    def _sync(self, fd: int) -> None:
        os.fdatasync(fd)
        self._unsynced.clear()  # every earlier line of the log is durable now

    def _room(self, length: int) -> int:
        if self._closed:
            raise OSError(errno.EBADF, "the notification log is closed", str(self.folder))
        if self._fd is not None and self._offset + length <= self._size:
            return self._fd
        if self._fd is None:
            _make_dir_durably(self.folder.parent)
            _make_dir_durably(self.folder)
        number = self._number + 1
        size = min(MAX_SEGMENT_SIZE, FIRST_SEGMENT_SIZE << min(16, max(0, number - 1)))
        size = max(size, length)
        fd = _create_segment(self.folder, number, size)
        if self._fd is not None:
            try:
                self._sync(self._fd)  # its unsynced markers durable before later lines are
            finally:
                os.close(self._fd)  # full: left to the collector
        self._fd, self._number, self._size, self._offset = fd, number, size, 0
        return fd

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _make_dir_durably(path: Path) -> None:
    """A folder of the log, its entry in its parent durable (lines synced in it count),
    whoever made it (another worker may have made it and not synced its parent yet)."""
    make_dir(path, exist_ok=True)
    fsync_dir(path.parent)


@dataclass(frozen=True, order=True)
class Place:
    """Just after a whole line: segment number and byte offset in it (JSON: [n, offset])."""

    segment: int = 0
    offset: int = 0

    @classmethod
    def from_json(cls, value: object) -> Place:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
            segment, offset = value
            if segment >= 0 and offset >= 0:
                return cls(segment, offset)
        return cls()


def _valid_lines(path: Path, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset after, record) for each line of a segment's valid prefix from `offset`."""
    try:
        stream = path.open("rb")
    except FileNotFoundError:
        return
    with stream:
        stream.seek(offset)
        pending = b""
        while block := stream.read(READ_BLOCK):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            for raw in lines:
                if not raw or raw[0] == 0 or b"\0" in raw:
                    return  # zeros: nothing written here yet
                try:
                    record = json.loads(raw)
                except ValueError:
                    return  # torn: its writer died mid-line
                if not isinstance(record, dict):
                    return
                offset += len(raw) + 1
                yield offset, record
            if pending[:1] == b"\0":
                return


def read_lines(folder: Path, start: Place) -> Iterator[tuple[Place, dict[str, Any]]]:
    """Every valid line after `start`, each with the place just after it.

    The segments are listed before any is read: a segment with a later one beside it at
    that moment is never written again (a writer fills one segment at a time), so reading
    it to the end of its valid prefix has read all it will ever hold.
    """
    for number in segment_numbers(folder):
        if number < start.segment:
            continue
        offset = start.offset if number == start.segment else 0
        for end, record in _valid_lines(segment_path(folder, number), offset):
            yield Place(number, end), record


@dataclass
class Pending:
    """What a collector may take from one owner's log now: (place after its line, txn,
    index, notification) each, in log order."""

    notifications: list[tuple[Place, str, int, dict[str, Any]]] = field(default_factory=list)
    cursor: Place = field(default_factory=Place)  # after the last line taken or skipped
    waiting: int = 0  # transactions without a fate yet (their owner is alive)
    more: bool = False  # stopped at the window's end: more to take right away


def pending(folder: Path, cursor: Place, *, owner_exists: bool, window: int = 0) -> Pending:
    """The notifications of committed transactions after `cursor`, in log order, up to the
    first transaction whose fate is unknown while its owner exists (it may be mid-commit).

    `window`: read at most that many lines (0: all). A transaction whose marker may lie past
    the window is then a place to stop, not a fate to guess; if that leaves nothing to take
    (a marker further away than the window), the whole log is read.
    """
    lines: list[tuple[Place, dict[str, Any]]] = []
    for entry in read_lines(folder, cursor):
        lines.append(entry)
        if window and len(lines) >= window:
            break
    cut = bool(window) and len(lines) >= window
    fates = {str(r[kind]): kind for _, r in lines for kind in (COMMIT, ABORT) if kind in r}
    found = Pending(cursor=cursor)
    for place, record in lines:
        txn = record.get("txn")
        if txn is not None:
            fate = fates.get(str(txn))
            if fate is None and (owner_exists or cut):
                if cut and found.cursor == cursor:
                    return pending(folder, cursor, owner_exists=owner_exists)
                found.more = cut
                found.waiting = sum(
                    1 for _, r in lines if "txn" in r and str(r["txn"]) not in fates
                )
                return found
            if fate != ABORT:
                notes = record.get("notifications")
                if isinstance(notes, list):
                    found.notifications += [
                        (place, str(txn), index, note)
                        for index, note in enumerate(notes)
                        if isinstance(note, dict)
                    ]
        found.cursor = place
    found.more = cut
    return found


def uncollected(root: Path) -> Iterator[dict[str, Any]]:
    """Notifications of committed transactions that no collector has taken yet (read only:
    `mercli status` counts them as waiting)."""
    try:
        owners = sorted(os.listdir(root / NOTICES_DIR))
    except FileNotFoundError:
        return
    for owner in owners:
        folder = owner_folder(root, owner)
        found = pending(folder, read_cursor(folder), owner_exists=True)
        yield from (notification for _, _, _, notification in found.notifications)


def unresolved(folder: Path, start: Place) -> list[dict[str, Any]]:
    """Transaction lines after `start` that have no marker."""
    lines = [record for _, record in read_lines(folder, start)]
    marked = {str(r[kind]) for r in lines for kind in (COMMIT, ABORT) if kind in r}
    return [r for r in lines if "txn" in r and str(r["txn"]) not in marked]


def read_cursor(folder: Path) -> Place:
    try:
        return Place.from_json(json.loads((folder / CURSOR_FILE).read_bytes()))
    except (OSError, ValueError):
        return Place()


def resolve_dead_owner(root: Path, owner: str, claims_dir: Path) -> int:
    """Decide the fate of every transaction a dead owner left without a marker, from its
    claim (see the module docstring), and write the markers, synced, in a new segment.

    Called by recovery while it holds the owner's lease lock and before it settles the
    owner's claims: then the claims still say what happened. Returns how many it decided.
    """
    folder = owner_folder(root, owner)
    open_lines = unresolved(folder, read_cursor(folder))
    if not open_lines:
        return 0
    numbers = segment_numbers(folder)
    log = NoticeLog(root, owner, first=(numbers[-1] + 1) if numbers else 1)
    try:
        for record in open_lines:
            key = str(record.get("key", ""))
            key_dir = claims_dir / key
            plain = key not in ("", ".", "..") and "/" not in key and "\0" not in key
            committed = not plain or (key_dir / OUT).is_dir() or not (key_dir / ITEM).exists()
            log.append({COMMIT if committed else ABORT: record["txn"]})
    finally:
        log.close()
    return len(open_lines)
