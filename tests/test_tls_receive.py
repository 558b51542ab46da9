"""`mercli receive` with DICOM TLS (SPEC §6.1), both engines, against DCMTK's storescu/echoscu.

Every certificate comes from `tests.certs.make_pki`: a CA with a server certificate for
localhost/127.0.0.1 and a client certificate, and another CA with its own certificate, which
must be refused wherever the first CA is expected.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.certs import Pki, make_pki
from tests.dicomfiles import dataset_bytes, make_instance
from tests.netkit import (
    DCMTK_ENV,
    Receiver,
    dcmtk,
    free_port,
    port_open,
    receiver,
    storescu,
    wait_until,
)
from tests.test_receive import stored

ENGINES = {"default": ("--processes", "1"), "dcmtk": ("--engine", "dcmtk", "--processes", "1")}
HOSTS = {"default": "127.0.0.1", "dcmtk": None}  # the dcmtk engine refuses --host


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    source = tmp_path / "source"
    source.mkdir()
    return [make_instance(source, series="1.2.826.0.1.3680043.9.7", number=n) for n in range(4)]


def server_args(pki: Pki, *more: str) -> tuple[str, ...]:
    return ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), *more)


def client_args(pki: Pki, *, ca: Path | None = None, cert: str = "client") -> list[str]:
    """storescu/echoscu TLS options: verify the server against `ca` (default: our CA) and
    present the client certificate (`cert="client"`), the other CA's (`"other"`), or none."""
    verify = ["+cf", str(ca or pki.ca)]
    if cert == "none":
        return ["+tla", *verify]
    key, certificate = {
        "client": (pki.client_key, pki.client_cert),
        "other": (pki.other_key, pki.other_cert),
    }[cert]
    return ["+tls", str(key), str(certificate), "-pw", *verify]


