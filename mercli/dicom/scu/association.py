"""The requesting side of one DICOM association: connect, negotiate, send, release or abort.

The counterpart of `mercli.dicom.scp.listener` (which accepts associations) for
`mercli.dicom.scu.session`: blocking I/O on one socket with TCP_NODELAY, the socket timeout being
the peer's network timeout, so every wait (connect, A-ASSOCIATE-AC, each response, A-RELEASE-RP) is
bounded. `mercli.dicom.scu.acse` encodes the A-ASSOCIATE-RQ and decodes the A-ASSOCIATE-AC (no
pynetdicom, which would cost a tenth of a second of start-up); the rest of the PDUs are framed here.

Failures become the typed errors dispatch needs to decide between retry and give-up:
`PeerUnreachable` (nobody listens, no route, no answer: `PeerTimeout`), `PeerRefused`
(A-ASSOCIATE-RJ, in words, with `transient` set for "busy, try later"), `PeerAborted`
(A-ABORT, connection lost, or a peer that broke the protocol). After any of them the
connection is closed.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from mercli.dicom import DEFAULT_AET, NETWORK_TIMEOUT, part10
from mercli.dicom.dimse import (
    A_ABORT_TYPE,
    A_ASSOCIATE_AC_TYPE,
    A_ASSOCIATE_RJ_TYPE,
    A_RELEASE_RP_TYPE,
    A_RELEASE_RQ,
    C_ECHO_RSP,
    COMMAND_FIELD,
    MESSAGE_ID_RESPONDED,
    P_DATA_TYPE,
    PDV_COMMAND,
    PDV_LAST,
    STATUS,
    ProtocolError,
    encode_echo_rq,
    parse_command,
    us,
)
from mercli.dicom.scu.acse import decode_associate_ac, encode_associate_rq
from mercli.dicom.tls import describe_failure
from mercli.errors import ConfigError, PeerError

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
OUR_MAX_PDU = 1 << 20  # what we accept: responses are tiny; some peers mishandle 0 (unlimited)
BLOCK = 1 << 20  # dataset bytes read and sent per sendmsg call (and PDV size if unlimited)
IOV_MAX = 1024
NEGOTIATING = "negotiating the association"
TLS_GATHER = 64 * 1024  # bytes gathered into one TLS write
MAX_INCOMING_PDU = 16 << 20  # a larger PDU from the peer is taken as garbage
A_ABORT_RQ = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # source: service-user, no reason

_RJ_RESULT = {1: "permanent", 2: "transient"}
_RJ_REASON = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
_ABORT_SOURCE = {0: "the peer application", 2: "the peer's DICOM stack"}


@dataclass(frozen=True)
class DicomPeer:
    """Where a `dicom` target listens, and how long to wait for it (connect and each answer).

    `tls`: a client context (`mercli.dicom.tls.client_context`) to speak DICOM over TLS
    (PS3.15 Annex B); the server's certificate is checked against `host`.
    """

    host: str
    port: int
    called_aet: str
    calling_aet: str = DEFAULT_AET
    timeout: float = NETWORK_TIMEOUT
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("called_aet", "calling_aet"):
            title = getattr(self, name)
            if not 0 < len(title.strip()) <= 16 or not title.isascii() or "\\" in title:
                raise ConfigError(f"{name} {title!r} is not a valid AE title (1-16 ASCII chars)")
            if not title.isprintable():
                raise ConfigError(f"{name} {title!r} contains control characters")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")


class PeerUnreachable(PeerError):
    """Nobody answers at the target address: refused, no route, unknown host, or silence."""


class PeerTimeout(PeerUnreachable):
    """The peer did not answer within its network timeout."""


class PeerRefused(PeerError):
    """The peer rejected the association; `transient` says whether retrying later may help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class PeerTlsError(PeerError):
    """The TLS handshake failed: a certificate not trusted or not for this host, no common
    protocol version, a client certificate the peer wanted and refused, or a peer that does
    not speak TLS on that port. Retrying cannot help before somebody changes a setting."""


class PeerAborted(PeerError):
    """The association ended before its time: A-ABORT, lost connection, protocol violation."""


class LocalReadError(Exception):
    """Our own file failed mid-message; the association had to be aborted."""


