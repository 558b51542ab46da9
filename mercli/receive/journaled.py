"""Durable receipt through the spool's write-ahead journal (mercli.spool.journal).

Per instance, on the association's thread: the Part 10 bytes are appended to the association's
segment, the sidecar is read from them (header only), the record is committed with one
`fdatasync`, and only then is success answered. A `Publisher` thread then writes each record
out as `incoming/<series>/<instance>.dcm` + `.tags`, a batch at a time with one round of
syncs, advances the segments' checkpoints, resets and reuses segments whose records are all
published, and writes an association's completion hints only after its last instance is in
`incoming/` (so route never sees a hint before the series).

An instance past mercli.receive.handler.LARGE goes on into a scratch file of its own, which is
`fdatasync`ed and named by its record (no data in the segment): its bytes are written once,
and publishing renames the file. What does not go through the journal: an instance that does
not fit what is left of a segment (it takes the direct path of mercli.receive.handler), one
whose UIDs cannot be read (quarantined as before, with a failure status), and any while no
segment can be made.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercli.fsutil import FilesystemSync, make_dir, unlink_quietly
from mercli.names import safe_name
from mercli.spool import Spool, Worker
from mercli.spool.journal import (
    HEADER_SIZE,
    JOURNAL_DIR,
    RECORD_HEADER_SIZE,
    SEGMENT_SUFFIX,
    SPARE_DIR,
    Record,
    RecordWriter,
    Segment,
    ensure_folder,
    publish,
)

log = logging.getLogger(__name__)

SPARES = 2  # segments kept ready (written and synced) for associations to take
BATCH = 256  # records published with one round of syncs at most
QUEUE_DEPTH = 4096  # records acknowledged but not yet published, at most (then senders wait)
HEAD = 64 * 1024  # bytes of an instance parsed from memory for its sidecar
CLOSE_GRACE = 30.0  # seconds a stopping receiver keeps trying to publish what it holds
LOCK_WAIT = 0.2  # seconds the publisher tries a series' lock before it moves on
RETRY_EVERY = 1.0  # seconds between tries of the instances whose series was locked
UNAVAILABLE_FOR = 5.0  # seconds no segment is made after the disk had no room for one
QUIET = 0.05  # seconds without a new record before the publisher starts on what it holds...
MAX_LAG = 2.0  # ...unless its oldest record has waited this long...
MAX_BACKLOG = 2048  # ...or this many records wait (well below QUEUE_DEPTH: senders never wait)


@dataclass(eq=False)
class Slot:
    """A segment in use: records not yet published, and whether more may be appended."""

    segment: Segment
    pending: int = 0
    sealed: bool = False
    full: bool = False  # sealed because no record fitted (not because its association ended)
    unpublished: dict[int, int] = field(default_factory=dict)  # record offset -> its end
    published_end: int = 0


@dataclass(eq=False)
class Ending:
    """An association's end, in the publish queue after its last record: then its hints."""

    hints: Callable[[], None]


@dataclass(eq=False)
class Appender:
    """One association's place in the journal: its current slot and where the next record
    starts."""

    slot: Slot | None = None
    offset: int = 0
    slots: list[Slot] = field(default_factory=list)


_NOTHING = Ending(lambda: None)