def echoscu(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return dcmtk(["echoscu", "-aec", "MERCLI", *extra, "127.0.0.1", str(port)], timeout=60)


def assert_stored(spool: Path, files: list[Path]) -> None:
    """Every file is in incoming/, its dataset byte for byte as sent."""
    wait_until(lambda: len(stored(spool)) >= len(files), what="files published")
    found = stored(spool)
    assert len(found) == len(files)
    for path in files:
        sop = path.name.removesuffix(".dcm")
        assert dataset_bytes(found[sop]) == dataset_bytes(path), path.name


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start(spool: Path, engine: str, *args: str) -> AbstractContextManager[Receiver]:
    """`mercli receive` with `engine` on a free port (see tests.netkit.receiver)."""
    return receiver(spool, *ENGINES[engine], *args, host=HOSTS[engine])


# -- the happy paths ----------------------------------------------------------------------------


def test_storescu_over_tls_is_stored_byte_for_byte(
    tmp_path: Path, pki: Pki, series: list[Path], engine: str
) -> None:
    spool = tmp_path / "spool"
    with start(spool, engine, *server_args(pki)) as running:
        result = storescu(running.port, series, *client_args(pki))
        assert result.returncode == 0, result.stderr
        assert_stored(spool, series)
        echo = echoscu(running.port, *client_args(pki))
        assert echo.returncode == 0, echo.stderr
        # the only port is TLS: a plain peer fails, and the listener goes on
        plain = storescu(running.port, series[:1])
        assert plain.returncode != 0
        assert echoscu(running.port, *client_args(pki, cert="none")).returncode == 0
    assert "refused" in running.output() and "127.0.0.1" in running.output()


def test_plain_and_tls_ports_at_once(
    tmp_path: Path, pki: Pki, series: list[Path], engine: str
) -> None:
    spool = tmp_path / "spool"
    tls_port = free_port()
    with start(spool, engine, *server_args(pki, "--tls-port", str(tls_port))) as running:
        wait_until(lambda: port_open(tls_port), what="the TLS port")
        assert storescu(running.port, series[:2]).returncode == 0  # plain on --port
        result = storescu(tls_port, series[2:], *client_args(pki))
        assert result.returncode == 0, result.stderr
        assert storescu(tls_port, series[:1]).returncode != 0  # plain on the TLS port
        assert echoscu(running.port, *client_args(pki)).returncode != 0  # TLS on the plain one
        assert echoscu(running.port).returncode == 0
        assert echoscu(tls_port, *client_args(pki)).returncode == 0
        assert_stored(spool, series)


# -- who is refused -----------------------------------------------------------------------------


def test_mutual_tls_refuses_peers_without_a_certificate_from_our_ca(
    tmp_path: Path, pki: Pki, series: list[Path], engine: str
) -> None:
    spool = tmp_path / "spool"
    args = server_args(pki, "--tls-ca", str(pki.ca), "--tls-require-client-cert")
    with start(spool, engine, *args) as running:
        assert storescu(running.port, series[:1], *client_args(pki, cert="none")).returncode != 0
        assert storescu(running.port, series[:1], *client_args(pki, cert="other")).returncode != 0
        result = storescu(running.port, series, *client_args(pki))  # right after: served
        assert result.returncode == 0, result.stderr
        assert_stored(spool, series)
    log = running.output()
    assert log.count("refused") >= 2 and "127.0.0.1" in log
    assert "certificate" in log  # the reason, in words


def test_client_that_trusts_another_ca_refuses_us(
    tmp_path: Path, pki: Pki, series: list[Path], engine: str
) -> None:
    spool = tmp_path / "spool"
    with start(spool, engine, *server_args(pki)) as running:
        wrong = storescu(running.port, series[:1], *client_args(pki, ca=pki.other_ca))
        assert wrong.returncode != 0
        assert "certificate verify failed" in wrong.stderr + wrong.stdout
        assert echoscu(running.port, *client_args(pki)).returncode == 0
    assert not stored(spool)


# -- hostile connections ------------------------------------------------------------------------


def closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    """Wait for the receiver to close `sock` (end of file, or a reset); then close it too.
    Whatever it sent before (a TLS alert) is read and dropped."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_silent_and_garbage_connections_are_dropped_without_blocking_others(
    tmp_path: Path, pki: Pki, series: list[Path], engine: str
) -> None:
    spool = tmp_path / "spool"
    timeouts = ("--acse-timeout", "2s") if engine == "default" else ("--network-timeout", "2s")
    with start(spool, engine, *server_args(pki), *timeouts) as running:
        silent = socket.create_connection(("127.0.0.1", running.port))
        garbage = socket.create_connection(("127.0.0.1", running.port))
        garbage.sendall(b"\x01\x00\x00\x00\x00\x10" + b"not a TLS record" * 64)
        started = time.monotonic()
        result = storescu(running.port, series, *client_args(pki))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 2  # neither held the listener
        for sock in (garbage, silent):
            assert closed_by_peer(sock)
        assert time.monotonic() - started < 8
        assert_stored(spool, series)
    log = running.output()
    assert "127.0.0.1" in log and "refused" in log
    if engine == "default":
        assert "no TLS handshake from 127.0.0.1 within 2 s" in log


def test_handshakes_count_against_the_cap_on_waiting_connections(
    tmp_path: Path, pki: Pki, series: list[Path]
) -> None:
    """--max-associations 1 allows 2 connections without an association: a third one that
    has not finished its handshake closes the one waiting longest, long before the deadline."""
    spool = tmp_path / "spool"
    args = (*server_args(pki), "--max-associations", "1", "--acse-timeout", "30s")
    with start(spool, "default", *args) as running:
        waiting = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(3)]
        started = time.monotonic()
        assert closed_by_peer(waiting[0])
        assert time.monotonic() - started < 5
        for sock in waiting:
            sock.close()
        result = storescu(running.port, series, *client_args(pki))
        assert result.returncode == 0, result.stderr


# -- options ------------------------------------------------------------------------------------


def run_receive(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mercli", "receive", "--spool", str(tmp_path / "spool")]
    return subprocess.run(
        [*command, "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("engine_args", [(), ("--engine", "dcmtk")], ids=["default", "dcmtk"])
def test_unusable_files_exit_2_naming_the_file_not_its_content(
    tmp_path: Path, pki: Pki, engine_args: tuple[str, ...]
) -> None:
    missing = tmp_path / "missing.key"
    result = run_receive(
        tmp_path, *engine_args, "--tls-cert", str(pki.server_cert), "--tls-key", str(missing)
    )
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and "no such file" in result.stderr
    secret = "SECRET-LINE-THAT-MUST-NOT-BE-PRINTED"
    broken = tmp_path / "broken.pem"
    broken.write_text(f"-----BEGIN CERTIFICATE-----\n{secret}\n-----END CERTIFICATE-----\n")
    result = run_receive(
        tmp_path, *engine_args, "--tls-cert", str(broken), "--tls-key", str(pki.server_key)
    )
    assert result.returncode == 2, result.stderr
    assert str(broken) in result.stderr and secret not in result.stderr + result.stdout
    wrong_key = run_receive(
        tmp_path, *engine_args, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)
    )
    assert wrong_key.returncode == 2 and str(pki.server_cert) in wrong_key.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-port", "2762"), "needs --tls-cert"),
        (("--tls-ca", "ca.pem"), "needs --tls-cert"),
        (("--tls-cert", "c.pem", "--tls-require-client-cert"), "needs --tls-ca"),
    ],
)
def test_tls_options_without_their_partners_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = run_receive(tmp_path, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
