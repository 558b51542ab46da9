"""`dicomweb` targets (STOW-RS) against a real Orthanc with its DICOMweb plugin, and against a
small local STOW server for what Orthanc will not do on demand (bearer tokens, per-instance
failures and warnings, error statuses, hostile answers, TLS)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import generate_uid

from mercli.cli import cli
from mercli.dicom.tls import server_context
from mercli.dispatch.targets import dicomweb
from mercli.dispatch.targets.base import Attempt
from mercli.jobs import JobInfo, Progress, Target
from mercli.spool import ERROR, SUCCESS, Spool
from tests.certs import make_pki
from tests.dicomfiles import make_instance
from tests.kit import ROOT
from tests.netkit import free_port
from tests.orthanckit import Orthanc, orthanc
from tests.test_dispatch import dispatch_once, routed, rules_for

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB = {"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
PASSWORD = "s3cret-Pa55-word-Zq"  # distinctive, so a leak anywhere is found by grep
TOKEN = "tok-9f8e7d6c5b4a-Zq"
SUCCESS_CODE = 0


@pytest.fixture(scope="module", autouse=True)
def plugin_installed() -> None:
    """Orthanc and its DICOMweb plugin are required: missing is a failure, never a skip."""
    if not PLUGIN.is_file():
        pytest.fail(f"{PLUGIN} is missing: apt-get install orthanc orthanc-dicomweb")


# -- helpers --------------------------------------------------------------------------------


def series(folder: Path, count: int, **attrs: Any) -> list[Path]:
    """`count` instances of one series with sidecars, as a job folder holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    made = []
    for n in range(count):
        path = make_instance(folder, series=uid, number=n + 1, **attrs)
        sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        path.with_suffix(".tags").write_text(
            json.dumps({"SOPInstanceUID": sop, "InstanceNumber": n + 1})
        )
        made.append(path)
    return made


def job_for(target: Target, studies: tuple[str, ...] = ()) -> JobInfo:
    return JobInfo("job-1", target, "1.2.3", "", time.time(), series=studies)


def web_target(url: str, **options: Any) -> Target:
    return Target(name="web", type="dicomweb", url=url, timeout=10.0, **options)


def orthanc_url(server: Orthanc) -> str:
    return f"http://127.0.0.1:{server.http_port}/dicom-web"


