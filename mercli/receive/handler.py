"""The C-STORE SCP: turns each received instance into a durable `.dcm` + `.tags` in incoming/.

What we acknowledge we must never lose, so the order is fixed:

1. The upper layer (`mercli.dicom.scp.listener`) streams the dataset, exactly as sent, into a file
   in this worker's scratch folder behind a Part 10 header naming the negotiated transfer syntax:
   memory stays flat whatever the size, and the bytes are never decoded and re-encoded.
2. The sidecar is extracted from that file (`mercli.tags.read_tags`, header only).
3. Both are fsync'ed and published into `incoming/<series>/` (`Spool.publish_to_group`).
4. Only then is success (0x0000) answered. Any write error answers 0xA700 (out of resources)
   and leaves nothing half-written; an instance whose UIDs cannot be read answers 0xC210 or
   0xC212 and is quarantined in `error/` with the reason.

When an association ends, a hint per series it carried is written to `hints/`, so `route` can
act seconds after a sender is done instead of waiting out the series timeout.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from mercli.dicom import ACSE_TIMEOUT, DEFAULT_AET, NETWORK_TIMEOUT
from mercli.dicom.part10 import file_meta
from mercli.dicom.scp.listener import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    AssociationInfo,
    Listener,
    StoreRequest,
)
from mercli.dicom.tls import TlsConfigError, server_context
from mercli.errors import ListenError
from mercli.fsutil import fsync_dir, open_new, start_writeback_range, unlink_quietly, write_fd
from mercli.names import printable, safe_name
from mercli.receive.journaled import HEAD, Appender, Journal, SegmentView, instance_names
from mercli.spool import INCOMING, Spool, Worker
from mercli.spool.journal import RecordWriter
from mercli.tags import UnreadableDicom, read_tags

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # write failure, full disk: the sender may retry later
STATUS_UNREADABLE = 0xC210  # cannot understand: the dataset does not parse
STATUS_NO_UIDS = 0xC212  # cannot understand: SOP/Series/Study Instance UID missing
REQUIRED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
LARGE = 256 * 1024  # bytes past which an instance is journaled as a file of its own
WRITEBACK_EVERY = 256 * 1024  # bytes of a file written between two writeback starts


@dataclass(frozen=True)
class ReceiveConfig:
    """Options of `mercli receive`; the one place their defaults live."""

    host: str = "0.0.0.0"
    port: int = 11112
    aet: str = DEFAULT_AET
    allow_aets: tuple[str, ...] = ()  # calling AE titles accepted; empty = any
    any_called_aet: bool = False  # accept whatever AE title the sender calls us by
    max_associations: int = 32
    processes: int | None = None  # --processes; None: `listeners` / `publishers` choose
    extra_tags: tuple[str, ...] = ()
    network_timeout: float = NETWORK_TIMEOUT  # idle between PDUs, and the most one PDU may take
    acse_timeout: float = ACSE_TIMEOUT  # for the whole association request, from connecting
    shutdown_grace: float = 30.0  # seconds open associations get on SIGTERM before A-ABORT
    engine: str = "pynetdicom"  # or "dcmtk": storescp + getdcmtags (mercli.receive.dcmtk.engine)
    # DICOM TLS (SPEC §6.1): on with tls_cert; on tls_port (and port stays plain), else on port
    tls_cert: str | None = None
    tls_key: str | None = None  # None: the key is in tls_cert
    tls_ca: str | None = None  # verifies client certificates (those presented, or required)
    tls_require_client_cert: bool = False
    tls_port: int | None = None
    journal: bool = True  # durable receipt through the write-ahead journal (mercli.spool.journal)

    @property
    def listeners(self) -> int:
        """Listening processes of the default engine: --processes, else the CPUs, at most 8."""
        return self.processes or min(os.cpu_count() or 1, 8)

    @property
    def publishers(self) -> int:
        """getdcmtags publishers of `--engine dcmtk`: --processes, else a quarter of the CPUs,
        1 to 4. One publisher makes bigger batches with fewer syncfs, and leaves the CPU to
        storescp and the sender: on 2 cores, 12 KB instances reached 0.69x of `storescp -od`
        with one against 0.58x with two (0.88x against 0.80x with 4 associations)."""
        return self.processes or max(1, min(4, (os.cpu_count() or 1) // 4))

    @property
    def tls_listen_port(self) -> int | None:
        """The port that speaks TLS, or None without TLS."""
        if self.tls_cert is None:
            return None
        return self.port if self.tls_port is None else self.tls_port

    @property
    def plain_port(self) -> int | None:
        """The port that speaks plain DICOM, or None when the only port is TLS."""
        return self.port if self.tls_cert is None or self.tls_port is not None else None


# -- one instance on its way to the spool --------------------------------------------------------


class _ScratchFiles:
    """Empty files created ahead of need in the worker's scratch folder.

    Creating a file costs a journal handle, which on ext4 can wait for the commit another
    fsync started: ~0.4 ms, twice per instance (dataset and sidecar). A background thread
    creates them while the association thread waits on its fsyncs, so a C-STORE never waits
    for a create. Unused ones are removed with the scratch folder (or reaped after a crash).
    The folder is synced after each is created, before it is handed out: a large instance's
    journal record names its file, which must then exist after a power cut.
    """

    def __init__(self, worker: Worker, depth: int = 16) -> None:
        self.worker = worker
        self._ready: queue.Queue[tuple[Path, int]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="scratch-files", daemon=True)
        self._thread.start()

    def _create(self) -> tuple[Path, int]:
        path = self.worker.tmp_path()
        return path, open_new(path)

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                created = self._create()
                fsync_dir(self.worker.scratch)  # its name is durable before it is used
            except OSError:  # full disk: take() will create inline and report the error
                self._stop.wait(0.5)
                continue
            while not self._stop.is_set():
                try:
                    self._ready.put(created, timeout=0.05)
                    break
                except queue.Full:
                    continue
            else:
                os.close(created[1])
                unlink_quietly(created[0])

    def take(self) -> tuple[Path, int]:
        """A fresh (path, descriptor) opened for writing; OSError if none can be made."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            created = self._create()
            fsync_dir(self.worker.scratch)
            return created

    def close(self) -> None:
        self._stop.set()
        self._drain()  # unblocks a filler waiting on a full queue
        self._thread.join(timeout=5)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                path, fd = self._ready.get_nowait()
            except queue.Empty:
                return
            os.close(fd)
            unlink_quietly(path)


