"""Receive's write-ahead journal: durable at acknowledgement for one `fdatasync` of data alone.

A received instance used to cost three journal commits of the filesystem before its C-STORE
success: its new file's fsync, its sidecar's, and its group directory's. A write into blocks a
file already owns (allocated, written, committed) followed by `fdatasync` commits nothing but
those blocks: a third of the time for a small instance. So `receive` appends each instance
(its Part 10 bytes and its sidecar) as one record to a **segment**, a file of SEGMENT_SIZE
bytes written with zeros and fsync'ed before use, `fdatasync`s it, answers success, and
publishes the instance into `incoming/` behind the acknowledgement, with one sync for a batch
of instances (`Publisher` in mercli.receive.journaled).

Layout: `journal/<owner>/<n>.seg`, the segments of one live receive process (each association
writes its own segment, so appends need no lock); `journal/spare/`, reset segments any process
may take instead of writing a new one.

A segment::

    [0, HEADER_SIZE)  header: b"MERCLIJ1", generation (u64), checkpoint (u64), zeros
    records from HEADER_SIZE, each 8-aligned:
        b"MJR1", crc32 (u32), generation (u64), data length (u64), meta length (u32), 0 (u32)
        the data: the instance as a Part 10 file (none for a large one, see "file")
        the meta: JSON {"group", "name", "sidecar"} and, for a large instance, "file": the
            path of its own file (written, fdatasync'ed and its folder synced before the
            record), renamed into its group when published

The crc covers the data, the meta, then the header's fields after the crc. A record is written data
first, meta next, its header last, then the segment is `fdatasync`ed: only then is the instance
acknowledged. Records of one segment are appended in order by one thread, and each is
acknowledged only after the one before, so **the acknowledged records of a segment are exactly
its valid prefix**: replay reads records from the checkpoint on and stops at the first whose
magic, generation, lengths or crc do not check (a torn record: its instance was never
acknowledged). Reusing a segment bumps its generation (header rewritten and `fdatasync`ed
before the first record), so records of an earlier use never look valid.

The **checkpoint** is the offset below which every record is published and synced; it is
written (without a sync of its own) only after the sync of the files it covers, so it never
claims more than is durable. A segment whose records are all published is reset (generation
+1, checkpoint cleared) and reused.

**Publishing** (the receiver's publisher thread): a round writes a batch of records out as new
files, syncs them, renames them into their groups, syncs the groups, and only then moves the
checkpoints. A receiver syncs each round with one `syncfs` of the spool's filesystem and one
flush after it (`fsutil.FilesystemSync`); replay fsyncs each file and folder. The publisher
holds a burst until its associations pause, for at most a couple of seconds: see
mercli.receive.journaled.

**Replay** (`replay`): at start-up of receive and when recovery takes a dead receiver's lease,
every record of the dead owner's segments from its checkpoint on is published, synced, and the
segment is then deleted. A record published but not yet checkpointed when its process died is
published again: the same bytes under the same name replace themselves in `incoming/<series>/`
(or, if route took the series meanwhile, arrive as a resent instance would): at-least-once,
never lost.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercli.fsutil import (
    FilesystemSync,
    fsync_all,
    fsync_dir,
    make_dir,
    open_new,
    remove_tree,
    start_writeback,
    start_writeback_range,
    unlink_quietly,
    write_fd,
)
from mercli.names import new_id
from mercli.spool.items import INCOMING, INSTANCE_SUFFIX, SIDECAR_SUFFIX, LockTimeout

if TYPE_CHECKING:
    from mercli.spool.store import Spool

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
SPARE_DIR = "spare"
SEGMENT_SUFFIX = ".seg"
SEGMENT_SIZE = 16 * 1024 * 1024
HEADER_SIZE = 4096
MAX_RECORD_DATA = 8 * 1024 * 1024  # bigger instances are written as files (no gain in a journal)
SEGMENT_MAGIC = b"MERCLIJ1"
RECORD_MAGIC = b"MJR1"
_SEGMENT_HEADER = struct.Struct("<8sQQ")  # magic, generation, checkpoint
_RECORD_HEADER = struct.Struct("<4sIQQII")  # magic, crc, generation, data length, meta length, 0
RECORD_HEADER_SIZE = _RECORD_HEADER.size
_ZEROS = bytes(1024 * 1024)


def _align(offset: int) -> int:
    return (offset + 7) & ~7


class Segment:
    """One segment file, open for reading and writing."""

    def __init__(self, path: Path, fd: int, generation: int, checkpoint: int) -> None:
        self.path = path
        self.fd = fd
        self.generation = generation
        self.checkpoint = checkpoint
        self.size = os.fstat(fd).st_size

    @classmethod
    def create(cls, path: Path) -> Segment:
        """A new segment: every block written (zeros) and committed, so later writes into it
        and their `fdatasync` change no metadata."""
        fd = open_new(path, os.O_RDWR)
        try:
            written = 0
            while written < SEGMENT_SIZE:
                written += os.pwrite(fd, _ZEROS, written)
            os.pwrite(fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, 1, 0), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            unlink_quietly(path)
            raise
        fsync_dir(path.parent)
        return cls(path, fd, 1, 0)

    @classmethod
    def open(cls, path: Path) -> Segment | None:
        """An existing segment, or None if it is not one (logged)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("journal segment %s cannot be opened: %s", path, exc)
            return None
        head = os.pread(fd, _SEGMENT_HEADER.size, 0)
        if len(head) < _SEGMENT_HEADER.size or head[:8] != SEGMENT_MAGIC:
            os.close(fd)
            log.warning("%s is not a journal segment: left alone", path)
            return None
        _, generation, checkpoint = _SEGMENT_HEADER.unpack(head)
        return cls(path, fd, generation, checkpoint)

    def reset(self) -> None:
        """Make the segment empty for its next use: a new generation, durably."""
        self.generation += 1
        self.checkpoint = 0
        os.pwrite(self.fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, self.generation, 0), 0)
        os.fdatasync(self.fd)

    def set_checkpoint(self, offset: int) -> None:
        """Everything below `offset` is published and synced (call only after that sync)."""
        if offset > self.checkpoint:
            self.checkpoint = offset
            header = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, self.generation, offset)
            os.pwrite(self.fd, header, 0)

    def records(self) -> Iterator[Record]:
        """The valid records from the checkpoint on, in order (stops at the first torn one)."""
        offset = max(HEADER_SIZE, self.checkpoint)
        while offset + RECORD_HEADER_SIZE <= self.size:
            record = self.record_at(offset)
            if record is None:
                return
            yield record
            offset = record.end

    def record_at(self, offset: int) -> Record | None:
        head = os.pread(self.fd, RECORD_HEADER_SIZE, offset)
        if len(head) < RECORD_HEADER_SIZE:
            return None
        magic, crc, generation, data_length, meta_length, _ = _RECORD_HEADER.unpack(head)
        data_offset = offset + RECORD_HEADER_SIZE
        end = data_offset + data_length + meta_length
        if magic != RECORD_MAGIC or generation != self.generation or end > self.size:
            return None
        check = 0
        position, left = data_offset, data_length + meta_length
        while left:
            chunk = os.pread(self.fd, min(left, 1 << 20), position)
            if not chunk:
                return None
            check = zlib.crc32(chunk, check)
            position += len(chunk)
            left -= len(chunk)
        if zlib.crc32(head[8:], check) != crc:
            return None
        try:
            meta = json.loads(os.pread(self.fd, meta_length, data_offset + data_length))
            group, name, sidecar = str(meta["group"]), str(meta["name"]), meta["sidecar"]
            file = str(meta.get("file", ""))
        except (ValueError, KeyError, TypeError):
            return None
        return Record(
            self, offset, _align(end), data_offset, data_length, group, name, sidecar, file
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Record:
    """One journaled instance: where its data lies, and where it goes."""

    segment: Segment
    offset: int
    end: int  # where the next record starts
    data_offset: int
    data_length: int
    group: str  # incoming/<group>/
    name: str  # <name>.dcm and <name>.tags
    sidecar: dict[str, Any]
    file: str = ""  # a large instance's own file (synced), instead of data in the record


class RecordWriter:
    """Appends one record to a segment at `offset`: `write` the data (False once it would not
    fit), then `commit` with the meta; only after `commit` returned is the record durable."""

    def __init__(self, segment: Segment, offset: int) -> None:
        self.segment = segment
        self.offset = offset
        self.position = offset + RECORD_HEADER_SIZE
        self.limit = min(segment.size, self.position + MAX_RECORD_DATA)
        self.crc = 0
        self.buffer = bytearray()
        self.length = 0

    def fits(self, more: int) -> bool:
        return self.position + len(self.buffer) + more <= self.limit

    def write(self, data: bytes | memoryview) -> None:
        self.buffer += data
        self.length += len(data)
        if len(self.buffer) >= 256 * 1024:
            self.flush()

    def flush(self, *, writeback: bool = True) -> None:
        """Write out what is buffered. `writeback` starts it on its way to the disk while the
        rest arrives (the commit's `fdatasync` then waits for the tail only); not for the
        last piece before a commit: its page also takes the record header, and a page under
        writeback is written twice (measured: 14 % of a small instance's time)."""
        if self.buffer:
            self.crc = zlib.crc32(self.buffer, self.crc)
            _pwrite_all(self.segment.fd, self.buffer, self.position)
            if writeback:
                start_writeback_range(self.segment.fd, self.position, len(self.buffer))
            self.position += len(self.buffer)
            self.buffer = bytearray()

    def head(self, size: int) -> bytes:
        """The first `size` bytes of the data written so far (for parsing the header)."""
        self.flush(writeback=False)
        start = self.offset + RECORD_HEADER_SIZE
        return os.pread(self.segment.fd, min(size, self.length), start)

    @property
    def data_offset(self) -> int:
        return self.offset + RECORD_HEADER_SIZE

    def commit(self, group: str, name: str, sidecar: dict[str, Any], file: str = "") -> Record:
        """Write the meta and the header, `fdatasync`: the record is durable on return.
        ValueError if the meta does not fit the segment (the caller writes a file instead).
        `file`: the instance is that file (written and synced by the caller), not data here."""
        self.flush(writeback=False)
        document = {"group": group, "name": name, "sidecar": sidecar}
        if file:
            document["file"] = file
        meta = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
        end = self.position + len(meta)
        if end > self.segment.size:
            raise ValueError("the record does not fit the segment")
        fields = struct.pack("<QQII", self.segment.generation, self.length, len(meta), 0)
        header_crc = zlib.crc32(fields, zlib.crc32(meta, self.crc))
        _pwrite_all(self.segment.fd, meta, self.position)
        head = _RECORD_HEADER.pack(
            RECORD_MAGIC, header_crc, self.segment.generation, self.length, len(meta), 0
        )
        os.pwrite(self.segment.fd, head, self.offset)
        os.fdatasync(self.segment.fd)
        return Record(
            self.segment,
            self.offset,
            _align(end),
            self.data_offset,
            self.length,
            group,
            name,
            sidecar,
            file,
        )


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def write_published(record: Record, data_path: Path, tags_path: Path) -> None:
    """The record's instance and sidecar as two new files (written, not yet synced); only
    the sidecar for a record whose instance is a file of its own."""
    sidecar = json.dumps(record.sidecar, ensure_ascii=False, separators=(",", ":"))
    if record.file:
        write_fd(open_new(tags_path), sidecar.encode(), sync=False)  # closes it
        return
    data_fd = open_new(data_path)
    try:
        copied, left = 0, record.data_length
        while left:
            done = os.copy_file_range(
                record.segment.fd, data_fd, left, record.data_offset + copied, copied
            )
            if done == 0:
                raise OSError(f"journal record at {record.offset} ends early")
            copied += done
            left -= done
        start_writeback(data_fd)
    finally:
        os.close(data_fd)
    write_fd(open_new(tags_path), sidecar.encode(), sync=False)  # closes it


def _sidecar_published(spool: Spool, record: Record) -> bool:
    """Whether the instance of a record with a file of its own is whole in incoming/: its
    `.tags` there, or its `.dcm` not (its group was routed on, the pair with it). Publishing
    renames the `.dcm` first (protocol step 2), so a `.dcm` alone means a crash came between
    the two renames."""
    group = spool.state_dir(INCOMING) / record.group
    if (group / f"{record.name}{SIDECAR_SUFFIX}").exists():
        return True
    return not (group / f"{record.name}{INSTANCE_SUFFIX}").exists()


def owner_folder(root: Path, owner: str) -> Path:
    return root / JOURNAL_DIR / owner


def segment_files(folder: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    return [folder / name for name in names if name.endswith(SEGMENT_SUFFIX)]


def remove_owner(root: Path, owner: str) -> None:
    remove_tree(owner_folder(root, owner))


def ensure_folder(root: Path, owner: str) -> Path:
    folder = owner_folder(root, owner)
    if make_dir(root / JOURNAL_DIR, exist_ok=True):
        fsync_dir(root)
    if make_dir(folder, exist_ok=True):
        fsync_dir(folder.parent)
    return folder


def publish(
    spool: Spool,
    records: Sequence[Record],
    scratch: Path,
    *,
    replayed: bool = False,
    wait: float | None = None,
    filesystem: FilesystemSync | None = None,
) -> list[Record]:
    """Publish journaled instances into `incoming/`, durably, with as few syncs as the batch
    allows: every file written, all fsync'ed at once, renamed into their groups (protocol step
    2: `.dcm` before `.tags`), every group fsync'ed at once. Returns the records whose group
    stayed locked past `wait` seconds (LockTimeout): not published, to be tried again.

    Its files are prepared in `scratch` (the publishing worker's: recovery reaps it). With
    `filesystem` (the spool's), each of the two rounds of syncs is one `syncfs` (a receiver's
    publisher, whose batches are large); without, each file and folder is fsync'ed.
    Idempotent: a record published twice replaces its own copy (replay after a crash)."""
    prepared: list[tuple[Record, Path | None, Path]] = []
    deferred: list[Record] = []
    made: list[Path] = []  # files made here (a large instance's own file is not one)
    try:
        for record in records:
            tags = scratch / f"journal.{new_id()}"
            data: Path | None
            if record.file:
                data = Path(record.file)
                if not data.exists():  # renamed into its group before a crash kept the record
                    if _sidecar_published(spool, record):
                        continue  # whole, or routed on: done
                    data = None  # killed between the two renames: the sidecar is left
            else:
                data = scratch / f"journal.{new_id()}"
                made.append(data)
            made.append(tags)
            prepared.append((record, data, tags))
            write_published(record, data or tags, tags)
        if filesystem is None:
            fsync_all(made)
        elif made:
            filesystem.sync(made)
        groups = set()
        locked: set[str] = set()  # groups whose lock timed out this round: not tried again
        for record, data, tags in prepared:
            if record.group in locked:
                deferred.append(record)
                continue
            files = [] if data is None else [(data, f"{record.name}{INSTANCE_SUFFIX}")]
            files.append((tags, f"{record.name}{SIDECAR_SUFFIX}"))
            try:
                replaced = spool.publish_to_group(
                    INCOMING, record.group, files, sync=False, wait=wait
                )
            except LockTimeout:
                deferred.append(record)
                locked.add(record.group)  # its other records wait with it, not `wait` each
                continue
            groups.add(record.group)
            spool.log(
                "received",
                series=record.group,
                instance=record.name,
                sender=record.sidecar.get("SenderAET", ""),
                replaced=replaced,
                **({"replayed": True} if replayed else {}),
            )
        folders = [spool.state_dir(INCOMING) / group for group in sorted(groups)]
        if filesystem is None:
            fsync_all([], folders)
        elif folders:
            filesystem.sync((), folders)
    finally:
        for path in made:
            unlink_quietly(path)  # gone already once published
    return deferred


def replay(spool: Spool, owner: str) -> int:
    """Publish what a dead receiver acknowledged but had not published; its journal is then
    deleted. Returns how many instances were published."""
    folder = owner_folder(spool.root, owner)
    count = 0
    scratch = spool.tmp / owner  # the dead owner's scratch: recovery removes it afterwards
    if segment_files(folder):
        make_dir(scratch, exist_ok=True)
    for path in segment_files(folder):
        segment = Segment.open(path)
        if segment is None:
            continue
        try:
            records = list(segment.records())
            for start in range(0, len(records), 256):
                batch = records[start : start + 256]
                deferred = publish(spool, batch, scratch, replayed=True)
                if deferred:  # the journal stays; the next recovery tries again
                    raise LockTimeout(f"incoming/{deferred[0].group} stays locked")
                count += len(batch)
        finally:
            segment.close()
        unlink_quietly(path)
    remove_tree(folder)
    if count:
        log.info("journal of %s: %d acknowledged instance(s) published", owner, count)
    return count
