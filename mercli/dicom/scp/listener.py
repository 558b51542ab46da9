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

Four modules, one import surface: this one holds the `Listener` (admission decisions, one
thread per association, deadlines, shutdown) and re-exports everything callers use;
`mercli.dicom.scp.admission` reads the A-ASSOCIATE-RQ of every new connection in a single
thread; `mercli.dicom.scp.connection` runs one association (the DIMSE/P-DATA state machine and
the `StoreHandler` interface); `mercli.dicom.scp.negotiation` reads and writes the A-ASSOCIATE
PDUs and negotiates presentation contexts.

Hostile peers (SPEC §9): nothing large is allocated and no thread started before a request is
whole and accepted (AE titles first, then at most 128 distinct presentation contexts, then a
free slot); connections still without a request are capped and have a deadline; once
associated, a peer may be silent for `network_timeout` seconds between PDUs and each PDU must
arrive within `network_timeout` seconds too, so a peer trickling one byte at a time holds a
slot for a bounded time; at shutdown, associations get a grace period and are then aborted.

TLS (SPEC §6.1): with `tls`, one port speaks TLS: `tls_port` if given (then `port` stays
plain, and both share the association slots and the cap on waiting connections), else `port`
itself. The handshake is part of admission (`mercli.dicom.scp.admission`); an association
over TLS is served like any other, through an `ssl.SSLSocket`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from contextlib import suppress

from mercli.dicom import ACSE_TIMEOUT, NETWORK_TIMEOUT
from mercli.dicom.dimse import A_ABORT, ProtocolError
from mercli.dicom.scp.admission import Admission, Server, answer_and_close
from mercli.dicom.scp.connection import (
    CHUNK,
    Connection,
    DatasetSink,
    StoreHandler,
    StoreRequest,
)
from mercli.dicom.scp.negotiation import (
    APPLICATION_CONTEXT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    MAX_CONTEXTS,
    MAX_PDU,
    REJECT_BUSY,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    AssociationInfo,
    RequestSummary,
    context_refusal,
    encode_associate_rj,
    scan_associate_rq,
    title_refusal,
)
from mercli.names import printable

__all__ = [
    "APPLICATION_CONTEXT",
    "CHUNK",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "MAX_CONTEXTS",
    "MAX_PDU",
    "REJECT_BUSY",
    "REJECT_CALLED_AE",
    "REJECT_CALLING_AE",
    "AssociationInfo",
    "Connection",
    "DatasetSink",
    "Listener",
    "StoreHandler",
    "StoreRequest",
]

log = logging.getLogger(__name__)

ABORT_WAIT = 5.0  # seconds for aborted associations' threads to end before their sockets are cut
Refusal = tuple[tuple[int, int, int], str]


