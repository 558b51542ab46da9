"""One accepted TCP connection of the receiving upper layer, from A-ASSOCIATE-RQ to its end.

Split out of `mercli.dicom.scp.listener` (which keeps the listener) because this is the hot receive
path and reads best on its own: one thread blocks on the socket, a PDU is handled the moment
it arrives and the answer is written at once. P-DATA is streamed PDV by PDV through one reused
buffer of `CHUNK` bytes, so a 1 GB instance never sits in memory. The A-ASSOCIATE PDUs
themselves are decoded and encoded by `mercli.dicom.scp.negotiation`.

What a peer can make us buffer is capped (SPEC §9): a P-DATA-TF PDU is at most the `MAX_PDU`
we announced, a command set at most `MAX_COMMAND`, A-RELEASE-RQ exactly its 4 bytes; anything
over is answered with A-ABORT before a byte of it is read.

Over TLS `sock` is an `ssl.SSLSocket` whose handshake admission finished; reads and writes
are the same calls. Only shutdown differs: it goes to the file descriptor
(`shutdown_socket`), so a watchdog's `expire` neither breaks the TLS state under the reading
thread nor makes our A-ABORT leave unencrypted.

Also here: the interface the upper layer calls (`StoreHandler`, `DatasetSink`,
`StoreRequest`), which mercli.receive.handler implements.
"""

from __future__ import annotations

import io
import logging
import math
import socket
import struct
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol, cast

from mercli.dicom.dimse import (
    A_ABORT,
    A_ABORT_TYPE,
    A_RELEASE_RP,
    A_RELEASE_RQ_TYPE,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_ECHO_RQ,
    C_STORE_RQ,
    COMMAND_FIELD,
    CONTROL_PDU_LENGTH,
    DATASET_TYPE,
    MAX_COMMAND,
    MESSAGE_ID,
    NO_DATASET,
    P_DATA_TYPE,
    STATUS_INVALID_UID,
    STATUS_UNRECOGNISED,
    ProtocolError,
    command_uid,
    encode_response,
    parse_command,
)
from mercli.dicom.dimse import us as _us
from mercli.dicom.scp.admission import shutdown_socket
from mercli.dicom.scp.negotiation import (
    MAX_PDU,
    AssociationInfo,
    decode_associate_rq,
    encode_associate_ac,
    negotiate_contexts,
)
from mercli.names import printable

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


class _Refused:
    """The sink of a C-STORE refused from its command alone: the data set is read and dropped
    (the peer sends it anyway), and the status is answered without anything being stored."""

    def __init__(self, status: int) -> None:
        self.status = status

    def write(self, data: bytes | memoryview) -> None:
        pass

    def finish(self) -> int:
        return self.status

    def discard(self) -> None:
        pass


