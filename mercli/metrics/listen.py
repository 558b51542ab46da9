"""`mercli metrics --listen`: prometheus_client's WSGI exposition, served with bounds.

prometheus_client's own `start_http_server` runs one thread per connection with no timeout at
all: a client that connects and sends nothing holds a thread for ever, and enough of them
hold as many threads as they like. Here the same WSGI app runs on a server that admits at most
`MAX_CLIENTS` connections at once (the next is closed before any thread is made for it) and
gives each one `CLIENT_DEADLINE` seconds in all, however slowly it trickles bytes: then its
socket is shut down. So a hostile or hung client never blocks the next scrape for long, and
never makes the exporter allocate without bound.
"""

from __future__ import annotations

import logging
import socket
import threading
from contextlib import suppress
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from mercli.errors import ListenError, UsageError

log = logging.getLogger(__name__)

MAX_CLIENTS = 16  # connections served at once; Prometheus needs one per scrape
CLIENT_DEADLINE = 10.0  # seconds a connection may take in all (Prometheus' default timeout)


class _QuietHandler(WSGIRequestHandler):
    """Request lines go to the debug log, not to stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class BoundedServer(WSGIServer):
    """A threading WSGI server with a cap on connections and a deadline for each."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        family: socket.AddressFamily = socket.AF_INET,
        max_clients: int = MAX_CLIENTS,
        deadline: float = CLIENT_DEADLINE,
    ) -> None:
        self.address_family = family
        self.deadline = deadline
        self.max_clients = max_clients
        self.clients = 0  # connections being served now
        self._count_lock = threading.Lock()
        super().__init__(address, _QuietHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit before allocating: no free slot, no thread; the connection is just closed."""
        with self._count_lock:
            admitted = self.clients < self.max_clients
            self.clients += admitted
        if not admitted:
            log.warning("metrics listener: %s refused, all slots busy", client_address[0])
            self.shutdown_request(request)
            return
        try:
            thread = threading.Thread(
                target=self._serve_one, args=(request, client_address), daemon=True
            )
            thread.start()
        except BaseException:
            self._leave()
            self.shutdown_request(request)
            raise

    def _leave(self) -> None:
        with self._count_lock:
            self.clients -= 1

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(self.deadline)
        cut = threading.Timer(self.deadline, _cut, (request,))
        cut.daemon = True
        cut.start()
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            cut.cancel()
            self.shutdown_request(request)
            self._leave()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or was cut off is not worth a traceback on stderr."""
        log.debug("metrics listener: client %s", client_address[0], exc_info=True)


def _cut(request: socket.socket) -> None:
    """The deadline passed: wake the blocked read or write with EOF/EPIPE."""
    with suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses) as (host, port); UsageError else."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen wants HOST:PORT, e.g. 127.0.0.1:9400 (got {value!r})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def serve(registry: CollectorRegistry, host: str, port: int, **bounds: Any) -> BoundedServer:
    """Bind and start serving the registry in a background thread; ListenError if we cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = BoundedServer((host, port), family=family, **bounds)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True)
    thread.start()
    return server
