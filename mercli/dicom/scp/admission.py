"""Admission: every accepted connection, until its A-ASSOCIATE-RQ is whole, in one thread.

Why one selector thread and not a thread per connection: a connection that has not asked for
an association has proved nothing yet. Given a thread and a streaming buffer at accept time,
1000 sockets sending one byte each cost 1 GB and 1000 threads before any AE title was
checked. Here a waiting connection costs a socket and the bytes of its request so far, and
only a whole request is handed on (`on_request`), which checks AE titles, presentation
contexts and association slots before any thread starts (`mercli.dicom.scp.listener`).

The limits (SPEC §9):

- At most `cap` connections wait for their request at once. When one more arrives, the one
  that has waited longest is closed: a peer that connects and trickles cannot lock out real
  senders, which send their request the moment they connect.
- The whole request must arrive within `timeout` seconds of the connection: a deadline, not
  a per-read timeout, so one byte every 20 s does not keep a connection.
- A first PDU that is not an A-ASSOCIATE-RQ, or one longer than `MAX_ASSOCIATE_RQ`, is
  answered with A-ABORT as soon as its 6-byte header is read; its body is never buffered.

TLS (PS3.15 Annex B): a listening socket may come with an `ssl.SSLContext`. Its connections
do the TLS handshake here, non-blocking, before their request is read, so a handshake is a
waiting connection like any other: counted in `cap`, and bounded by the same deadline from
connecting. A failed handshake (a plain peer, an unknown CA, no client certificate, garbage)
is logged with the peer's address and the reason and costs that connection only. The
handshake's CPU (one signature, one key exchange) runs in this thread: about a millisecond.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress

from mercli.dicom.dimse import A_ABORT, A_ASSOCIATE_RQ_TYPE
from mercli.dicom.scp.negotiation import MAX_ASSOCIATE_RQ
from mercli.dicom.tls import describe_failure
from mercli.names import printable

log = logging.getLogger("mercli.dicom.scp.listener")  # one name for the whole accepting side

HEADER = 6  # PDU type, reserved, 4-byte length
MIN_ASSOCIATE_RQ = 68  # the fixed fields of an A-ASSOCIATE-RQ (PS3.8 9.3.2)
ACCEPT_BATCH = 64  # connections accepted in a row before the waiting ones are read again
WARN_EVERY = 60.0  # seconds between warnings about dropped connections

OnRequest = Callable[[socket.socket, tuple[str, int], bytes], None]
Server = tuple[socket.socket, ssl.SSLContext | None]  # a listening socket; a context: TLS on it


def shutdown_socket(sock: socket.socket, how: int) -> None:
    """`sock.shutdown(how)` on the file descriptor itself, also for an `ssl.SSLSocket`: its own
    shutdown() drops the TLS state first, so a thread reading would crash and anything sent
    afterwards (our A-ABORT) would leave in clear text."""
    socket.socket.shutdown(sock, how)


def answer_and_close(sock: socket.socket, pdu: bytes) -> None:
    """Send our last PDU (A-ABORT, A-ASSOCIATE-RJ) on a non-blocking socket, then close.

    Closing with unread data sends a reset, which can destroy our answer before the peer
    reads it; so what the peer has already sent (up to 64 KiB) is read and dropped first. A
    peer that does not read cannot stall us: our answer fits any socket buffer anyway.
    """
    with suppress(OSError):
        sock.send(pdu)
        shutdown_socket(sock, socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(4096):
                break
    sock.close()


class _Waiting:
    """One connection whose A-ASSOCIATE-RQ is not whole yet."""

    __slots__ = ("address", "data", "deadline", "handshaking", "size", "sock")

    def __init__(self, sock: socket.socket, address: tuple[str, int], deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.data = bytearray()
        self.size = HEADER  # bytes to read in all: the header, then header + PDU length
        self.handshaking = isinstance(sock, ssl.SSLSocket)  # TLS handshake still to finish


def header_problem(header: bytes | bytearray) -> str | None:
    """Why a first PDU with this header is refused before its body is read (None: it is not)."""
    kind, length = header[0], struct.unpack_from(">I", header, 2)[0]
    if kind != A_ASSOCIATE_RQ_TYPE:
        return f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}"
    if length > MAX_ASSOCIATE_RQ:
        return f"A-ASSOCIATE-RQ of {length} bytes: more than {MAX_ASSOCIATE_RQ >> 10} KiB"
    if length < MIN_ASSOCIATE_RQ:
        return f"A-ASSOCIATE-RQ of {length} bytes: too short"
    return None


class Admission:
    """Accepts on `servers` and reads each connection's A-ASSOCIATE-RQ (see module docstring).

    `on_request(sock, address, pdu)` is called in this thread with the socket (still
    non-blocking; an `ssl.SSLSocket`, handshake done, on a TLS server) and the whole request;
    from then on the socket is its to close.
    """

    def __init__(
        self, servers: Sequence[Server], on_request: OnRequest, *, cap: int, timeout: float
    ) -> None:
        self.servers = {server: context for server, context in servers}
        self.on_request = on_request
        self.cap = max(1, cap)
        self.timeout = timeout
        self._waiting: dict[socket.socket, _Waiting] = {}  # oldest first (insertion order)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._dropped = 0
        self._warn_at = 0.0

    def waiting(self) -> int:
        return len(self._waiting)

    def run(self) -> None:
        """Accept and read requests until close(); then close every connection still waiting."""
        for server in self.servers:
            server.setblocking(False)
            self._selector.register(server, selectors.EVENT_READ, server)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._closed.is_set():
                for key, _ in self._selector.select(self._next_timeout()):
                    if isinstance(key.data, socket.socket):  # a listening socket
                        self._accept(key.data)
                    elif key.fileobj is self._wake_r:
                        with suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        self._read_if_waiting(key.data)
                self._expire()
        finally:
            for waiting in list(self._waiting.values()):
                self._drop(waiting)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def close(self) -> None:
        """Make run() return (from any thread); the waiting connections are closed."""
        self._closed.set()
        with suppress(OSError):
            self._wake_w.send(b"\0")

    # -- connections ----------------------------------------------------------------------------

    def _accept(self, server: socket.socket) -> None:
        context = self.servers[server]
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = server.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            if len(self._waiting) >= self.cap:
                self._drop_oldest()
            sock.setblocking(False)
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:  # nothing is exchanged yet: the handshake starts in _read
                try:
                    sock = context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                except (OSError, ValueError) as exc:  # reset already: this connection only
                    log.info("connection from %s lost: %s", printable(str(address[0])), exc)
                    sock.close()
                    continue
            peer = (str(address[0]), int(address[1]))
            waiting = _Waiting(sock, peer, time.monotonic() + self.timeout)
            self._waiting[sock] = waiting
            self._selector.register(sock, selectors.EVENT_READ, waiting)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of file descriptors: free one by dropping the longest waiter, or pause briefly
        (the listening socket stays readable; retrying at once would spin)."""
        if exc.errno in (errno.EMFILE, errno.ENFILE) and self._waiting:
            self._drop_oldest()
            return
        log.warning("cannot accept a connection: %s", exc.strerror or exc)
        self._closed.wait(0.1)

    def _read_if_waiting(self, waiting: _Waiting) -> None:
        """Read, unless the connection was dropped since select() reported it."""
        if self._waiting.get(waiting.sock) is not waiting:
            return
        if waiting.handshaking and not self._handshake(waiting):
            return
        self._read(waiting)
        # TLS may hold decrypted bytes that select() cannot see: read them now
        while (
            self._waiting.get(waiting.sock) is waiting
            and isinstance(waiting.sock, ssl.SSLSocket)
            and waiting.sock.pending()
        ):
            self._read(waiting)

    def _handshake(self, waiting: _Waiting) -> bool:
        """One step of the TLS handshake; True once it is done and the request may be read."""
        assert isinstance(waiting.sock, ssl.SSLSocket)
        try:
            waiting.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(waiting.sock, selectors.EVENT_READ, waiting)
            return False
        except ssl.SSLWantWriteError:
            self._selector.modify(waiting.sock, selectors.EVENT_WRITE, waiting)
            return False
        except OSError as exc:  # ssl.SSLError included
            self._handshake_failed(waiting, exc)
            return False
        waiting.handshaking = False
        self._selector.modify(waiting.sock, selectors.EVENT_READ, waiting)
        log.debug("TLS %s with %s", waiting.sock.version(), printable(waiting.address[0]))
        return True

    def _handshake_failed(self, waiting: _Waiting, exc: OSError) -> None:
        """Log why (a peer that just closes, like a port probe, at info level) and drop it."""
        who = printable(waiting.address[0])
        if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
            log.info("connection from %s closed during the TLS handshake", who)
        else:
            log.warning("TLS connection from %s refused: %s", who, describe_failure(exc))
        self._drop(waiting)

    def _read(self, waiting: _Waiting) -> None:
        try:
            chunk = waiting.sock.recv(min(waiting.size - len(waiting.data), 1 << 16))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            self._drop(waiting)
            return
        if not chunk:  # closed before asking (a port probe) or reset
            self._drop(waiting)
            return
        waiting.data += chunk
        if len(waiting.data) == HEADER:
            problem = header_problem(waiting.data)
            if problem is not None:
                who = printable(waiting.address[0])
                log.warning("aborting connection from %s: %s", who, problem)
                self._abort(waiting)
                return
            waiting.size = HEADER + struct.unpack_from(">I", waiting.data, 2)[0]
        if len(waiting.data) == waiting.size:
            self._forget(waiting)
            self._hand_on(waiting)

    def _hand_on(self, waiting: _Waiting) -> None:
        try:
            self.on_request(waiting.sock, waiting.address, bytes(waiting.data))
        except Exception:  # a bug must cost this connection only, loudly, never the listener
            log.exception("internal error admitting %s", printable(waiting.address[0]))
            waiting.sock.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for waiting in list(self._waiting.values()):
            if waiting.deadline > now:
                return  # one timeout for all: insertion order is deadline order
            log.info(
                "no %s from %s within %g s: connection closed",
                "TLS handshake" if waiting.handshaking else "whole A-ASSOCIATE-RQ",
                printable(waiting.address[0]),
                self.timeout,
            )
            self._drop(waiting)

    def _next_timeout(self) -> float | None:
        for waiting in self._waiting.values():
            return max(0.0, waiting.deadline - time.monotonic())
        return None

    def _drop_oldest(self) -> None:
        self._drop(next(iter(self._waiting.values())))
        self._dropped += 1
        now = time.monotonic()
        if now >= self._warn_at:
            self._warn_at = now + WARN_EVERY
            log.warning(
                "more than %d connections without an association request: closing the ones "
                "waiting longest (%d so far)",
                self.cap,
                self._dropped,
            )

    def _abort(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        answer_and_close(waiting.sock, A_ABORT)

    def _forget(self, waiting: _Waiting) -> None:
        del self._waiting[waiting.sock]
        self._selector.unregister(waiting.sock)

    def _drop(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        waiting.sock.close()
