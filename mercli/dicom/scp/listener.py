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

Three modules, one import surface: this one holds the `Listener` that accepts sockets and
re-exports everything callers use; `mercli.dicom.scp.connection` runs one connection (the
DIMSE/P-DATA state machine and the `StoreHandler` interface); `mercli.dicom.scp.negotiation`
reads and writes the A-ASSOCIATE PDUs and negotiates presentation contexts.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from mercli.dicom import ACSE_TIMEOUT, NETWORK_TIMEOUT
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
    REJECT_BUSY,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    AssociationInfo,
)

__all__ = [
    "APPLICATION_CONTEXT",
    "CHUNK",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
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
        acse_timeout: float = ACSE_TIMEOUT,
        network_timeout: float = NETWORK_TIMEOUT,
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
