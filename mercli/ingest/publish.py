"""Publishing files into incoming/ through receive's own store handler.

An `Ingester` is to files what an association is to `receive`: it opens one
(`AssociationInfo` with calling AE = `--sender-aet`, address `file`), hands each instance to
`InstanceStore.begin_store`, streams the data set into the sink that returns, and calls
`finish()` — the very calls `mercli.dicom.scp` makes per C-STORE. So the Part 10 header, the
sidecar, the fsyncs, the rename into `incoming/<series>/`, the `received` event, the duplicate
rule (a SOP Instance UID already in an unrouted series is replaced) and the quarantine of
unreadable instances (0xC210/0xC212 into `error/`) are receive's, not copies of it. `end()`
is the association's release: a completion hint per series, so `route` completes them
`settle` after the ingest ends.

Bounded: data is streamed in 1 MiB pieces (memory flat whatever the size), an instance larger
than `max_size` is refused, and zip archives are read in place (never extracted) within
`zip_max_total` uncompressed bytes, `zip_max_ratio` and `zip_max_members`.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from mercli.dicom import DEFAULT_AET
from mercli.dicom.part10 import file_meta
from mercli.dicom.scp.connection import StoreRequest
from mercli.dicom.scp.negotiation import AssociationInfo
from mercli.errors import SpoolError
from mercli.fsutil import open_new, unlink_quietly
from mercli.ingest.header import HEAD_SIZE, BadHeader, Header, NotDicom, looks_like_zip, read_header
from mercli.names import printable, safe_name
from mercli.receive.handler import REQUIRED_UIDS, STATUS_SUCCESS, InstanceStore, ReceiveConfig
from mercli.spool import Spool, Worker
from mercli.tags import UnreadableDicom, read_tags

log = logging.getLogger(__name__)

SENDER_ADDRESS = "file"
CHUNK = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class IngestConfig:
    """Options of `mercli ingest` and `mercli watch`; the one place their defaults live."""

    sender_aet: str = "INGEST"
    receiver_aet: str = DEFAULT_AET  # the sidecar's ReceiverAET, as if sent to `receive`
    extra_tags: tuple[str, ...] = ()
    max_size: int = 4 * GiB  # one instance (a file, or a zip member uncompressed)
    zip_max_total: int = 64 * GiB  # all members of one archive, uncompressed
    zip_max_ratio: int = 1000  # uncompressed : compressed, for members over 1 MiB
    zip_max_members: int = 100_000
    zip_max_directory: int = 64 << 20  # bytes of central directory
    dry_run: bool = False


@dataclass
class FileResult:
    """What became of one file (a plain file: ordinal 0; an archive: one per member)."""

    label: str
    published: list[tuple[str, str]] = field(default_factory=list)  # (series, instance)
    quarantined: list[str] = field(default_factory=list)  # "label: reason", kept in error/
    failed: list[str] = field(default_factory=list)  # "label: reason", not ingested at all
    skipped: int = 0  # parts that are not DICOM instances (README.txt, DICOMDIR, nested zips)
    already: int = 0  # parts a journal says were published before (watch)

    @property
    def whole(self) -> bool:
        """Everything in it is in the spool (incoming/) and nothing else was in it."""
        return not (self.quarantined or self.failed or self.skipped)

    @property
    def not_dicom(self) -> bool:
        return self.skipped > 0 and not (self.published or self.quarantined or self.failed)


# called after each instance is durable: (ordinal in the file, series, instance)
OnInstance = Callable[[int, str, str], None]


class Ingester:
    """Publishes files into one spool as `receive` would; use as a context manager."""

    def __init__(self, spool: Spool | None, worker: Worker | None, config: IngestConfig) -> None:
        self.config = config
        self.worker = worker
        self.store: InstanceStore | None = None
        if not config.dry_run:
            assert spool is not None and worker is not None
            # Not through receive's journal: an instance is in incoming/ when finish() returns,
            # which the watcher's own record of what it published (exactly once per kill)
            # relies on; a journal would publish behind the answer and replay a whole batch.
            receive = ReceiveConfig(
                aet=config.receiver_aet, extra_tags=config.extra_tags, journal=False
            )
            self.store = InstanceStore(spool, worker, receive)
        self.info = self._new_association()
        self._message_id = 0

    def __enter__(self) -> Ingester:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _new_association(self) -> AssociationInfo:
        return AssociationInfo(
            calling_aet=self.config.sender_aet,
            called_aet=self.config.receiver_aet,
            address=SENDER_ADDRESS,
        )

    def end(self) -> None:
        """Like an association's release: a completion hint for each series published."""
        if self.store is not None:
            self.store.association_ended(self.info, "released")
        self.info = self._new_association()

    def close(self) -> None:
        """End the association and close the store: with receive's journal, everything
        acknowledged is published into incoming/ before this returns."""
        if self.store is not None:
            store, journal = self.store, self.store.journal
            self.end()
            self.store = None
            store.close()
            if journal is not None and journal.folder.exists():
                # close() leaves the journal only when it could not publish (a full disk):
                # the instances are durable there, recovery publishes them later
                log.error(
                    "some ingested instances are not in incoming/ yet: they stay in %s and "
                    "the next recovery (any mercli command) publishes them",
                    journal.folder,
                )

    # -- one file -------------------------------------------------------------------------------

    def ingest_file(
        self,
        path: Path,
        *,
        follow: bool = False,
        skip: Set[int] = frozenset(),
        on_instance: OnInstance | None = None,
    ) -> FileResult:
        """Publish what one file holds: an instance, or the members of a zip archive.

        `skip`: ordinals already published (a journal's); `on_instance` is called once each
        new instance is durable. SpoolError if the spool cannot be written.
        """
        label = printable(path, 200)
        result = FileResult(label)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            result.failed.append(f"{label}: cannot open: {exc.strerror or exc}")
            return result
        with os.fdopen(fd, "rb") as fp:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                result.failed.append(f"{label}: not a regular file")
                return result
            head = _read_head(fp)
            if looks_like_zip(head):
                fp.seek(0)
                self._archive(fp, info.st_size, result, skip, on_instance)
            elif 0 not in skip:
                self._instance(fp, head, info.st_size, 0, label, result, on_instance)
            else:
                result.already += 1
        return result

    def _archive(
        self,
        fp: IO[bytes],
        size: int,
        result: FileResult,
        skip: Set[int],
        on_instance: OnInstance | None,
    ) -> None:
        """Every member read in place; names are labels only, never paths we write to."""
        try:
            self._check_directory(fp, size)
            archive = zipfile.ZipFile(fp)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as exc:
            result.failed.append(f"{result.label}: unreadable zip archive: {exc}")
            return
        total = 0
        with archive:
            for ordinal, member in enumerate(archive.infolist()):
                if member.is_dir():
                    continue
                if ordinal in skip:
                    result.already += 1
                    continue
                label = f"{result.label}:{printable(member.filename, 200)}"
                refusal = self._refuse_member(member, total)
                if refusal:
                    result.failed.append(f"{label}: {refusal}")
                    if "archive" in refusal:
                        return
                    continue
                total += member.file_size
                try:
                    with archive.open(member) as stream:
                        head = _read_head(stream)
                        self._instance(
                            stream, head, member.file_size, ordinal, label, result, on_instance
                        )
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error) as exc:
                    result.failed.append(f"{label}: unreadable member: {exc}")

    def _check_directory(self, fp: IO[bytes], size: int) -> None:
        """Bound the central directory before zipfile loads it all into memory."""
        tail_size = min(size, 65536 + 22)
        fp.seek(size - tail_size)
        tail = fp.read(tail_size)
        fp.seek(0)
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or end + 22 > len(tail):
            return  # zipfile will say what is wrong
        entries, directory = struct.unpack_from("<HI", tail, end + 10)
        if entries != 0xFFFF and entries > self.config.zip_max_members:
            raise ValueError(f"{entries} members, more than {self.config.zip_max_members}")
        if directory != 0xFFFFFFFF and directory > self.config.zip_max_directory:
            raise ValueError(f"central directory of {directory} bytes")

    def _refuse_member(self, member: zipfile.ZipInfo, total: int) -> str | None:
        config = self.config
        if member.flag_bits & 0x1:
            return "encrypted member"
        if member.file_size > config.max_size:
            return f"{member.file_size} bytes uncompressed, more than --max-size"
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > (1 << 20) and ratio > config.zip_max_ratio:
            return f"compression ratio {ratio:.0f}:1, more than {config.zip_max_ratio}:1"
        if total + member.file_size > config.zip_max_total:
            return f"archive expands past {config.zip_max_total} bytes: the rest is refused"
        return None

    # -- one instance ---------------------------------------------------------------------------

    def _instance(
        self,
        stream: IO[bytes],
        head: bytes,
        size: int,
        ordinal: int,
        label: str,
        result: FileResult,
        on_instance: OnInstance | None,
    ) -> None:
        try:
            header = read_header(head)
        except NotDicom:
            result.skipped += 1
            log.debug("%s: not DICOM, skipped", label)
            return
        except BadHeader as exc:
            self._quarantine_raw(stream, head, label, str(exc), result)
            return
        if header.is_dicomdir:
            result.skipped += 1  # directory records, not an instance
            return
        if size > self.config.max_size:
            result.failed.append(f"{label}: {size} bytes, more than --max-size")
            return
        try:
            series, reason = self._outcome(stream, head, header, size)
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            result.failed.append(f"{label}: cannot read: {exc}")
            return
        if self.store is None:  # dry run
            if series is None:
                result.quarantined.append(f"{label}: {reason}")
            else:
                result.published.append((series, safe_name(header.sop_instance)))
            return
        status = self._store(stream, head, header, label, result)
        if status is None:
            return
        if status == STATUS_SUCCESS and series is None:
            # receive read a series where we read none: it is in incoming/, under a name we
            # cannot report; keep the source (not `whole`) and say so
            result.failed.append(f"{label}: stored, but its series could not be determined")
            log.error("%s: receive stored it, but its series could not be determined", label)
        elif status == STATUS_SUCCESS:
            assert series is not None
            instance = safe_name(header.sop_instance)
            result.published.append((series, instance))
            if on_instance is not None:
                on_instance(ordinal, series, instance)
        else:
            result.quarantined.append(f"{label}: {reason or f'status 0x{status:04X}'}")

    def _outcome(
        self, stream: IO[bytes], head: bytes, header: Header, size: int
    ) -> tuple[str | None, str]:
        """(series, "") as receive will file this instance, or (None, reason) as receive will
        quarantine it: receive's sidecar reader run on the very bytes receive parses (its
        Part 10 header, then the data set), with receive's test of the required UIDs. Known
        before storing, so it holds however receive publishes (directly, or through its
        journal behind the acknowledgement). `stream` is left just after `head`."""
        meta = file_meta(
            header.sop_class, header.sop_instance, header.transfer_syntax, self.info.calling_aet
        )
        view = _Part10View(meta, head, header.dataset_offset, stream, size)
        try:
            tags = read_tags(cast(BinaryIO, view), extra=self.config.extra_tags)
        except UnreadableDicom as exc:
            return None, str(exc)
        finally:
            view.restore()
        missing = [uid for uid in REQUIRED_UIDS if not tags.get(uid)]
        if missing:
            return None, f"missing {', '.join(missing)}"
        return safe_name(str(tags["SeriesInstanceUID"])), ""

    def _store(
        self, stream: IO[bytes], head: bytes, header: Header, label: str, result: FileResult
    ) -> int | None:
        """Stream one data set through receive's sink; its status, None if not stored."""
        assert self.store is not None
        self._message_id = self._message_id % 0xFFFF + 1
        request = StoreRequest(
            context_id=1,
            sop_class=header.sop_class,
            sop_instance=header.sop_instance,
            transfer_syntax=header.transfer_syntax,
            message_id=self._message_id,
        )
        sink = self.store.begin_store(self.info, request)
        try:
            sink.write(memoryview(head)[header.dataset_offset :])
            copied = len(head)
            while chunk := stream.read(CHUNK):
                copied += len(chunk)
                if copied > self.config.max_size:
                    result.failed.append(f"{label}: more than --max-size bytes")
                    sink.discard()
                    return None
                sink.write(chunk)
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            sink.discard()
            result.failed.append(f"{label}: cannot read: {exc}")
            return None
        except BaseException:
            sink.discard()
            raise
        status = sink.finish()
        if status not in (STATUS_SUCCESS, 0xC210, 0xC212):
            raise SpoolError(f"cannot write into the spool; see the log ({label})")
        return status

    def _quarantine_raw(
        self, stream: IO[bytes], head: bytes, label: str, reason: str, result: FileResult
    ) -> None:
        """A file that looks like DICOM but whose header is unreadable: kept as it is."""
        result.quarantined.append(f"{label}: {reason}")
        if self.store is None or self.worker is None:
            return
        path = self.worker.tmp_path()
        fd = open_new(path)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(head)
                copied = len(head)
                while (chunk := stream.read(CHUNK)) and copied <= self.config.max_size:
                    out.write(chunk)
                    copied += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            metadata = {
                "SenderAET": self.info.calling_aet,
                "SenderAddress": self.info.address,
                "ReceiverAET": self.info.called_aet,
                "ReceivedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            item = self.worker.quarantine_files(
                {"instance.dcm": path}, reason, "ingest", source=label, **metadata
            )
        except BaseException:
            unlink_quietly(path)
            raise
        self.worker.spool.log("quarantined", item=item.name, reason=reason, sender="ingest")