class Association:
    """An established association; `request()` makes one."""

    def __init__(
        self, sock: socket.socket, peer: DicomPeer, proposed: Sequence[tuple[str, tuple[str, ...]]]
    ) -> None:
        self.peer = peer
        self.where = f"{peer.called_aet}@{peer.host}:{peer.port}"
        self._sock = sock
        self._reader = cast(io.BufferedReader, sock.makefile("rb", buffering=64 * 1024))
        self._proposed = {2 * n + 1: context for n, context in enumerate(proposed)}
        self._accepted: dict[str, dict[str, int]] = {}  # SOP class -> {syntax: context id}
        self._rejected: dict[str, list[int]] = {}  # SOP class -> result/reason codes
        self._pdv_max = BLOCK
        self._message_id = 0
        self._buffer = bytearray(BLOCK)
        self._closed = False

    # -- establishment ----------------------------------------------------------------------

    @classmethod
    def request(
        cls, peer: DicomPeer, proposed: Sequence[tuple[str, tuple[str, ...]]]
    ) -> Association:
        """Connect and negotiate the proposed (abstract syntax, transfer syntaxes) contexts."""
        association = cls(_connect(peer), peer, proposed)
        with association._guard(NEGOTIATING):
            association._sock.sendall(_request_pdu(peer, proposed))
            pdu_type, body = association._read_pdu()
            if pdu_type == A_ASSOCIATE_RJ_TYPE and len(body) >= 4:
                raise _refused(association.where, body[1], body[2], body[3])
            if pdu_type == A_ABORT_TYPE:
                raise association._aborted(body)
            if pdu_type != A_ASSOCIATE_AC_TYPE:
                raise ProtocolError(f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}")
            association._negotiated(body)
        return association

    def _negotiated(self, body: bytes) -> None:
        pdu = decode_associate_ac(body)  # ProtocolError when malformed
        for item in pdu.contexts:
            context_id = item.context_id
            context = self._proposed.get(context_id)
            if context is None:
                continue
            sop_class, syntaxes = context
            syntax = item.transfer_syntax
            if item.result == 0 and syntax in syntaxes:
                self._accepted.setdefault(sop_class, {}).setdefault(syntax, context_id)
            else:
                self._rejected.setdefault(sop_class, []).append(item.result or 2)
        maximum = pdu.maximum_length
        if maximum:  # 0 or absent: unlimited
            self._pdv_max = max(1, min(maximum - 6, BLOCK))
        log.debug("associated with %s, accepted %s", self.where, self._accepted)

    def accepted(self, sop_class: str) -> dict[str, int]:
        """The transfer syntaxes the peer accepted for a SOP class, with their context ids."""
        return self._accepted.get(sop_class, {})

    def proposed(self, sop_class: str) -> bool:
        return any(sop == sop_class for sop, _ in self._proposed.values())

    def rejections(self, sop_class: str) -> list[int]:
        """The A-ASSOCIATE-AC result codes of the SOP class's rejected contexts."""
        return self._rejected.get(sop_class, [])

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    # -- DIMSE messages -----------------------------------------------------------------------

    def send_message(
        self, context_id: int, command: bytes, data: BinaryIO | memoryview, length: int
    ) -> None:
        """A command and its dataset: `length` bytes from a file (read in blocks) or memory.

        A dataset of odd length (a deflated stream, a truncated file) gets one trailing NUL:
        PS3.5 A.5 pads deflated data so, and DCMTK aborts on odd fragments.
        """
        with self._guard("sending an instance"):
            parts = self._frame(context_id, PDV_COMMAND, memoryview(command), True)
            if length == 0:  # an empty dataset still needs its (empty) last fragment
                parts += self._frame(context_id, 0, memoryview(b""), True)
            padded = length + (length & 1)
            remaining = padded
            while parts or remaining > 0:
                if remaining > 0:
                    done = padded - remaining
                    block = self._next_block(data, done, min(remaining, BLOCK), length)
                    remaining -= len(block)
                    parts += self._frame(context_id, 0, block, remaining == 0)
                self._sendmsg_all(parts)
                parts = []

    def _next_block(
        self, data: BinaryIO | memoryview, done: int, size: int, length: int
    ) -> memoryview:
        """`size` bytes of the dataset from offset `done`; past `length` comes the pad NUL."""
        want = min(size, length - done)
        if isinstance(data, memoryview):
            block = data[done : done + want]
            return block if want == size else memoryview(bytes(block) + b"\x00" * (size - want))
        view = memoryview(self._buffer)[:size]
        filled = 0
        while filled < want:
            try:
                got = data.readinto(view[filled:want])  # type: ignore[attr-defined]
            except OSError as exc:
                raise LocalReadError(f"cannot read the file: {exc.strerror}") from exc
            if not got:
                raise LocalReadError("the file shrank while it was being sent")
            filled += got
        view[want:size] = b"\x00" * (size - want)
        return view

    def _frame(self, context_id: int, kind: int, view: memoryview, final: bool) -> list[object]:
        """One P-DATA-TF PDU per PDV, each PDV at most what the peer's max PDU allows."""
        parts: list[object] = []
        step = self._pdv_max
        for start in range(0, max(len(view), 1), step):
            piece = view[start : start + step]
            last = final and start + step >= len(view)
            control = kind | (PDV_LAST if last else 0)
            n = len(piece)
            parts.append(struct.pack(">BBIIBB", P_DATA_TYPE, 0, n + 6, n + 2, context_id, control))
            if n:
                parts.append(piece)
        return parts

    def _sendmsg_all(self, parts: list[object]) -> None:
        if isinstance(self._sock, ssl.SSLSocket):  # no sendmsg: coalesce into TLS records
            self._send_coalesced(parts)
            return
        views = [memoryview(cast(bytes, part)) for part in parts]
        index = 0
        while index < len(views):
            sent = self._sock.sendmsg(views[index : index + IOV_MAX])
            while sent:
                head = views[index]
                if sent >= len(head):
                    sent -= len(head)
                    index += 1
                else:
                    views[index], sent = head[sent:], 0

    def _send_coalesced(self, parts: list[object]) -> None:
        """Send parts over TLS: small ones gathered (a PDV header alone would cost a record
        and a system call of its own), large ones as they are."""
        pending = bytearray()
        for part in parts:
            view = memoryview(cast(bytes, part))
            if len(pending) + len(view) <= TLS_GATHER:
                pending += view
                continue
            if pending:
                self._sock.sendall(pending)
                pending.clear()
            if len(view) <= TLS_GATHER:
                pending += view
            else:
                self._sock.sendall(view)
        if pending:
            self._sock.sendall(pending)

    def receive_response(self, command_field: int) -> int:
        """Wait for the response to the last request; returns its status."""
        with self._guard("waiting for a response"):
            command = bytearray()
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == A_ABORT_TYPE:
                    raise self._aborted(body)
                if pdu_type != P_DATA_TYPE:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} awaiting a response")
                for control, data in _pdvs(body):
                    if not control & PDV_COMMAND:
                        raise ProtocolError("a dataset where a response was expected")
                    command += data
                    if control & PDV_LAST:
                        return self._status(bytes(command), command_field)

    def _status(self, data: bytes, command_field: int) -> int:
        fields = parse_command(data)
        if us(fields.get(COMMAND_FIELD)) != command_field:
            raise ProtocolError(f"unexpected command 0x{us(fields.get(COMMAND_FIELD)):04X}")
        if us(fields.get(MESSAGE_ID_RESPONDED)) != self._message_id:
            raise ProtocolError("response to a message we did not send")
        if STATUS not in fields:
            raise ProtocolError("response without a status")
        return us(fields[STATUS])

    def echo(self, context_id: int) -> int:
        """C-ECHO on an accepted Verification context; returns the status."""
        command = encode_echo_rq(self.next_message_id())
        with self._guard("sending C-ECHO"):
            self._sendmsg_all(self._frame(context_id, PDV_COMMAND, memoryview(command), True))
        return self.receive_response(C_ECHO_RSP)

    # -- the end ------------------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE; whatever happens, the connection is closed afterwards."""
        if self._closed:
            return
        try:
            self._sock.sendall(A_RELEASE_RQ)
            while self._read_pdu()[0] not in (A_RELEASE_RP_TYPE, A_ABORT_TYPE):
                pass
        except (OSError, ProtocolError) as exc:
            log.debug("release of %s incomplete: %s", self.where, exc)
        finally:
            self._close()

    def abort(self) -> None:
        """A-ABORT and close; never raises."""
        if not self._closed:
            with suppress(OSError):
                self._sock.sendall(A_ABORT_RQ)
            self._close()

    def _close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with suppress(OSError):
            self._reader.close()
            self._sock.close()

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn socket and protocol failures into typed errors; the connection is closed."""
        if self._closed:
            raise PeerAborted(f"association with {self.where} is already closed")
        try:
            yield
        except LocalReadError:
            self.abort()
            raise
        except ProtocolError as exc:
            self.abort()
            raise PeerAborted(f"{self.where} broke the DICOM protocol ({exc}); aborted") from exc
        except TimeoutError as exc:
            self.abort()
            timeout = f"{self.peer.timeout:g}s"
            raise PeerTimeout(f"{self.where} did not answer within {timeout} {doing}") from exc
        except PeerError:
            self._close()
            raise
        except ssl.SSLError as exc:
            self._close()
            if doing == NEGOTIATING:  # TLS 1.3: a refused client certificate shows up here
                message = (
                    f"{self.where} closed the TLS connection before the association "
                    f"({exc.reason or exc}): does it want a client certificate "
                    "(tls_cert/tls_key) it trusts?"
                )
                raise PeerTlsError(message) from exc
            raise PeerAborted(f"TLS connection to {self.where} lost {doing}: {exc}") from exc
        except OSError as exc:
            self._close()
            why = exc.strerror or str(exc) or type(exc).__name__
            raise PeerAborted(f"connection to {self.where} lost {doing}: {why}") from exc

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._reader.read(6)
        if len(header) < 6:
            raise ConnectionError("peer closed the connection")
        pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
        if length > MAX_INCOMING_PDU:
            raise ProtocolError(f"PDU of {length} bytes")
        body = self._reader.read(length)
        if len(body) < length:
            raise ConnectionError("peer closed the connection")
        return pdu_type, body

    def _aborted(self, body: bytes) -> PeerAborted:
        source = _ABORT_SOURCE.get(body[2] if len(body) > 2 else 0, "the peer")
        reason = body[3] if len(body) > 3 else 0
        return PeerAborted(f"{self.where}: association aborted by {source} (reason {reason})")


def _pdvs(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(message control header, fragment) of each PDV in a P-DATA-TF PDU."""
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            raise ProtocolError("truncated PDV")
        length = struct.unpack_from(">I", body, offset)[0]
        if length < 2 or offset + 4 + length > len(body):
            raise ProtocolError("PDV length exceeds its PDU")
        yield body[offset + 5], body[offset + 6 : offset + 4 + length]
        offset += 4 + length


