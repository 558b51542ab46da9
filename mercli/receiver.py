"""The C-STORE SCP: turns each received instance into a durable `.dcm` + `.tags` in incoming/.

What we acknowledge we must never lose, so the order is fixed:

1. pynetdicom streams the dataset, exactly as sent, into a file in this worker's scratch folder
   (`STORE_RECV_CHUNKED_DATASET`: memory stays flat whatever the size, and the bytes are
   never decoded and re-encoded). The file meta header names the negotiated transfer syntax.
2. The sidecar is extracted from that file (`mercli.tags.read_tags`, header only).
3. Both are fsync'ed and published into `incoming/<series>/` (`Spool.publish_to_group`).
4. Only then is success (0x0000) answered. Any write error answers 0xA700 (out of resources)
   and leaves nothing half-written; an instance whose UIDs cannot be read answers 0xC210 or
   0xC212 and is quarantined in `error/` with the reason.

When an association ends, a hint per series it carried is written to `hints/`, so `route` can
act seconds after a sender is done instead of waiting out the series timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from pynetdicom import AE, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import VerificationPresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from mercli.errors import ExitCode, MercliError
from mercli.fsutil import remove_tree, unlink_quietly, write_new
from mercli.names import new_id, safe_name
from mercli.spool import ERROR, ERROR_FILE, INCOMING, SIDECAR_SUFFIX, Spool, Worker
from mercli.tags import UnreadableDicom, read_tags

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # write failure, full disk: the sender may retry later
STATUS_UNREADABLE = 0xC210  # cannot understand: the dataset does not parse
STATUS_NO_UIDS = 0xC212  # cannot understand: SOP/Series/Study Instance UID missing
REQUIRED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class ReceiveConfig:
    """Options of `mercli receive`; the one place their defaults live."""

    host: str = "0.0.0.0"
    port: int = 11112
    aet: str = "MERCLI"
    allow_aets: tuple[str, ...] = ()  # calling AE titles accepted; empty = any
    any_called_aet: bool = False  # accept whatever AE title the sender calls us by
    max_associations: int = 32
    processes: int = 1
    extra_tags: tuple[str, ...] = ()
    network_timeout: float = 60.0


# -- streaming datasets into the spool -----------------------------------------------------------

_scratch_dir: Path | None = None  # this process's Worker scratch, set by InstanceStore


class _SpoolTempFile:
    """Where pynetdicom streams one C-STORE dataset: a file in our scratch folder.

    Stands in for the NamedTemporaryFile pynetdicom would create in /tmp, so that the finished
    file can be renamed into the spool (same filesystem) instead of copied, and so that a write
    error (full disk) is remembered and answered with 0xA700 instead of killing the association.
    pynetdicom flushes after every PDU; we flush once, in finish(), before anyone reads it.
    """

    def __init__(self, *_args: Any, suffix: str = ".dcm", **_kwargs: Any) -> None:
        directory = _scratch_dir or Path("/tmp")
        self.name = str(directory / f"{new_id()}{suffix}")
        self.error: OSError | None = None
        self._file: BinaryIO | None = None
        try:
            fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
        except OSError as exc:
            self.error = exc

    @property
    def file(self) -> _SpoolTempFile:
        return self  # pynetdicom calls `.file.flush()`

    def write(self, data: bytes) -> int:
        if self.error is None and self._file is not None:
            try:
                return self._file.write(data)
            except OSError as exc:
                self.error = exc
        return len(data)

    def flush(self) -> None:
        pass  # see finish()

    def finish(self) -> None:
        """Flush and fsync; raises the first write error, if any."""
        if self.error is not None:
            raise self.error
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or exc


def _configure_pynetdicom() -> None:
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    setattr(_dimse_messages, "NamedTemporaryFile", _SpoolTempFile)  # noqa: B010


# -- the store handler ---------------------------------------------------------------------------


@dataclass
class _AssociationLog:
    sender: str
    address: str
    started: float = field(default_factory=time.monotonic)
    series: set[str] = field(default_factory=set)
    instances: int = 0
    failures: int = 0
    bytes: int = 0


class InstanceStore:
    """Handles C-STORE and association events for one receiving process."""

    def __init__(self, spool: Spool, worker: Worker, config: ReceiveConfig) -> None:
        global _scratch_dir
        self.spool = spool
        self.worker = worker
        self.config = config
        self._associations: dict[int, _AssociationLog] = {}
        self._lock = threading.Lock()
        _scratch_dir = worker.scratch
        _configure_pynetdicom()

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_ACCEPTED, self._association_started),
            (evt.EVT_RELEASED, lambda event: self._association_ended(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._association_ended(event, "aborted")),
            (evt.EVT_CONN_CLOSE, lambda event: self._association_ended(event, "closed")),
        ]

    def handle_store(self, event: Any) -> int:
        """Make one instance durable in incoming/, then (and only then) answer success."""
        request = event.request
        dataset_file: _SpoolTempFile = request._dataset_file
        association = self._association(event.assoc)
        path = Path(dataset_file.name)
        try:
            dataset_file.finish()
            size = path.stat().st_size
            tags = read_tags(path, extra=self.config.extra_tags)
            missing = [uid for uid in REQUIRED_UIDS if not tags.get(uid)]
            if missing:
                return self._quarantine(path, f"missing {', '.join(missing)}", association, event)
            sidecar = {**tags, **self._receive_metadata(event)}
            series = self._publish(path, sidecar)
        except UnreadableDicom as exc:
            return self._quarantine(path, str(exc), association, event)
        except OSError as exc:
            association.failures += 1
            log.error("cannot store instance from %s: %s", association.sender, exc)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            association.series.add(series)
            association.instances += 1
            association.bytes += size
        return STATUS_SUCCESS

    def _publish(self, path: Path, sidecar: dict[str, Any]) -> str:
        series = safe_name(str(sidecar["SeriesInstanceUID"]))
        instance = safe_name(str(sidecar["SOPInstanceUID"]))
        tags_path = self.worker.tmp_path(SIDECAR_SUFFIX)
        data = json.dumps(sidecar, ensure_ascii=False, separators=(",", ":")).encode()
        write_new(tags_path, data)
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

    def _receive_metadata(self, event: Any) -> dict[str, str]:
        requestor = event.assoc.requestor
        return {
            "SenderAET": requestor.ae_title,
            "SenderAddress": requestor.address,
            "ReceiverAET": requestor.primitive.called_ae_title or event.assoc.acceptor.ae_title,
            "ReceivedAt": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

    def _quarantine(self, path: Path, reason: str, association: _AssociationLog, event: Any) -> int:
        """Keep an instance we cannot file under a series in error/, with the reason."""
        association.failures += 1
        status = STATUS_NO_UIDS if reason.startswith("missing") else STATUS_UNREADABLE
        item_id = new_id()
        folder = self.worker.tmp_path()
        try:
            folder.mkdir()
            os.rename(path, folder / "instance.dcm")
            record = {
                "reason": reason,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "from": "receive",
                "status": f"0x{status:04X}",
                **self._receive_metadata(event),
            }
            write_new(folder / ERROR_FILE, json.dumps(record, indent=1).encode())
            self.spool.publish_item(folder, ERROR, item_id)
        except OSError as exc:
            remove_tree(folder)
            log.error("cannot quarantine an unreadable instance: %s", exc)
            return STATUS_OUT_OF_RESOURCES
        self.spool.log("quarantined", item=item_id, reason=reason, sender=association.sender)
        log.warning(
            "instance from %s quarantined as error/%s: %s", association.sender, item_id, reason
        )
        return status

    # -- association bookkeeping: logs and completion hints --------------------------------------

    def _association(self, assoc: Any) -> _AssociationLog:
        with self._lock:
            found = self._associations.get(id(assoc))
            if found is None:
                requestor = assoc.requestor
                found = _AssociationLog(requestor.ae_title, f"{requestor.address}:{requestor.port}")
                self._associations[id(assoc)] = found
            return found

    def _association_started(self, event: Any) -> None:
        association = self._association(event.assoc)
        log.debug("association from %s (%s) accepted", association.sender, association.address)

    def _association_ended(self, event: Any, how: str) -> None:
        with self._lock:
            association = self._associations.pop(id(event.assoc), None)
        if association is None:
            return  # already reported (released, then closed)
        for series in sorted(association.series):
            self.spool.write_hint(
                self.worker,
                series,
                {"ended": how, "sender": association.sender, "instances": association.instances},
            )
        seconds = time.monotonic() - association.started
        if association.instances or association.failures:
            log.info(
                "association from %s %s: %d instance(s) in %d series, %.1f MB in %.1f s%s",
                association.sender,
                how,
                association.instances,
                len(association.series),
                association.bytes / 1e6,
                seconds,
                f", {association.failures} failed" if association.failures else "",
            )


# -- the listener --------------------------------------------------------------------------------


class _Listener(ThreadedAssociationServer):
    """pynetdicom's server with TCP_NODELAY on every connection and SO_REUSEPORT on the port.

    Without TCP_NODELAY every small C-STORE response waits for Nagle's algorithm (tens of ms
    on loopback); SO_REUSEPORT lets several receiving processes share one port.
    """

    def server_bind(self) -> None:
        cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


class ListenError(MercliError):
    """The port cannot be listened on (in use, not permitted): exit 3, a config problem."""

    exit_code = ExitCode.CONFIG


def build_ae(config: ReceiveConfig) -> AE:
    """An AE that accepts C-ECHO and C-STORE of any storage SOP class in any transfer syntax."""
    ae = AE(ae_title=config.aet)
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
    ae.maximum_associations = config.max_associations
    ae.network_timeout = config.network_timeout
    ae.require_called_aet = not config.any_called_aet
    if config.allow_aets:
        ae.require_calling_aet = list(config.allow_aets)
    # Storage contexts need no listing: with UNRESTRICTED_STORAGE_SERVICE every storage-like
    # SOP class (private and unknown ones too) is accepted in the first transfer syntax the
    # sender proposes, so nothing is ever transcoded.
    ae.supported_contexts = VerificationPresentationContexts
    return ae


def start_listener(ae: AE, config: ReceiveConfig, store: InstanceStore) -> _Listener:
    """Bind and start serving in background threads; ListenError if the port is unusable."""
    try:
        server = ae.make_server(
            (config.host, config.port), evt_handlers=store.handlers(), server_class=_Listener
        )
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="listener", daemon=True)
    thread.start()
    ae._servers.append(server)
    return cast(_Listener, server)