class _InstanceSink:
    """Streams one C-STORE dataset behind a Part 10 header into this worker's scratch folder.

    A write error (full disk) is remembered, the rest of the dataset is read and dropped, and
    finish() answers 0xA700: the association goes on.
    """

    def __init__(self, store: InstanceStore, info: AssociationInfo, request: StoreRequest) -> None:
        self.store = store
        self.info = info
        self.request = request
        self.path = Path()
        self.error: OSError | None = None
        self.size = 0
        self.written_back = 0
        self.file: BinaryIO | None = None
        try:
            self.path, fd = store.scratch.take()
            self.file = os.fdopen(fd, "wb", buffering=256 * 1024)
            self.file.write(
                file_meta(
                    request.sop_class,
                    request.sop_instance,
                    request.transfer_syntax,
                    info.calling_aet,
                )
            )
        except OSError as exc:
            self.error = exc

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.error is None and self.file is not None:
            try:
                self.file.write(data)
                if self.size - self.written_back >= WRITEBACK_EVERY:
                    self.file.flush()  # on its way to the disk while the rest arrives
                    start_writeback_range(self.file.fileno(), self.written_back, 0)
                    self.written_back = self.size
            except OSError as exc:
                self.error = exc

    def finish(self) -> int:
        try:
            return self.store.complete(self)
        finally:
            self.discard()

    def keep(self) -> Path:
        """Close the file and leave it in scratch (a journal record names it); its path."""
        path, self.path = self.path, Path()
        if self.file is not None:
            self.file.close()
            self.file = None
        return path

    def discard(self) -> None:
        """Close and remove the scratch file (gone already if it was published)."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self.error = self.error or exc
            self.file = None
        unlink_quietly(self.path)

    def flush(self) -> int:
        """Flush buffered data; returns the descriptor. Raises the first write error."""
        if self.error is not None:
            raise self.error
        assert self.file is not None
        self.file.flush()
        return self.file.fileno()


class _JournalSink:
    """Streams one C-STORE dataset behind a Part 10 header into the association's journal
    segment; an instance that outgrows the journal continues in a scratch file
    (`_InstanceSink`, the direct path)."""

    def __init__(
        self, store: InstanceStore, journal: Journal, info: AssociationInfo, request: StoreRequest
    ) -> None:
        self.store = store
        self.journal = journal
        self.info = info
        self.request = request
        self.appender = store.appender(info)
        self.fallback: _InstanceSink | None = None
        self.large = False  # in a file of its own, named by its journal record
        self.writer: RecordWriter | None = None
        self.error: OSError | None = None
        self.size = 0
        self.meta = file_meta(
            request.sop_class, request.sop_instance, request.transfer_syntax, info.calling_aet
        )
        try:
            self.writer = journal.writer(self.appender)
            if not self.writer.fits(len(self.meta) + 64 * 1024):
                journal.roll(self.appender)  # nearly full: start the instance in a new one
                self.writer = journal.writer(self.appender)
            self.writer.write(self.meta)
        except OSError as exc:  # no segment to be had (a full disk): the direct path
            log.debug("journal unavailable (%s): writing a file", exc)
            self.writer = None
            self.fallback = _InstanceSink(store, info, request)

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.fallback is not None:
            self.fallback.write(data)
            return
        if self.error is not None or self.writer is None:
            return
        try:
            large = self.writer.length + len(data) > LARGE
            if large or not self.writer.fits(len(data)):
                self.to_file(large=large)
                assert self.fallback is not None
                self.fallback.write(data)
                return
            self.writer.write(data)
        except OSError as exc:
            self.error = exc

    def to_file(self, *, large: bool = False) -> None:
        """Move what the journal holds of this instance into a scratch file and go on there:
        a `large` one stays journaled, by a record naming its file; any other takes the
        direct path."""
        writer, self.writer = self.writer, None
        assert writer is not None
        fallback = _InstanceSink(self.store, self.info, self.request)  # writes the Part 10 header
        fallback.write(writer.head(writer.length)[len(self.meta) :])
        fallback.size = self.size
        if not large:  # the segment is full
            self.journal.roll(self.appender)
        self.large = large
        self.fallback = fallback

    def finish(self) -> int:
        if self.fallback is not None and self.large and self.error is None:
            return self.store.complete_large(self)
        if self.fallback is not None:
            return self.fallback.finish()
        if self.error is not None:
            return self.store._write_failed(self.store._association(self.info), self.error)
        return self.store.complete_journaled(self)

    def discard(self) -> None:
        """An unfinished instance: nothing was committed (its bytes are overwritten by the
        next record); a scratch file it moved to is removed."""
        if self.fallback is not None:
            self.fallback.discard()


# -- the store handler ---------------------------------------------------------------------------


@dataclass
class _AssociationLog:
    sender: str
    started: float = field(default_factory=time.monotonic)
    series: set[str] = field(default_factory=set)
    instances: int = 0
    failures: int = 0
    bytes: int = 0


class InstanceStore:
    """The upper layer's StoreHandler: admission, durable instances, hints and logs."""

    def __init__(self, spool: Spool, worker: Worker, config: ReceiveConfig) -> None:
        self.spool = spool
        self.worker = worker
        self.config = config
        self._associations: dict[int, _AssociationLog] = {}
        self._lock = threading.Lock()
        # fsyncs of an instance and its sidecar overlap; one journal commit can serve both
        self._sync_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self.scratch = _ScratchFiles(worker)
        self.journal = Journal(spool, worker) if config.journal else None
        self._appenders: dict[int, Appender] = {}

    def accept(self, info: AssociationInfo) -> tuple[int, int, int] | None:
        """Association-time checks: the calling and the called AE title."""
        if self.config.allow_aets and info.calling_aet not in self.config.allow_aets:
            log.warning(
                "association from unknown AE %s (%s) rejected",
                printable(info.calling_aet),
                printable(info.address),
            )
            return REJECT_CALLING_AE
        if not self.config.any_called_aet and info.called_aet != self.config.aet:
            log.warning(
                "association from %s calling us %s, not %s, rejected",
                printable(info.calling_aet),
                printable(info.called_aet),
                self.config.aet,
            )
            return REJECT_CALLED_AE
        return None

    def begin_store(
        self, info: AssociationInfo, request: StoreRequest
    ) -> _InstanceSink | _JournalSink:
        if self.journal is not None:
            return _JournalSink(self, self.journal, info, request)
        return _InstanceSink(self, info, request)

    def appender(self, info: AssociationInfo) -> Appender:
        with self._lock:
            found = self._appenders.get(id(info))
            if found is None:
                found = self._appenders[id(info)] = Appender()
            return found

    def complete_journaled(self, sink: _JournalSink) -> int:
        """Commit one instance to the journal (one fdatasync), then answer success; it is
        published into incoming/ behind the answer (mercli.receive.journaled)."""
        association = self._association(sink.info)
        writer = sink.writer
        assert writer is not None
        try:
            if writer.length <= HEAD:
                source: Any = io.BytesIO(writer.head(HEAD))
            else:
                writer.flush()
                source = SegmentView(writer.segment.fd, writer.data_offset, writer.length)
            tags = read_tags(source, extra=self.config.extra_tags)
            missing = [uid for uid in REQUIRED_UIDS if not tags.get(uid)]
            if missing:
                return self._quarantine_copy(sink, f"missing {', '.join(missing)}", association)
            sidecar = {**tags, **self._receive_metadata(sink.info)}
            series, instance = instance_names(sidecar)
            try:
                record = writer.commit(series, instance, sidecar)
            except ValueError:  # the sidecar does not fit the segment: a file instead
                sink.to_file()
                assert sink.fallback is not None
                return sink.fallback.finish()
            sink.journal.committed(sink.appender, record)
        except UnreadableDicom as exc:
            return self._quarantine_copy(sink, str(exc), association)
        except OSError as exc:
            return self._write_failed(association, exc)
        return self._stored(association, series, sink.size)

    def complete_large(self, sink: _JournalSink) -> int:
        """A large instance: its own scratch file, `fdatasync`ed, then a journal record that
        names it (one more small `fdatasync`), then success; published behind the answer by
        a rename, so its bytes are written once. The direct path if the journal fails."""
        file = sink.fallback
        assert file is not None
        association = self._association(sink.info)
        try:
            os.fdatasync(file.flush())
            tags = read_tags(file.path, extra=self.config.extra_tags)
            missing = [uid for uid in REQUIRED_UIDS if not tags.get(uid)]
            if missing:
                try:
                    return self._quarantine(file, f"missing {', '.join(missing)}", association)
                finally:
                    file.discard()
            sidecar = {**tags, **self._receive_metadata(sink.info)}
            series, instance = instance_names(sidecar)
            try:
                writer = sink.journal.writer(sink.appender)
                record = writer.commit(series, instance, sidecar, file=str(file.path))
            except (OSError, ValueError):  # no room for the record: the direct path
                return file.finish()
            sink.journal.committed(sink.appender, record)
            file.keep()
        except UnreadableDicom as exc:
            try:
                return self._quarantine(file, str(exc), association)
            finally:
                file.discard()
        except OSError as exc:
            file.discard()
            return self._write_failed(association, exc)
        return self._stored(association, series, sink.size)

    def _quarantine_copy(
        self, sink: _JournalSink, reason: str, association: _AssociationLog
    ) -> int:
        """Quarantine an instance the journal holds (not committed): through a scratch file."""
        sink.to_file()
        assert sink.fallback is not None
        try:
            sink.fallback.flush()
            return self._quarantine(sink.fallback, reason, association)
        except OSError as exc:
            log.error("cannot quarantine an unreadable instance: %s", exc)
            return STATUS_OUT_OF_RESOURCES
        finally:
            sink.fallback.discard()

    def complete(self, sink: _InstanceSink) -> int:
        """Make one instance durable in incoming/, then (and only then) answer success."""
        association = self._association(sink.info)
        try:
            # The dataset's fsync runs while its sidecar is parsed, written and fsync'ed.
            synced = self._sync_pool.submit(os.fsync, sink.flush())
            try:
                tags = read_tags(sink.path, extra=self.config.extra_tags)
                missing = [uid for uid in REQUIRED_UIDS if not tags.get(uid)]
                sidecar = {**tags, **self._receive_metadata(sink.info)}
                prepared = None if missing else self._prepare_sidecar(sidecar)
            finally:
                synced.result()
            if prepared is None:
                return self._quarantine(sink, f"missing {', '.join(missing)}", association)
            series = self._publish(sink.path, sidecar, prepared)
        except UnreadableDicom as exc:
            return self._quarantine(sink, str(exc), association)
        except OSError as exc:
            return self._write_failed(association, exc)
        return self._stored(association, series, sink.size)

    def _write_failed(self, association: _AssociationLog, exc: OSError) -> int:
        """A write error (full disk): logged, counted, answered 0xA700; the sender may retry."""
        association.failures += 1
        log.error(
            "cannot store instance from %s: %s",
            printable(association.sender),
            exc.strerror or exc,
        )
        return STATUS_OUT_OF_RESOURCES

    def _stored(self, association: _AssociationLog, series: str, size: int) -> int:
        """Count a durable instance for the association's hints and log; answer success."""
        with self._lock:
            association.series.add(series)
            association.instances += 1
            association.bytes += size
        return STATUS_SUCCESS

    def _prepare_sidecar(self, sidecar: dict[str, Any]) -> Path:
        """The sidecar, written and fsync'ed in scratch, ready to publish."""
        data = json.dumps(sidecar, ensure_ascii=False, separators=(",", ":")).encode()
        tags_path, fd = self.scratch.take()
        try:
            write_fd(fd, data)
        except BaseException:
            unlink_quietly(tags_path)
            raise
        return tags_path

    def _publish(self, path: Path, sidecar: dict[str, Any], tags_path: Path) -> str:
        series = safe_name(str(sidecar["SeriesInstanceUID"]))
        instance = safe_name(str(sidecar["SOPInstanceUID"]))
        try:
            replaced = self.spool.publish_to_group(
                INCOMING, series, [(path, f"{instance}.dcm"), (tags_path, f"{instance}.tags")]
            )
        finally:
            unlink_quietly(tags_path)
        self.spool.log(
            "received",
            series=series,
            instance=instance,
            sender=sidecar["SenderAET"],
            replaced=replaced,
        )
        if replaced:
            log.info("instance %s received again: the newer copy replaced the older", instance)
        return series

    def _receive_metadata(self, info: AssociationInfo) -> dict[str, str]:
        return {
            "SenderAET": info.calling_aet,
            "SenderAddress": info.address,
            "ReceiverAET": info.called_aet,
            "ReceivedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

    def _quarantine(self, sink: _InstanceSink, reason: str, association: _AssociationLog) -> int:
        """Keep an instance we cannot file under a series in error/, with the reason."""
        association.failures += 1
        status = STATUS_NO_UIDS if reason.startswith("missing") else STATUS_UNREADABLE
        try:
            item = self.worker.quarantine_files(
                {"instance.dcm": sink.path},
                reason,
                "receive",
                status=f"0x{status:04X}",
                **self._receive_metadata(sink.info),
            )
        except OSError as exc:
            log.error("cannot quarantine an unreadable instance: %s", exc)
            return STATUS_OUT_OF_RESOURCES
        item_id = item.name
        self.spool.log("quarantined", item=item_id, reason=reason, sender=association.sender)
        log.warning(
            "instance from %s quarantined as error/%s: %s",
            printable(association.sender),
            item_id,
            printable(reason, 200),
        )
        return status

    def _association(self, info: AssociationInfo) -> _AssociationLog:
        with self._lock:
            found = self._associations.get(id(info))
            if found is None:  # first instance of this association
                found = self._associations[id(info)] = _AssociationLog(info.calling_aet)
            return found

    def association_ended(self, info: AssociationInfo, how: str) -> None:
        """Write a completion hint per series the association carried, and log a summary."""
        with self._lock:
            association = self._associations.pop(id(info), None)
            appender = self._appenders.pop(id(info), None)
        if association is None:
            return
        hint = {"ended": how, "sender": association.sender, "instances": association.instances}
        series_list = sorted(association.series)

        def write_hints() -> None:
            for series in series_list:
                self.worker.write_hint(series, hint)

        if self.journal is not None:  # after its last instance is published, not before
            self.journal.ended(appender or Appender(), write_hints)
        else:
            write_hints()
        seconds = time.monotonic() - association.started
        if association.instances or association.failures:
            log.info(
                "association from %s %s: %d instance(s) in %d series, %.1f MB in %.1f s%s",
                printable(association.sender),
                how,
                association.instances,
                len(association.series),
                association.bytes / 1e6,
                seconds,
                f", {association.failures} failed" if association.failures else "",
            )

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()  # publishes everything acknowledged first
        self._sync_pool.shutdown(wait=True)
        self.scratch.close()


def tls_context(config: ReceiveConfig) -> ssl.SSLContext | None:
    """The TLS context of the receiving side, None without TLS; TlsConfigError naming the
    file if a certificate, key or CA cannot be used.

    With a CA but without --tls-require-client-cert, a client certificate is asked for and,
    if one is presented, must verify (DCMTK's --verify-peer-cert): an admin who names a CA
    expects it to be used. Without a CA none is asked for."""
    if config.tls_cert is None:
        return None
    for what, path in (
        ("certificate", config.tls_cert),
        ("key", config.tls_key),
        ("CA file", config.tls_ca),
    ):
        if path is not None:
            _check_readable(what, path)
    context = server_context(
        config.tls_cert, config.tls_key, config.tls_ca, config.tls_require_client_cert
    )
    if config.tls_ca and not config.tls_require_client_cert:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _check_readable(what: str, path: str) -> None:
    """TlsConfigError naming exactly this file if it cannot be opened (OpenSSL's own error
    for a missing key names the certificate it was loading with)."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TlsConfigError(f"TLS {what} {path}: no such file") from None
    except OSError as exc:
        raise TlsConfigError(f"TLS {what} {path}: cannot be read ({exc.strerror})") from None


def start_listener(config: ReceiveConfig, store: InstanceStore) -> Listener:
    """Bind and start accepting in background threads; ListenError if a port is unusable."""
    try:
        listener = Listener(
            config.host,
            config.port,
            store,
            max_associations=config.max_associations,
            acse_timeout=config.acse_timeout,
            network_timeout=config.network_timeout,
            tls=tls_context(config),
            tls_port=config.tls_port,
        )
    except OSError as exc:
        ports = f"{config.port}" + (f" or {config.tls_port}" if config.tls_port else "")
        raise ListenError(f"cannot listen on {config.host}:{ports}: {exc.strerror or exc}") from exc
    return listener.start()
