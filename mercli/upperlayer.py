"""A blocking DICOM upper layer for the receiving side, built on pynetdicom's codecs.

Why not pynetdicom's own AE: its association and DUL reactors are polling loops that sleep
1 ms whenever they find nothing to do, and a C-STORE crosses them several times, so one
association tops out near 200 instances/s however fast the disk is. Here each connection is
one thread that blocks on its socket: a PDU is handled the moment it arrives and the answer is
written at once. pynetdicom still does what it does well: encoding and decoding the
association PDUs (`pynetdicom.pdu`) and negotiating presentation contexts
(`negotiate_unrestricted`: every storage SOP class, private ones too, in the first transfer
syntax the sender proposes, so nothing is ever transcoded).

Scope (PS3.8): A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT; DIMSE C-STORE and
C-ECHO as SCP. Any other DIMSE request is answered 0x0211 (unrecognised operation). P-DATA
is streamed PDV by PDV in bounded chunks, so a 1 GB instance never sits in memory.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from pydicom.uid import UID
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

from mercli import part10
from mercli.dimse import (
    A_ABORT_TYPE,
    A_ASSOCIATE_RQ_TYPE,
    A_RELEASE_RP,
    A_RELEASE_RQ_TYPE,
    C_ECHO_RQ,
    C_STORE_RQ,
    NO_DATASET,
    P_DATA_TYPE,
    STATUS_UNRECOGNISED,
    ProtocolError,
    encode_response,
    parse_command,
)
from mercli.dimse import us as _us

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = part10.IMPLEMENTATION_CLASS_UID.decode()
IMPLEMENTATION_VERSION = part10.IMPLEMENTATION_VERSION.decode()
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CHUNK = 1 << 20  # bytes read from the socket at a time while streaming a dataset

# A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient: local limit exceeded


@dataclass
class AssociationInfo:
    """Who is talking to us, as the store handler and the logs need it."""

    calling_aet: str
    called_aet: str
    address: str
    port: int
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (SOP, TS)


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ command, as received."""

    context_id: int
    sop_class: bytes
    sop_instance: bytes
    transfer_syntax: str
    message_id: int


class DatasetSink(Protocol):
    """Receives one C-STORE dataset in pieces; finish() returns the DIMSE status."""

    def write(self, data: bytes | memoryview) -> None:
        """Must not keep `data`: its buffer is reused for the next piece."""

    def finish(self) -> int: ...

    def discard(self) -> None: ...


class StoreHandler(Protocol):
    """What the upper layer calls; mercli.receiver implements it."""

    def accept(self, info: AssociationInfo) -> tuple[int, int, int] | None: ...

    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink: ...

    def association_ended(self, info: AssociationInfo, how: str) -> None: ...


def _negotiation_contexts() -> list[PresentationContext]:
    verification = PresentationContext()
    verification.abstract_syntax = UID("1.2.840.10008.1.1")  # Verification SOP Class
    verification.transfer_syntax = [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
    ]
    return [verification]


_SUPPORTED = _negotiation_contexts()


