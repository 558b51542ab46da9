"""One accepted TCP connection of the receiving upper layer, from A-ASSOCIATE-RQ to its end.

Split out of `mercli.dicom.scp.listener` (which keeps the listener) because this is the hot receive
path and reads best on its own: one thread blocks on the socket, a PDU is handled the moment
it arrives and the answer is written at once. P-DATA is streamed PDV by PDV through one reused
buffer of `CHUNK` bytes, so a 1 GB instance never sits in memory. The A-ASSOCIATE PDUs
themselves are decoded and encoded by `mercli.dicom.scp.negotiation`.

Also here: the interface the upper layer calls (`StoreHandler`, `DatasetSink`,
`StoreRequest`), which mercli.receive.handler implements.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol, cast

from pynetdicom.pdu import A_ABORT_RQ

from mercli.dicom.dimse import (
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
from mercli.dicom.dimse import us as _us
from mercli.dicom.scp.negotiation import (
    REJECT_BUSY,
    AssociationInfo,
    association_info,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rj,
    negotiate_contexts,
)

log = logging.getLogger("mercli.dicom.scp.listener")  # the name the logs have always carried

CHUNK = 1 << 20  # bytes read from the socket at a time while streaming a dataset


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
    """What the upper layer calls; mercli.receive.handler implements it."""

    def accept(self, info: AssociationInfo) -> tuple[int, int, int] | None: ...

    def begin_store(self, info: AssociationInfo, request: StoreRequest) -> DatasetSink: ...

    def association_ended(self, info: AssociationInfo, how: str) -> None: ...


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
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        if length > 1 << 20:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes: more than 1 MiB")
        encoded = bytes([pdu_type, 0]) + struct.pack(">I", length) + self._read(length)
        primitive = decode_associate_rq(encoded)
        info = association_info(primitive, self.sock.getpeername())
        rejection = self.handler.accept(info)
        if rejection is None and not self.admit():
            rejection = REJECT_BUSY
        if rejection is not None:
            self._send(encode_associate_rj(rejection))
            log.info(
                "association from %s rejected (%d, %d, %d)", primitive.calling_ae_title, *rejection
            )
            return False
        self.info = info  # the slot is ours: from here on, association_ended() will be called
        results, reply_roles = negotiate_contexts(primitive, info)
        self._send(encode_associate_ac(primitive, results, reply_roles))
        log.debug("association from %s (%s) accepted", info.calling_aet, info.address)
        return True

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