class Counted:
    """Counts the requests and connections http.client makes (to see batches and keep-alive)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests = self.connects = 0
        request, connect = dicomweb.http.client.HTTPConnection.request, socket.create_connection

        def counted_request(conn: Any, *args: Any, **kwargs: Any) -> Any:
            self.requests += 1
            return request(conn, *args, **kwargs)

        def counted_connect(*args: Any, **kwargs: Any) -> Any:
            self.connects += 1
            return connect(*args, **kwargs)

        monkeypatch.setattr(dicomweb.http.client.HTTPConnection, "request", counted_request)
        monkeypatch.setattr(dicomweb.http.client.socket, "create_connection", counted_connect)


# -- a local STOW server ----------------------------------------------------------------------


class Stub:
    """A STOW-RS endpoint on loopback that records each request and answers as told.

    `fail` / `warn`: SOP Instance UID -> reason code for the next answers; `status` / `body`:
    a canned answer instead; `sink`: only hash the body (for instances of a GB). Requests
    go over HTTP/1.1 keep-alive, so `requests` shows which connection each came on.
    """

    def __init__(self, token: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.fail: dict[str, int] = {}
        self.warn: dict[str, int] = {}
        self.status: int | None = None
        self.body = b""
        self.sink = False
        self.hang_up = False  # close each connection after answering, without saying so
        self.requests: list[dict[str, Any]] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                stub.handle(self)

        return Handler

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        length = int(request.headers["Content-Length"])
        record: dict[str, Any] = {
            "path": request.path,
            "peer": request.client_address[1],
            "length": length,
            "chunked": "Transfer-Encoding" in request.headers,
            "type": request.headers["Content-Type"],
            "accept": request.headers["Accept"],
        }
        if self.sink:
            record |= self._hash(request.rfile, length)
        else:
            record["uids"] = parts_uids(request.headers["Content-Type"], request.rfile.read(length))
        self.requests.append(record)
        if self.token is not None and request.headers["Authorization"] != f"Bearer {self.token}":
            echo = f"bad credentials: {request.headers['Authorization']}".encode()
            return self.answer(request, 401, echo)
        if self.status is not None:
            return self.answer(request, self.status, self.body)
        self.answer(request, *stow_answer(record.get("uids", []), self.fail, self.warn))
        request.close_connection = self.hang_up

    @staticmethod
    def _hash(stream: Any, length: int) -> dict[str, Any]:
        digest, left = hashlib.sha256(), length
        while left:
            chunk = stream.read(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
        return {"sha256": digest.hexdigest()}

    @staticmethod
    def answer(request: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "application/dicom+json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def parts_uids(content_type: str, body: bytes) -> list[str]:
    """The SOP Instance UIDs of a multipart/related body, in order."""
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    assert body.endswith(b"--" + boundary + b"--\r\n"), "body does not end with the close"
    uids = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        uids.append(str(dcmread(BytesIO(data[:-2]), stop_before_pixels=True).SOPInstanceUID))
    return uids


def stow_answer(uids: list[str], fail: dict[str, int], warn: dict[str, int]) -> tuple[int, bytes]:
    """A DICOM JSON STOW response: 202 if anything failed or warned, else 200."""

    def item(uid: str, tag: str | None = None, code: int = 0) -> dict[str, Any]:
        found: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }
        if tag:
            found[tag] = {"vr": "US", "Value": [code]}
        return found

    referenced = [
        item(u, "00081196" if u in warn else None, warn.get(u, 0)) for u in uids if u not in fail
    ]
    failed = [item(u, "00081197", fail[u]) for u in uids if u in fail]
    record: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": referenced}}
    if failed:
        record["00081198"] = {"vr": "SQ", "Value": failed}
    status = 202 if failed or any(u in warn for u in uids) else 200
    return status, json.dumps(record).encode()


@pytest.fixture
def stub() -> Iterator[Callable[..., Stub]]:
    started: list[Stub] = []

    def start(*args: Any, **kwargs: Any) -> Stub:
        started.append(Stub(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


# -- against Orthanc --------------------------------------------------------------------------


def test_series_reaches_orthanc_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = series(tmp_path / "job", 6)
    counted = Counted(monkeypatch)
    with orthanc(tmp_path / "orthanc", config=DICOMWEB) as server:
        progress = Progress()
        counted.requests = counted.connects = 0  # starting Orthanc polled its ports
        result = dicomweb.deliver(
            tmp_path / "job", job_for(web_target(orthanc_url(server))), progress
        )
        made = (counted.requests, counted.connects)
        assert result == Attempt(6), result
        for path in files:
            assert server.file_of(path.stem) == path.read_bytes()
    assert sorted(progress.delivered) == sorted(p.stem for p in files)
    assert made == (1, 1)  # one request on one connection


def test_study_job_of_two_series(tmp_path: Path) -> None:
    study = generate_uid()
    first = series(tmp_path / "job" / "s1", 3, study=study)
    second = series(tmp_path / "job" / "s2", 4, study=study)
    with orthanc(tmp_path / "orthanc", config=DICOMWEB) as server:
        progress = Progress()
        job = job_for(web_target(orthanc_url(server), batch=5), ("s1", "s2"))
        assert dicomweb.deliver(tmp_path / "job", job, progress) == Attempt(7)
        for path in first + second:
            assert server.file_of(path.stem) == path.read_bytes()
        assert len(server.get(f"/studies/{server.get_lookup(study)[0]['ID']}/series")) == 2
    expected = [f"s1/{p.stem}" for p in first] + [f"s2/{p.stem}" for p in second]
    assert progress.delivered == expected  # series in arrival order, each by InstanceNumber


def test_batch_smaller_than_the_series_makes_several_requests_on_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = series(tmp_path / "job", 11)
    counted = Counted(monkeypatch)
    with orthanc(tmp_path / "orthanc", config=DICOMWEB) as server:
        target = web_target(orthanc_url(server), batch=4)
        counted.requests = counted.connects = 0
        assert dicomweb.deliver(tmp_path / "job", job_for(target), Progress()) == Attempt(11)
        made = (counted.requests, counted.connects)
        assert server.sop_instance_uids() == {p.stem for p in files}
    assert made == (3, 1)  # 4 + 4 + 3 instances, over one keep-alive connection


def basic_orthanc(tmp_path: Path) -> Any:
    config = {**DICOMWEB, "AuthenticationEnabled": True, "RegisteredUsers": {"u": PASSWORD}}
    return orthanc(tmp_path / "orthanc", config=config)


def test_basic_auth_right_password_from_file_and_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = series(tmp_path / "a", 2), series(tmp_path / "b", 2)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("WEB_PASSWORD", PASSWORD)
    with basic_orthanc(tmp_path) as server:
        url = orthanc_url(server)
        by_file = web_target(url, auth="basic", username="u", password_file=str(secret))
        assert dicomweb.deliver(tmp_path / "a", job_for(by_file), Progress()) == Attempt(2)
        by_env = web_target(url, auth="basic", username="u", password="${WEB_PASSWORD}")
        assert dicomweb.deliver(tmp_path / "b", job_for(by_env), Progress()) == Attempt(2)
        stored = server.get_as("/statistics", "u", PASSWORD)["CountInstances"]
    assert stored == len(first + second)


def test_basic_auth_wrong_password_is_a_clear_retryable_error_without_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series(tmp_path / "job", 3)
    wrong = "wrong-" + PASSWORD
    monkeypatch.setenv("WEB_PASSWORD", wrong)
    with basic_orthanc(tmp_path) as server:
        target = web_target(
            orthanc_url(server), auth="basic", username="u", password="${WEB_PASSWORD}"
        )
        progress = Progress()
        result = dicomweb.deliver(tmp_path / "job", job_for(target), progress)
        stored = server.get_as("/statistics", "u", PASSWORD)["CountInstances"]
    assert result.error.startswith("authentication refused (HTTP 401)"), result
    assert not result.permanent and not result.unreachable and result.delivered == 0
    assert stored == 0 and progress.delivered == []
    assert wrong not in result.error and PASSWORD not in result.error


def test_missing_secret_names_the_variable_not_a_value(tmp_path: Path) -> None:
    series(tmp_path / "job", 1)
    target = web_target(
        f"http://127.0.0.1:{free_port()}", auth="bearer", token="${NO_SUCH_TOKEN_VAR}"
    )
    result = dicomweb.deliver(tmp_path / "job", job_for(target), Progress())
    assert "NO_SUCH_TOKEN_VAR" in result.error and not result.permanent


def test_large_instance_goes_with_flat_memory(tmp_path: Path) -> None:
    """200 MB of pixel data to Orthanc: the sending process grows by a few MB at most."""
    path = multiframe(tmp_path / "job", 200)
    with orthanc(tmp_path / "orthanc", config=DICOMWEB) as server:
        measured = measure_in_subprocess(tmp_path / "job", orthanc_url(server))
        assert server.sha256_of(path.stem) == sha256_file(path)
    assert measured["attempt"] == {"delivered": 1, "error": ""}
    assert measured["growth"] < 40 * 2**20, measured  # vs a 200 MB file


def test_one_gigabyte_instance_streams_with_flat_memory(tmp_path: Path, stub: Any) -> None:
    """1 GB in one instance, to a sink that hashes the body (Orthanc would hold it in
    memory): the body arrives exact, unchunked, and the sender stays flat."""
    path = multiframe(tmp_path / "job", 1024)
    server = stub()
    server.sink = True
    measured = measure_in_subprocess(tmp_path / "job", server.url)
    assert measured["attempt"] == {"delivered": 1, "error": ""}
    assert measured["growth"] < 40 * 2**20, measured
    (request,) = server.requests
    assert not request["chunked"] and request["length"] > path.stat().st_size
    boundary = request["type"].split("boundary=")[1].encode()
    head = b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
    digest = hashlib.sha256(head)
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    digest.update(b"\r\n--" + boundary + b"--\r\n")
    assert request["sha256"] == digest.hexdigest()


def multiframe(folder: Path, megabytes: int) -> Path:
    """One instance with `megabytes` MB of 16-bit frames, written in blocks (never in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = megabytes // 2  # 1024 x 1024 x 2 bytes = 2 MB a frame
    sop = generate_uid()
    header = make_instance(
        folder, rows=1024, columns=1024, sop=sop, filename="head.dcm", NumberOfFrames=frames
    )
    data = header.read_bytes()
    header.unlink()
    cut = data.rfind(b"\xe0\x7f\x10\x00OW")  # the one frame's Pixel Data goes
    path = folder / f"{sop}.dcm"
    block = bytes(range(256)) * 8192
    with path.open("wb") as out:
        out.write(
            data[:cut] + b"\xe0\x7f\x10\x00OW\x00\x00" + (frames * len(block)).to_bytes(4, "little")
        )
        for _ in range(frames):
            out.write(block)
    path.with_suffix(".tags").write_text(json.dumps({"SOPInstanceUID": sop}))
    return path


MEASURE = """
import json, sys, time
from pathlib import Path
from mercli.dispatch.targets import dicomweb
from mercli.jobs import JobInfo, Progress, Target
def peak():  # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
folder, url = Path(sys.argv[1]), sys.argv[2]
target = Target(name="web", type="dicomweb", url=url, timeout=120.0)
before = peak()
result = dicomweb.deliver(folder, JobInfo("j", target, "", "", time.time()), Progress())
after = peak()
attempt = {"delivered": result.delivered, "error": result.error}
print(json.dumps({"attempt": attempt, "growth": after - before, "peak": after}))
"""


def measure_in_subprocess(folder: Path, url: str) -> dict[str, Any]:
    """deliver() in a fresh process; how much its peak RSS grew during the call."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), url],
        capture_output=True,
        text=True,
        timeout=240,
        env=environment,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    print(f"peak RSS {result['peak'] / 2**20:.0f} MB, growth {result['growth'] / 2**20:.1f} MB")
    return result


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- against the local STOW server ------------------------------------------------------------


def test_bearer_token_per_instance_failures_and_warnings_then_retry_sends_only_the_failed(
    tmp_path: Path, stub: Any
) -> None:
    files = series(tmp_path / "job", 5)
    uids = [p.stem for p in files]
    server = stub(token=TOKEN)
    server.fail = {uids[1]: 0xA700}
    server.warn = {uids[3]: 0xB000}
    token = tmp_path / "token"
    token.write_text(TOKEN)
    target = web_target(server.url, auth="bearer", token_file=str(token), batch=2)
    progress = Progress()
    first = dicomweb.deliver(tmp_path / "job", job_for(target), progress)
    assert first.delivered == 4 and not first.permanent and not first.unreachable
    assert first.error == f"1 refused: {uids[1]}: 0xA700 out of resources"
    assert progress.delivered == [u for u in uids if u != uids[1]]  # the warned one included
    assert [r["uids"] for r in server.requests] == [uids[0:2], uids[2:4], uids[4:5]]
    assert len({r["peer"] for r in server.requests}) == 1  # one keep-alive connection
    request = server.requests[0]
    assert request["path"] == "/dicom-web/studies" and not request["chunked"]
    assert request["type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert request["accept"] == "application/dicom+json"

    server.fail = {}
    second = dicomweb.deliver(tmp_path / "job", job_for(target), progress)
    assert second == Attempt(1)
    assert server.requests[-1]["uids"] == [uids[1]]
    assert sorted(progress.delivered) == sorted(uids)
    assert dicomweb.deliver(tmp_path / "job", job_for(target), progress) == Attempt(0)
    assert len(server.requests) == 4  # nothing left: no request at all


def test_a_kept_alive_connection_the_server_dropped_is_replaced(tmp_path: Path, stub: Any) -> None:
    files = series(tmp_path / "job", 3)
    server = stub()
    server.hang_up = True
    progress = Progress()
    result = dicomweb.deliver(tmp_path / "job", job_for(web_target(server.url, batch=1)), progress)
    assert result == Attempt(3) and progress.delivered == [p.stem for p in files]
    assert [r["uids"] for r in server.requests] == [[p.stem] for p in files]
    assert len({r["peer"] for r in server.requests}) == 3


def test_refused_token_is_reported_without_the_token_even_when_echoed(
    tmp_path: Path, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    series(tmp_path / "job", 2)
    server = stub(token=TOKEN)
    monkeypatch.setenv("WEB_TOKEN", "wrong-" + TOKEN)
    target = web_target(server.url, auth="bearer", token="${WEB_TOKEN}")
    result = dicomweb.deliver(tmp_path / "job", job_for(target), Progress())
    assert result.error.startswith("authentication refused (HTTP 401)")
    assert TOKEN not in result.error
    # an error answer that quotes the credentials back is redacted too
    server.token = None
    server.status, server.body = 500, f"internal error for Bearer wrong-{TOKEN}".encode()
    result = dicomweb.deliver(tmp_path / "job", job_for(target), Progress())
    assert result.error.startswith("HTTP 500 ") and "***" in result.error
    assert TOKEN not in result.error


def test_token_with_a_line_break_is_refused_without_showing_it(
    tmp_path: Path, stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    series(tmp_path / "job", 1)
    server = stub()
    monkeypatch.setenv("WEB_TOKEN", TOKEN + "\r\nX-Injected: 1")
    target = web_target(server.url, auth="bearer", token="${WEB_TOKEN}")
    result = dicomweb.deliver(tmp_path / "job", job_for(target), Progress())
    assert "token" in result.error and TOKEN not in result.error
    assert server.requests == []


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (409, b"", "HTTP 409 Conflict from http://127.0.0.1:"),
        (500, b"boom\x1b[31m " + b"x" * 5000, "boom\\x1b[31m x"),
        (404, b"<html>no such route</html>", "HTTP 404 Not Found"),
    ],
    ids=["409", "500-escaped-and-cut", "404"],
)
def test_error_statuses_reach_the_error_escaped_and_short(
    tmp_path: Path, stub: Any, status: int, body: bytes, expected: str
) -> None:
    series(tmp_path / "job", 2)
    server = stub()
    server.status, server.body = status, body
    progress = Progress()
    result = dicomweb.deliver(tmp_path / "job", job_for(web_target(server.url)), progress)
    assert expected in result.error and "\x1b" not in result.error
    assert len(result.error) < 400 and progress.delivered == []
    assert not result.permanent and not result.unreachable


def test_conflict_with_failure_reasons_names_each_instance(tmp_path: Path, stub: Any) -> None:
    files = series(tmp_path / "job", 2)
    server = stub()
    _, body = stow_answer([p.stem for p in files], {p.stem: 0xA900 for p in files}, {})
    server.status, server.body = 409, body
    result = dicomweb.deliver(tmp_path / "job", job_for(web_target(server.url)), Progress())
    assert f"{files[0].stem}: 0xA900 data set does not match SOP class" in result.error


def test_202_without_a_readable_answer_delivers_nothing(tmp_path: Path, stub: Any) -> None:
    series(tmp_path / "job", 2)
    server = stub()
    server.status, server.body = 202, b"<xml/>"
    progress = Progress()
    result = dicomweb.deliver(tmp_path / "job", job_for(web_target(server.url)), progress)
    assert result.delivered == 0 and "2 refused" in result.error and "not confirmed" in result.error
    assert progress.delivered == []


def test_an_oversized_answer_is_not_read(tmp_path: Path, stub: Any) -> None:
    series(tmp_path / "job", 1)
    server = stub()
    server.status, server.body = 500, b"x" * (dicomweb.MAX_RESPONSE + 10)
    result = dicomweb.deliver(tmp_path / "job", job_for(web_target(server.url)), Progress())
    assert "larger than" in result.error


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "no-such-host.invalid"], ids=["refused", "dns"]
)
def test_unreachable_target(tmp_path: Path, host: str) -> None:
    series(tmp_path / "job", 2)
    target = web_target(f"http://{host.format(port=free_port())}/dicom-web")
    result = dicomweb.deliver(tmp_path / "job", job_for(target), Progress())
    assert result.unreachable and result.delivered == 0 and not result.permanent
    assert result.error.startswith("cannot connect to http://")


def test_a_trickling_server_is_cut_off_at_the_deadline(tmp_path: Path) -> None:
    """A server that answers one byte at a time cannot hold the worker past `timeout`."""
    series(tmp_path / "job", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            while b"mercli-" not in conn.recv(1 << 20):  # the body's closing boundary
                pass
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                if stop.is_set():
                    return
                conn.sendall(bytes([byte]))
                time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    target = Target(
        name="web",
        type="dicomweb",
        url=f"http://127.0.0.1:{listener.getsockname()[1]}",
        timeout=1.0,
    )
    started = time.monotonic()
    result = dicomweb.deliver(tmp_path / "job", job_for(target), Progress())
    stop.set()
    listener.close()
    assert time.monotonic() - started < 5
    assert result.error == "no complete answer within 1 s" and result.delivered == 0


def test_https_with_a_client_certificate_and_an_untrusted_server(tmp_path: Path, stub: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    series(tmp_path / "job", 2)
    context = server_context(str(pki.server_cert), str(pki.server_key), str(pki.ca), True)
    server = stub(tls=context)
    tls = {"tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    assert dicomweb.deliver(
        tmp_path / "job", job_for(web_target(server.url, **tls)), Progress()
    ) == Attempt(2)
    untrusting = {**tls, "tls_ca": str(pki.other_ca)}
    result = dicomweb.deliver(
        tmp_path / "job", job_for(web_target(server.url, **untrusting)), Progress()
    )
    assert "TLS certificate not accepted" in result.error and not result.unreachable


# -- through dispatch and rules check -----------------------------------------------------------


def web_rules(tmp_path: Path, url: str, secret: Path, **options: Any) -> Path:
    settings = {"type": "dicomweb", "url": url, "auth": "basic", "username": "u"}
    settings |= {"password_file": str(secret), "batch": 4, "retry_delay": "0s", **options}
    lines = ["[targets.web]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    return rules_for(tmp_path, "\n".join(lines) + "\n", '"web"')


def test_dispatch_once_delivers_through_the_registry(tmp_path: Path, spool: Spool) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD)
    secret.chmod(0o600)
    with basic_orthanc(tmp_path) as server:
        rules = web_rules(tmp_path, orthanc_url(server), secret)
        checked = CliRunner().invoke(cli, ["rules", "check", str(rules)])
        assert checked.exit_code == 0, checked.output
        files = routed(tmp_path, spool, rules, {"1.2.10": 9})
        result = dispatch_once(spool)
        assert result.returncode == 0, result.stderr
        stored = server.get_as("/instances?expand", "u", PASSWORD)
    sops = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == sops
    (done,) = spool.items(SUCCESS)
    assert len(json.loads((done.path / "dispatch.json").read_text())["delivered"]) == 9
    assert_no_secret(spool.root, result.stderr)


def test_dispatch_once_writes_the_refusal_to_error_json(tmp_path: Path, spool: Spool) -> None:
    secret = tmp_path / "password"
    secret.write_text("not-" + PASSWORD)
    secret.chmod(0o600)
    with basic_orthanc(tmp_path) as server:
        rules = web_rules(tmp_path, orthanc_url(server), secret, max_attempts=1)
        routed(tmp_path, spool, rules, {"1.2.11": 2})
        result = dispatch_once(spool)
    assert result.returncode == 1, result.stderr
    (failed,) = spool.items(ERROR)
    error = json.loads((failed.path / "error.json").read_text())
    assert "authentication refused (HTTP 401)" in json.dumps(error)
    assert_no_secret(spool.root, result.stderr)


EXAMPLE = """
[targets.cloud]
type = "dicomweb"
url = "https://dicomweb.example.org/dicom-web"
auth = "bearer"
token_file = "cloud.token"
batch = 50
timeout = "60s"
tls_ca = "ca.pem"
tls_cert = "router.pem"
tls_key = "router.key"

[targets.lab]
type = "dicomweb"
url = "http://orthanc.lab:8042/dicom-web"
auth = "basic"
username = "mercli"
password = "${LAB_PASSWORD}"

[[rules]]
name = "all"
targets = ["cloud", "lab"]
"""


def test_rules_check_accepts_the_readme_example(tmp_path: Path) -> None:
    for name in ("cloud.token", "ca.pem", "router.pem", "router.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    (tmp_path / "rules.toml").write_text(EXAMPLE)
    result = CliRunner().invoke(cli, ["rules", "check", str(tmp_path / "rules.toml")])
    assert result.exit_code == 0, result.output
    literal = EXAMPLE.replace('"${LAB_PASSWORD}"', '"hunter2"')
    (tmp_path / "rules.toml").write_text(literal)
    result = CliRunner().invoke(cli, ["rules", "check", str(tmp_path / "rules.toml")])
    assert result.exit_code != 0 and "hunter2" not in result.output


def assert_no_secret(root: Path, output: str) -> None:
    """Neither password appears in any spool file (job.json, dispatch.json, events) or log."""
    assert PASSWORD not in output
    for path in root.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            assert PASSWORD.encode() not in path.read_bytes(), path