class Listener:
    """Accepts connections (TCP_NODELAY, SO_REUSEPORT) and serves each association in a thread.

    At most `max_associations` associations are served at once; further requests are
    rejected as transient (local limit exceeded), so senders retry later. At most
    `max_waiting` connections (default twice `max_associations`) may wait for their request
    to arrive (TLS handshake included), for at most `acse_timeout` seconds from connecting.
    `address` is where `port` listens, `tls_address` where TLS does (None: no TLS).
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: StoreHandler,
        *,
        max_associations: int = 32,
        max_waiting: int | None = None,
        acse_timeout: float = ACSE_TIMEOUT,
        network_timeout: float = NETWORK_TIMEOUT,
        tls: ssl.SSLContext | None = None,
        tls_port: int | None = None,
    ) -> None:
        self.handler = handler
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        servers: list[Server] = [(_listen(host, port), tls if tls_port is None else None)]
        if tls is not None and tls_port is not None:
            try:
                servers.append((_listen(host, tls_port), tls))
            except OSError:
                servers[0][0].close()
                raise
        self._servers = [server for server, _ in servers]
        self.sock = self._servers[0]
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.tls_address: tuple[str, int] | None = next(
            (server.getsockname()[:2] for server, context in servers if context), None
        )
        self._associations: dict[threading.Thread, Connection] = {}  # one per slot taken
        self._lock = threading.Lock()
        self._admission = Admission(
            servers,
            self._on_request,
            cap=max_waiting or 2 * max_associations,
            timeout=acse_timeout,
        )
        self._acceptor = threading.Thread(target=self._admission.run, name="acceptor", daemon=True)
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def start(self) -> Listener:
        self._acceptor.start()
        self._watchdog.start()
        return self

    # -- admission: in the acceptor thread, once a request is whole -----------------------------

    def _on_request(self, sock: socket.socket, address: tuple[str, int], pdu: bytes) -> None:
        """Admit a whole A-ASSOCIATE-RQ or refuse it: AE titles first, then presentation
        contexts, then a slot; only an admitted request gets a thread (and its buffers)."""
        try:
            summary = scan_associate_rq(pdu)
        except ProtocolError as exc:
            log.warning("aborting association from %s: %s", printable(address[0]), exc)
            answer_and_close(sock, A_ABORT)
            return
        info = AssociationInfo(
            calling_aet=summary.calling or "",
            called_aet=summary.called or "",
            address=address[0],
            port=address[1],
        )
        refusal = self._refusal(summary, info)
        if refusal is not None:
            rejection, why = refusal
            log.info(
                "association from %s (%s) rejected (%d, %d, %d)%s",
                printable(summary.raw_calling),
                printable(address[0]),
                *rejection,
                f": {why}" if why else "",
            )
            answer_and_close(sock, encode_associate_rj(rejection))
            return
        connection = Connection(
            sock, self.handler, info, summary.pdu, network_timeout=self.network_timeout
        )
        thread = threading.Thread(
            target=self._serve, args=(connection,), name=f"association {address[0]}", daemon=True
        )
        with self._lock:
            self._associations[thread] = connection
        thread.start()

    def _refusal(self, summary: RequestSummary, info: AssociationInfo) -> Refusal | None:
        """Why a request is refused, checked cheapest and most telling first; None: admit.
        Only the acceptor thread adds associations, so a free slot seen here stays free."""
        refusal = title_refusal(summary)
        if refusal is None:
            rejection = self.handler.accept(info)
            refusal = (rejection, "") if rejection is not None else context_refusal(summary)
        if refusal is None and self.open_associations() >= self.max_associations:
            refusal = REJECT_BUSY, f"{self.max_associations} associations open"
        return refusal

    def _serve(self, connection: Connection) -> None:
        try:
            connection.serve()
        finally:
            with self._lock:
                del self._associations[threading.current_thread()]

    def _watch(self) -> None:
        """Abort associations whose current PDU is overdue (see `Connection.pdu_deadline`)."""
        tick = min(1.0, max(0.05, self.network_timeout / 8))
        while not self._stopped.wait(tick):
            now = time.monotonic()
            for connection in self._open():
                if connection.pdu_deadline < now:
                    connection.expire(f"a PDU took more than {self.network_timeout:g} s")

    # -- state and shutdown ---------------------------------------------------------------------

    def _open(self) -> list[Connection]:
        with self._lock:
            return list(self._associations.values())

    def open_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    def waiting_connections(self) -> int:
        """Connections whose association request is not whole yet."""
        return self._admission.waiting()

    def close(self) -> None:
        """Stop accepting: connections without an association are closed, associations go on."""
        self._admission.close()
        self._acceptor.join(timeout=5)
        for server in self._servers:
            with suppress(OSError):
                server.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every association to end; True if they all did."""
        deadline = time.monotonic() + timeout
        while self.open_associations():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def shutdown(self, grace: float) -> int:
        """After close(): give open associations `grace` seconds to end, then abort the rest
        (A-ABORT; an unfinished instance is discarded, never acknowledged). Returns how many
        were aborted. Bounded: a thread stuck sending to a peer that does not read has its
        socket cut after `ABORT_WAIT` seconds."""
        aborted = 0
        if not self.wait_idle(grace):
            remaining = self._open()
            aborted = len(remaining)
            for connection in remaining:
                connection.expire("the receiver is shutting down")
            if not self.wait_idle(ABORT_WAIT):
                for connection in self._open():
                    connection.cut()
                self.wait_idle(ABORT_WAIT)
        self._stopped.set()
        return aborted


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket that other receiving processes may share (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