class Connection:
    """One TCP connection from association request to release, abort or close."""

    def __init__(
        self,
        sock: socket.socket,
        handler: StoreHandler,
        *,
        acse_timeout: float,
        network_timeout: float,
        admit: Callable[[], bool] = lambda: True,
    ) -> None:
        self.sock = sock
        self.admit = admit
        self.handler = handler
        self.acse_timeout = acse_timeout
        self.network_timeout = network_timeout
        self.reader = cast(io.BufferedReader, sock.makefile("rb", buffering=256 * 1024))
        self.info: AssociationInfo | None = None
        self._buffer = bytearray(CHUNK)

    # -- socket helpers -------------------------------------------------------------------------

    def _read(self, count: int) -> bytes:
        data = self.reader.read(count)
        if data is None or len(data) < count:
            raise ConnectionError("peer closed the connection")
        return data

    def _read_pdu_header(self) -> tuple[int, int]:
        header = self._read(6)
        return header[0], struct.unpack(">I", header[2:6])[0]

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _abort(self, source: int = 0x02, reason: int = 0x00) -> None:
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = source, reason
        with suppress(OSError):
            self._send(pdu.encode())

    # -- the association ------------------------------------------------------------------------

    def serve(self) -> None:
        """Run the association to its end; never raises."""
        how = "closed"
        try:
            if not self._associate():
                return
            how = self._serve_requests()
        except ProtocolError as exc:
            log.warning("aborting association: %s", exc)
            self._abort()
            how = "aborted"
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.debug("connection ended: %s", exc)
        except Exception:  # a bug must end this association only, loudly, never the listener
            log.exception("internal error; aborting the association")
            self._abort()
            how = "aborted"
        finally:
            if self.info is not None:
                self.handler.association_ended(self.info, how)
            # The reader holds a reference to the socket: without shutdown the TCP connection
            # would stay open, and a peer that aborted waits for us to close it (AA-3).
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                self.reader.close()
                self.sock.close()

    def _associate(self) -> bool:
        self.sock.settimeout(self.acse_timeout)
        pdu_type, length = self._read_pdu_header()
        if pdu_type != A_ASSOCIATE_RQ_TYPE or length > 1 << 20:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        request = A_ASSOCIATE_RQ()
        encoded = bytes([pdu_type, 0]) + struct.pack(">I", length) + self._read(length)
        try:
            request.decode(encoded)
            primitive = request.to_primitive()
        except Exception as exc:  # pynetdicom's decoder raises many kinds on garbage
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {exc}") from exc
        peer = self.sock.getpeername()
        info = AssociationInfo(
            calling_aet=str(primitive.calling_ae_title).strip(),
            called_aet=str(primitive.called_ae_title).strip(),
            address=str(peer[0]),
            port=int(peer[1]),
        )
        rejection = self.handler.accept(info)
        if rejection is None and not self.admit():
            rejection = REJECT_BUSY
        if rejection is not None:
            self._reject(primitive, rejection)
            return False
        self.info = info  # the slot is ours: from here on, association_ended() will be called
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role) for item in _role_items(primitive)
        }
        results, reply_roles = negotiate_unrestricted(
            primitive.presentation_context_definition_list, _SUPPORTED, roles
        )
        for context in results:
            if context.result == 0x00 and context.context_id is not None:
                info.contexts[context.context_id] = (
                    str(context.abstract_syntax),
                    str(context.transfer_syntax[0]),
                )
        self._accept(primitive, results, reply_roles)
        log.debug("association from %s (%s) accepted", info.calling_aet, info.address)
        return True

    def _reject(self, request: A_ASSOCIATE, reason: tuple[int, int, int]) -> None:
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self._send(pdu.encode())
        log.info("association from %s rejected (%d, %d, %d)", request.calling_ae_title, *reason)

    def _accept(
        self, request: A_ASSOCIATE, results: list[PresentationContext], roles: list[Any]
    ) -> None:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT)
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result, primitive.result_source = 0x00, 0x01
        primitive.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = 0  # unlimited: fewer, larger PDUs
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        primitive.user_information = [maximum, implementation, version, *roles]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        self._send(pdu.encode())

    def _serve_requests(self) -> str:
        self.sock.settimeout(self.network_timeout)
        state = _DimseState()
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == P_DATA_TYPE:
                self._p_data(length, state)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                self._read(length)
                self._send(A_RELEASE_RP)
                state.drop()
                return "released"
            elif pdu_type == A_ABORT_TYPE:
                self._read(length)
                state.drop()
                return "aborted"
            else:
                state.drop()
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")

    # -- DIMSE over P-DATA ----------------------------------------------------------------------

    def _p_data(self, length: int, state: _DimseState) -> None:
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise ProtocolError("truncated PDV")
            item_length = struct.unpack(">I", self._read(4))[0]
            context_id, control = self._read(2)
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError("PDV length exceeds its PDU")
            assert self.info is not None
            if context_id not in self.info.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, never accepted")
            data_length = item_length - 2
            if control & 0x01:
                state.command.extend(self._read(data_length))
                if control & 0x02:
                    self._command(context_id, state)
            else:
                if state.sink is None:
                    raise ProtocolError("dataset without a C-STORE command")
                self._stream(data_length, state.sink)
                if control & 0x02:
                    self._finish_store(context_id, state)
            remaining -= item_length + 4

    def _stream(self, count: int, sink: DatasetSink) -> None:
        """Copy `count` bytes of dataset to the sink through one reused buffer (no big copies)."""
        buffer = memoryview(self._buffer)
        while count > 0:
            got = self.reader.readinto(buffer[: min(count, CHUNK)])
            if not got:
                raise ConnectionError("peer closed the connection")
            sink.write(buffer[:got])
            count -= got

    def _command(self, context_id: int, state: _DimseState) -> None:
        assert self.info is not None
        command = parse_command(bytes(state.command))
        state.command.clear()
        field_ = _us(command.get(0x00000100))
        message_id = _us(command.get(0x00000110))
        has_dataset = _us(command.get(0x00000800)) != NO_DATASET
        if field_ == C_STORE_RQ and has_dataset:
            request = StoreRequest(
                context_id=context_id,
                sop_class=command.get(0x00000002, b"").rstrip(b"\x00 "),
                sop_instance=command.get(0x00001000, b"").rstrip(b"\x00 "),
                transfer_syntax=self.info.contexts[context_id][1],
                message_id=message_id,
            )
            state.begin(request, self.handler.begin_store(self.info, request))
        elif field_ == C_ECHO_RQ:
            self._respond(
                context_id, 0x8030, message_id, 0x0000, command.get(0x00000002, b""), None
            )
        else:
            if has_dataset:
                raise ProtocolError(f"unsupported DIMSE request 0x{field_:04X} with a dataset")
            self._respond(
                context_id,
                field_ | 0x8000,
                message_id,
                STATUS_UNRECOGNISED,
                command.get(0x00000002, b""),
                None,
            )

    def _finish_store(self, context_id: int, state: _DimseState) -> None:
        request, sink = state.take()
        status = sink.finish()
        self._respond(
            context_id, 0x8001, request.message_id, status, request.sop_class, request.sop_instance
        )

    def _respond(
        self,
        context_id: int,
        command_field: int,
        message_id: int,
        status: int,
        sop_class: bytes,
        sop_instance: bytes | None,
    ) -> None:
        command = encode_response(command_field, message_id, status, sop_class, sop_instance)
        pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
        self._send(struct.pack(">BBI", P_DATA_TYPE, 0, len(pdv)) + pdv)