def _connect(peer: DicomPeer) -> socket.socket:
    where = f"{peer.host}:{peer.port}"
    try:
        sock = socket.create_connection((peer.host, peer.port), timeout=peer.timeout)
    except TimeoutError as exc:
        raise PeerTimeout(f"no answer from {where} within {peer.timeout:g}s") from exc
    except ConnectionRefusedError as exc:
        raise PeerUnreachable(f"connection refused by {where}") from exc
    except socket.gaierror as exc:
        raise PeerUnreachable(f"cannot resolve {peer.host}: {exc.strerror}") from exc
    except OSError as exc:
        raise PeerUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if peer.tls is None:
        return sock
    try:  # the handshake is bounded by the socket's timeout, as every other wait
        return peer.tls.wrap_socket(sock, server_hostname=peer.host)
    except TimeoutError as exc:
        sock.close()
        raise PeerTimeout(f"no TLS handshake with {where} within {peer.timeout:g}s") from exc
    except (ssl.SSLError, ConnectionError) as exc:
        sock.close()
        raise PeerTlsError(f"{where}: {describe_failure(exc)}") from exc
    except OSError as exc:
        sock.close()
        raise PeerTlsError(f"{where}: TLS handshake failed: {exc.strerror or exc}") from exc


def _request_pdu(peer: DicomPeer, proposed: Sequence[tuple[str, tuple[str, ...]]]) -> bytes:
    return encode_associate_rq(
        peer.called_aet,
        peer.calling_aet,
        APPLICATION_CONTEXT,
        proposed,
        OUR_MAX_PDU,
        part10.IMPLEMENTATION_CLASS_UID.decode(),
        part10.IMPLEMENTATION_VERSION.decode(),
    )


def _refused(where: str, result: int, source: int, reason: int) -> PeerRefused:
    words = _RJ_REASON.get((source, reason), f"source {source}, reason {reason}")
    kind = _RJ_RESULT.get(result, f"result {result}")
    return PeerRefused(f"{where} rejected the association ({kind}): {words}", transient=result == 2)