class Connection:
    """One admitted association, from its A-ASSOCIATE-AC to release, abort or close.

    Deadlines: the socket's timeout (`network_timeout`) bounds each wait for data, so a peer
    may be silent that long between PDUs; and once the first byte of a PDU is there, the
    whole PDU must follow within `network_timeout` seconds (`pdu_deadline`, enforced by the
    listener's watchdog through `expire`), so trickling one byte at a time does not keep a slot.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: StoreHandler,
        admitted: AssociationInfo,
        request: bytes,
        *,
        network_timeout: float,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.admitted = admitted
        self.request = request
        self.network_timeout = network_timeout
        sock.settimeout(network_timeout)  # blocking again, after admission's non-blocking reads
        self.reader = cast(io.BufferedReader, sock.makefile("rb", buffering=256 * 1024))
        self.info: AssociationInfo | None = None  # set once accepted: association_ended() due
        self.pdu_deadline = math.inf  # monotonic time the PDU being read must be whole by
        self._expired: str | None = None
        self._state = _DimseState()
        self._view: memoryview | None = None  # the streaming buffer, made at the first data set

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

    def _abort(self) -> None:
        with suppress(OSError):
            self._send(A_ABORT)

    def expire(self, reason: str) -> None:
        """End this association with A-ABORT (from another thread: the watchdog, shutdown).

        SHUT_RD wakes a read blocked on the socket with end-of-file and leaves the write side
        open for the A-ABORT. A thread busy storing an instance finishes it first, so an
        instance is answered whole or not at all."""
        if self._expired is None:
            self._expired = reason
        with suppress(OSError):
            shutdown_socket(self.sock, socket.SHUT_RD)

    def cut(self) -> None:
        """Close both directions: the last resort for a thread stuck sending to a peer."""
        with suppress(OSError):
            shutdown_socket(self.sock, socket.SHUT_RDWR)

    def _who(self) -> str:
        return f"{printable(self.admitted.calling_aet)} ({printable(self.admitted.address)})"

    # -- the association ------------------------------------------------------------------------

    def serve(self) -> None:
        """Run the association to its end; never raises."""
        how = "closed"
        try:
            self._associate()
            how = self._serve_requests()
        except ProtocolError as exc:
            log.warning("aborting association from %s: %s", self._who(), printable(exc, 200))
            self._abort()
            how = "aborted"
        except OSError as exc:  # ConnectionError and TimeoutError included
            how = self._ended(exc)
        except Exception:  # a bug must end this association only, loudly, never the listener
            log.exception("internal error; aborting the association from %s", self._who())
            self._abort()
            how = "aborted"
        finally:
            self._state.drop()
            if self.info is not None:
                self.handler.association_ended(self.info, how)
            # The reader holds a reference to the socket: without shutdown the TCP connection
            # would stay open, and a peer that aborted waits for us to close it (AA-3).
            with suppress(OSError):
                shutdown_socket(self.sock, socket.SHUT_RDWR)
            with suppress(OSError):
                self.reader.close()
                self.sock.close()

    def _ended(self, exc: OSError) -> str:
        """How the association ended on a socket error: expired, silent too long, or gone."""
        if self._expired is not None:
            log.warning("aborting association from %s: %s", self._who(), self._expired)
        elif isinstance(exc, TimeoutError):
            log.info(
                "aborting association from %s: silent for %g s", self._who(), self.network_timeout
            )
        else:
            log.debug("connection from %s ended: %s", self._who(), exc)
            return "closed"
        self._abort()
        return "aborted"

    def _associate(self) -> None:
        primitive = decode_associate_rq(self.request)
        self.info = self.admitted  # from here on, association_ended() will be called
        results, reply_roles = negotiate_contexts(primitive, self.info)
        self._send(encode_associate_ac(primitive, results, reply_roles))
        log.debug("association from %s accepted", self._who())

    def _serve_requests(self) -> str:
        state = self._state
        while True:
            self.pdu_deadline = math.inf  # between PDUs: the socket timeout is the idle limit
            if not self.reader.peek(1):
                raise ConnectionError("peer closed the connection")
            self.pdu_deadline = time.monotonic() + self.network_timeout
            pdu_type, length = self._read_pdu_header()
            if pdu_type == P_DATA_TYPE:
                if length > MAX_PDU:
                    raise ProtocolError(f"P-DATA-TF of {length} bytes: more than {MAX_PDU}")
                self._p_data(length, state)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                if length != CONTROL_PDU_LENGTH:
                    raise ProtocolError(f"A-RELEASE-RQ of {length} bytes, not 4")
                self._read(length)
                state.drop()
                self._send(A_RELEASE_RP)
                return "released"
            elif pdu_type == A_ABORT_TYPE:
                state.drop()  # its body says why; nothing to read it for
                return "aborted"
            else:
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
                if len(state.command) + data_length > MAX_COMMAND:
                    raise ProtocolError(f"command set of more than {MAX_COMMAND >> 10} KiB")
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
        buffer = self._view
        if buffer is None:
            buffer = self._view = memoryview(bytearray(CHUNK))
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
        field_ = _us(command.get(COMMAND_FIELD))
        message_id = _us(command.get(MESSAGE_ID))
        has_dataset = _us(command.get(DATASET_TYPE)) != NO_DATASET
        if field_ == C_STORE_RQ and has_dataset:
            self._begin_store(context_id, message_id, command, state)
        elif field_ == C_ECHO_RQ:
            self._respond(
                context_id, 0x8030, message_id, 0x0000, command.get(AFFECTED_SOP_CLASS, b""), None
            )
        else:
            if has_dataset:
                raise ProtocolError(f"unsupported DIMSE request 0x{field_:04X} with a dataset")
            self._respond(
                context_id,
                field_ | 0x8000,
                message_id,
                STATUS_UNRECOGNISED,
                command.get(AFFECTED_SOP_CLASS, b""),
                None,
            )

    def _begin_store(
        self, context_id: int, message_id: int, command: dict[int, bytes], state: _DimseState
    ) -> None:
        """Start a C-STORE, or refuse it (0xC213, nothing stored) when a UID of its command is
        no UID: such a value would end in file meta and sidecar and break other tools."""
        assert self.info is not None
        raw_class = command.get(AFFECTED_SOP_CLASS, b"")
        raw_instance = command.get(AFFECTED_SOP_INSTANCE, b"")
        sop_class, sop_instance = command_uid(raw_class), command_uid(raw_instance)
        request = StoreRequest(
            context_id=context_id,
            sop_class=sop_class or raw_class.rstrip(b"\x00 "),
            sop_instance=sop_instance or raw_instance.rstrip(b"\x00 "),
            transfer_syntax=self.info.contexts[context_id][1],
            message_id=message_id,
        )
        if sop_class is not None and sop_instance is not None:
            state.begin(request, self.handler.begin_store(self.info, request))
            return
        which, raw = ("Class", raw_class) if sop_class is None else ("Instance", raw_instance)
        log.warning(
            "C-STORE from %s refused (0x%04X): Affected SOP %s UID %s is not a UID",
            self._who(),
            STATUS_INVALID_UID,
            which,
            printable(raw.decode("latin-1")),
        )
        state.begin(request, _Refused(STATUS_INVALID_UID))

    def _finish_store(self, context_id: int, state: _DimseState) -> None:
        request, sink = state.take()
        # Storing (fsync) is our time, not the peer's: the PDU deadline waits meanwhile.
        deadline, self.pdu_deadline = self.pdu_deadline, math.inf
        started = time.monotonic()
        status = sink.finish()
        self._respond(
            context_id, 0x8001, request.message_id, status, request.sop_class, request.sop_instance
        )
        self.pdu_deadline = deadline + (time.monotonic() - started)

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