class _Part10View(io.RawIOBase):
    """Receive's Part 10 header followed by a source's data set, as one read-only file: the
    bytes receive stores and parses. Served from `head` (in memory) as far as it goes, then
    from `stream`; `restore()` puts `stream` back just after `head`."""

    def __init__(
        self, meta: bytes, head: bytes, dataset_offset: int, stream: IO[bytes], size: int
    ) -> None:
        self.meta, self.head, self.offset, self.stream = meta, head, dataset_offset, stream
        whole = len(head) < HEAD_SIZE  # the head is the whole file
        self.length = len(meta) + (len(head) if whole else max(size, len(head))) - dataset_offset
        self.position = 0
        self.moved = False

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

    def read(self, size: int | None = -1) -> bytes:
        left = self.length - self.position
        size = left if size is None or size < 0 else min(size, left)
        parts = []
        while size > 0:
            if self.position < len(self.meta):
                data = self.meta[self.position : self.position + size]
            else:
                source = self.position - len(self.meta) + self.offset  # in the source file
                if source < len(self.head):
                    data = self.head[source : source + size]
                else:
                    if not self.moved or self.stream.tell() != source:
                        self.stream.seek(source)
                    self.moved = True
                    data = self.stream.read(size)
            if not data:
                break
            parts.append(data)
            self.position += len(data)
            size -= len(data)
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def restore(self) -> None:
        if self.moved:
            self.stream.seek(len(self.head))
            self.moved = False


def _read_head(stream: IO[bytes]) -> bytes:
    """Up to HEAD_SIZE bytes (short only at the end of the data)."""
    parts = []
    wanted = HEAD_SIZE
    while wanted:
        data = stream.read(wanted)
        if not data:
            break
        parts.append(data)
        wanted -= len(data)
    return b"".join(parts)