class Journal:
    """The journal of one receive process: segments, appenders, and the publisher thread."""

    def __init__(self, spool: Spool, worker: Worker) -> None:
        self.spool = spool
        self.worker = worker
        self.folder = ensure_folder(spool.root, worker.id)
        self._lock = threading.Lock()
        self._counter = 0
        self._spares: queue.Queue[Segment] = queue.Queue()
        self._queue: queue.Queue[Record | Ending | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._slots: dict[int, Slot] = {}  # id(segment) -> slot
        self._stop = threading.Event()
        self._unavailable_until = 0.0  # monotonic time until which no segment is made
        self._last_commit = 0.0  # monotonic time of the last record committed
        self._closing = threading.Event()
        self._filesystem = FilesystemSync(spool.root)
        self._adopt_spares()
        self._maker = threading.Thread(target=self._make_spares, name="journal-spares", daemon=True)
        self._maker.start()
        self._publisher = threading.Thread(target=self._publish_loop, name="journal-publish")
        self._publisher.start()

    # -- segments ---------------------------------------------------------------------------

    def _new_path(self) -> Path:
        with self._lock:
            self._counter += 1
            return self.folder / f"{self._counter:06d}{SEGMENT_SUFFIX}"

    def _adopt_spares(self) -> None:
        """Take reset segments other (cleanly stopped) receivers left in journal/spare/."""
        spare = self.spool.root / JOURNAL_DIR / SPARE_DIR
        for path in sorted(spare.glob(f"*{SEGMENT_SUFFIX}"))[:SPARES]:
            target = self._new_path()
            try:
                os.rename(path, target)
            except OSError:
                continue  # another receiver took it
            segment = Segment.open(target)
            if segment is not None:
                self._spares.put(segment)

    def _make_spares(self) -> None:
        while not self._stop.is_set():
            ready = self._spares.qsize()
            if ready >= SPARES or (ready >= 1 and ready + self._returning() >= SPARES):
                self._stop.wait(0.05)  # one spare always ready: none is made on a sender's time
                continue
            if time.monotonic() < self._unavailable_until:
                self._stop.wait(0.5)
                continue
            try:
                self._spares.put(Segment.create(self._new_path()))
            except OSError as exc:  # a full disk: instances take the direct path meanwhile
                log.warning("cannot prepare a journal segment: %s", exc)
                self._unavailable_until = time.monotonic() + UNAVAILABLE_FOR

    def _returning(self) -> int:
        """Sealed segments whose records wait to be published (or that wait to be reset): spares
        again soon. One of them stands in for a second spare (made anew instead, it would cost
        another 16 MiB of zeros written while instances arrive)."""
        with self._lock:
            return sum(1 for slot in self._slots.values() if slot.sealed)

    def _full_waiting(self) -> int:
        """Full segments whose records wait: the hold ends at SPARES of them (a segment sealed
        when its association ended, or one stuck behind a locked series, does not count)."""
        with self._lock:
            return sum(1 for slot in self._slots.values() if slot.full and slot.pending)

    def take_slot(self) -> Slot:
        """A segment for an association: a spare, else one made now (OSError if the disk
        has no room for one: the caller takes the direct path, and so do the next instances
        for UNAVAILABLE_FOR seconds, rather than fill a full disk with segments' zeros)."""
        try:
            segment = self._spares.get_nowait()
        except queue.Empty:
            if time.monotonic() < self._unavailable_until:
                raise OSError(errno.ENOSPC, "no journal segment (the disk was full)") from None
            try:
                segment = Segment.create(self._new_path())
            except OSError:
                self._unavailable_until = time.monotonic() + UNAVAILABLE_FOR
                raise
        slot = Slot(segment)
        with self._lock:
            self._slots[id(segment)] = slot
        return slot

    def _retire(self, slot: Slot) -> None:
        """All of a sealed slot's records are published: reset its segment for reuse. It stays
        among the slots (counted as returning) until it is a spare, so the maker does not write
        a segment for the moment in between."""
        try:
            slot.segment.reset()
        except OSError as exc:
            log.warning("cannot reset journal segment %s: %s", slot.segment.path, exc)
            with self._lock:
                self._slots.pop(id(slot.segment), None)
            slot.segment.close()
            return
        with self._lock:
            self._slots.pop(id(slot.segment), None)
            keep = self._spares.qsize() < SPARES
            if keep:
                self._spares.put(slot.segment)
        if not keep:
            slot.segment.close()
            unlink_quietly(slot.segment.path)

    # -- appending (association threads) ------------------------------------------------------

    def writer(self, appender: Appender) -> RecordWriter:
        if appender.slot is None:
            appender.slot = self.take_slot()
            appender.slots.append(appender.slot)
            appender.offset = 0
        offset = max(appender.offset, HEADER_SIZE)
        return RecordWriter(appender.slot.segment, offset)

    def roll(self, appender: Appender) -> None:
        """The appender's segment is full: seal it, the next record goes to a new one."""
        if appender.slot is not None:
            appender.slot.full = True
            self._seal(appender.slot)
        appender.slot = None

    def committed(self, appender: Appender, record: Record) -> None:
        """A record is durable: count it, and queue it for publishing."""
        assert appender.slot is not None
        with self._lock:
            appender.slot.pending += 1
            appender.slot.unpublished[record.offset] = record.end
        appender.offset = record.end
        self._last_commit = time.monotonic()
        self._queue.put(record)

    def ended(self, appender: Appender, hints: Callable[[], None]) -> None:
        """The association ended: seal its segment; its hints follow its last record."""
        if appender.slot is not None:
            self._seal(appender.slot)
            appender.slot = None
        self._queue.put(Ending(hints))

    def _seal(self, slot: Slot) -> None:
        with self._lock:
            slot.sealed = True
            done = slot.pending == 0
        if done:
            self._queue.put(Ending(lambda: self._retire(slot)))

    # -- publishing (one thread) ----------------------------------------------------------------

    def _await_quiet(self, since: float) -> None:
        """Hold a burst's records until its associations pause (QUIET), the oldest has waited
        MAX_LAG, MAX_BACKLOG wait, or SPARES full segments do. Publishing writes new files and
        syncs them; beside an association's per-instance `fdatasync` that queue of writes made
        each acknowledgement wait behind it (2000 x 12 KB: 1.85 s with publishing alongside,
        1.05 s with it held to the end). The records are durable already; only `incoming/`
        waits."""
        while not self._closing.is_set():
            now = time.monotonic()
            if (
                now - self._last_commit >= QUIET
                or now - since >= MAX_LAG
                or self._queue.qsize() >= MAX_BACKLOG
                or self._full_waiting() >= SPARES  # instances of 100-256 KB fill one fast
            ):
                return
            self._closing.wait(0.01)  # cheap, and only while records are held

    def _publish_loop(self) -> None:
        deferred: list[Record] = []  # groups that were locked: tried again every RETRY_EVERY
        retry_at = 0.0
        drained = True  # the last batch emptied the queue: a new burst may be starting
        while True:
            timeout = max(0.0, retry_at - time.monotonic()) if deferred else None
            batch: list[Record | Ending] = []
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = _NOTHING  # only the deferred records are due
            if first is None:
                if deferred:
                    self._publish_batch(deferred, final=True)
                return
            if first is not _NOTHING:
                batch.append(first)
                if drained and isinstance(first, Record):  # an ending alone: nothing to hold
                    self._await_quiet(time.monotonic())
            stop = False
            while len(batch) < BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            drained = len(batch) < BATCH or self._queue.empty()
            if deferred and time.monotonic() >= retry_at:
                batch = [*deferred, *batch]  # in order: a series' records stay in order
                deferred = []
            deferred += self._publish_batch(batch, final=stop)
            if deferred:
                retry_at = time.monotonic() + RETRY_EVERY
            if stop:
                return

    def _publish_batch(
        self, batch: Sequence[Record | Ending], *, final: bool = False
    ) -> list[Record]:
        """Publish a batch's records (then its endings); the records whose group was locked,
        to try again. Other errors (a full disk) are retried here with backoff: the records
        are durable in the journal whatever happens."""
        records = [item for item in batch if isinstance(item, Record)]
        deferred: list[Record] = []
        delay = 0.5
        while records:
            try:
                deferred = publish(
                    self.spool,
                    records,
                    self.worker.scratch,
                    wait=LOCK_WAIT,
                    filesystem=self._filesystem,
                )
                break
            except OSError as exc:
                log.error("cannot publish %d received instance(s): %s", len(records), exc)
                if self._stop.wait(delay):
                    return []  # left in the journal: replayed at the next start
                delay = min(delay * 2, 30.0)
        if deferred and final and not self._stop.is_set():
            log.warning("%d instance(s) wait for a locked series", len(deferred))
        late = {id(record) for record in deferred}
        retire: list[Slot] = []
        touched: dict[int, Slot] = {}
        with self._lock:
            for record in records:
                if id(record) in late:
                    continue
                slot = self._slots.get(id(record.segment))
                if slot is None:
                    continue
                slot.unpublished.pop(record.offset, None)
                slot.published_end = max(slot.published_end, record.end)
                slot.pending -= 1
                touched[id(slot)] = slot
                if slot.sealed and slot.pending == 0:
                    retire.append(slot)
        for slot in touched.values():  # below the first unpublished record: all durable
            checkpoint = min(slot.unpublished, default=slot.published_end)
            slot.segment.set_checkpoint(checkpoint)
        for slot in retire:
            self._retire(slot)
        for item in batch:
            if isinstance(item, Ending):
                item.hints()
        return deferred

    def close(self) -> None:
        """Publish everything acknowledged, then put the spare segments aside for the next
        receiver and remove this process's folder (only if nothing is left to publish)."""
        self._closing.set()
        self._queue.put(None)
        self._publisher.join(timeout=CLOSE_GRACE)
        self._stop.set()  # a publisher still retrying gives up: the journal keeps the rest
        self._publisher.join()
        self._maker.join(timeout=10)
        self._filesystem.close()
        with self._lock:
            left = [slot for slot in self._slots.values() if slot.pending]
        if left:
            log.error(
                "%d journal segment(s) hold unpublished instances: replayed at next start",
                len(left),
            )
            return
        spare = self.spool.root / JOURNAL_DIR / SPARE_DIR
        make_dir(spare, exist_ok=True)
        kept = 0
        while True:
            try:
                segment = self._spares.get_nowait()
            except queue.Empty:
                break
            segment.close()
            if kept < SPARES:  # the next receiver adopts SPARES: no pile across restarts
                try:
                    os.rename(segment.path, spare / f"{self.worker.id}.{segment.path.name}")
                    kept += 1
                    continue
                except OSError:
                    pass
            unlink_quietly(segment.path)
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            slot.segment.close()
            unlink_quietly(slot.segment.path)
        for path in self.folder.glob(f"*{SEGMENT_SUFFIX}"):
            unlink_quietly(path)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


class SegmentView(io.RawIOBase):
    """A record's data as a read-only file (for parsing a header larger than HEAD)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length, self.position = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        left = self.length - self.position
        size = left if size is None or size < 0 else min(size, left)
        data = os.pread(self.fd, size, self.start + self.position) if size > 0 else b""
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def instance_names(sidecar: dict[str, Any]) -> tuple[str, str]:
    """(series group, instance name) as receive files them."""
    return safe_name(str(sidecar["SeriesInstanceUID"])), safe_name(str(sidecar["SOPInstanceUID"]))


__all__ = ["RECORD_HEADER_SIZE", "Appender", "Journal", "SegmentView", "instance_names"]
