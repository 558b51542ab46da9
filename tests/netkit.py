"""Real peers on loopback: free ports, DCMTK commands, and `mercli receive` as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK leaves Nagle on otherwise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float = 20.0, what: str = "", max_delay: float = 0.1
) -> None:
    """Poll `condition` until true; fail after `timeout` seconds (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    delay = min(0.005, max_delay)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def dcmtk(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1, capturing its output."""
    return subprocess.run(
        list(args), capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout, check=False
    )


def storescu(
    port: int, files: Sequence[str | Path], *extra: str, aec: str = "MERCLI"
) -> subprocess.CompletedProcess[str]:
    return dcmtk(["storescu", "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)])


class Receiver:
    """`mercli receive` in a subprocess on a free port, stopped with SIGTERM."""

    def __init__(
        self, spool: Path, *args: str, port: int | None = None, host: str | None = "127.0.0.1"
    ) -> None:
        self.spool = spool
        self.host = host  # None: leave --host out (the dcmtk engine refuses it)
        self.port = port or free_port()
        self.args = args
        self.process: subprocess.Popen[str] | None = None
        self.log = spool.parent / f"receive-{self.port}.log"

    def start(self) -> Receiver:
        command = [
            sys.executable,
            "-m",
            "mercli",
            "receive",
            "--spool",
            str(self.spool),
            "--port",
            str(self.port),
            *(["--host", self.host] if self.host else []),
            *self.args,
        ]
        self.log_file = self.log.open("w")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=DCMTK_ENV
        )
        wait_until(
            lambda: port_open(self.port) or self.process.poll() is not None,
            what="receiver to listen",
        )  # type: ignore[union-attr]
        assert self.process.poll() is None, self.log.read_text()
        return self

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.log_file.close()
        return code

    def output(self) -> str:
        return self.log.read_text()


@contextmanager
def receiver(spool: Path, *args: str, host: str | None = "127.0.0.1") -> Iterator[Receiver]:
    running = Receiver(spool, *args, host=host).start()
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            code = running.stop()
            assert code == 0, f"receiver exited {code}:\n{running.output()}"


def published(path: Path, timeout: float = 15.0) -> Path:
    """`path` (an instance in incoming/) once receive has published it with its sidecar.

    Receive answers success once an instance is durable in its journal and publishes it into
    incoming/ right after (mercli.spool.journal): a test that looks at incoming/ the moment
    the sender got its answer waits that moment."""
    wait_until(
        lambda: path.exists() and path.with_suffix(".tags").exists(),
        timeout=timeout,
        what=f"{path.name} published",
    )
    return path