@dataclass
class _DimseState:
    command: bytearray = field(default_factory=bytearray)
    request: StoreRequest | None = None
    sink: DatasetSink | None = None

    def begin(self, request: StoreRequest, sink: DatasetSink) -> None:
        self.drop()
        self.request, self.sink = request, sink

    def take(self) -> tuple[StoreRequest, DatasetSink]:
        assert self.request is not None and self.sink is not None
        taken = (self.request, self.sink)
        self.request = self.sink = None
        return taken

    def drop(self) -> None:
        """An unfinished dataset is never acknowledged: throw its partial file away."""
        if self.sink is not None:
            self.sink.discard()
        self.request = self.sink = None


def _role_items(primitive: A_ASSOCIATE) -> list[Any]:
    return [
        item
        for item in primitive.user_information
        if hasattr(item, "scu_role") and hasattr(item, "sop_class_uid")
    ]


class Listener:
    """Accepts connections (TCP_NODELAY, SO_REUSEPORT) and serves each in its own thread.

    At most `max_associations` associations are served at once; further requests are
    rejected as transient (local limit exceeded), so senders retry later.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: StoreHandler,
        *,
        max_associations: int = 32,
        acse_timeout: float = 30.0,
        network_timeout: float = 60.0,
    ) -> None:
        self.handler = handler
        self.max_associations = max_associations
        self.acse_timeout = acse_timeout
        self.network_timeout = network_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._connections: dict[threading.Thread, Connection] = {}
        self._admitted = 0  # association slots taken (connections whose info is set)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)

    def start(self) -> Listener:
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(
                client,
                self.handler,
                acse_timeout=self.acse_timeout,
                network_timeout=self.network_timeout,
                admit=self._admit,
            )
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            with self._lock:
                self._connections[thread] = connection
            thread.start()

    def _admit(self) -> bool:
        """Take one of the association slots, atomically; False when all are taken."""
        with self._lock:
            if self._admitted >= self.max_associations:
                return False
            self._admitted += 1
            return True

    def _serve(self, connection: Connection) -> None:
        try:
            connection.serve()
        finally:
            with self._lock:
                del self._connections[threading.current_thread()]
                self._admitted -= connection.info is not None

    def open_associations(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections.values() if c.info is not None)

    def close(self) -> None:
        """Stop accepting. Open associations go on; bare connections (port probes) are cut."""
        self._closed.set()
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            idle = [c for c in self._connections.values() if c.info is None]
        for connection in idle:
            with suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    def wait_idle(self, poll: Callable[[float], Any]) -> None:
        """Wait until every association has ended; `poll(seconds)` sleeps (an Event's wait)."""
        while True:
            with self._lock:
                if not self._connections:
                    return
            poll(0.05)
