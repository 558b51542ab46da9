"""`mercli notify`: notifications from notify/ to real webhooks and SMTP servers on loopback.

Notification items are published into a real spool the way the stages write them (a folder
built in the worker's scratch, renamed in whole); `mercli notify` runs as a process, as an
admin runs it. Servers: http.server in a thread (https with the test CA), aiosmtpd with
STARTTLS and AUTH.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mercli.dicom.tls import server_context
from mercli.fsutil import make_dir
from mercli.names import new_id
from mercli.notify import PROGRESS_FILE
from mercli.notify.channels import Channel
from mercli.notify.webhook import Answer, Request, judge
from mercli.spool import (
    ERROR_FILE,
    NOTIFICATION_FILE,
    NOTIFY,
    NOTIFY_FAILED,
    NOTIFY_SENT,
    Spool,
    Worker,
    write_json,
)
from mercli.status import collect_status
from mercli.supervisor import RunConfig, plan
from tests.certs import Pki, make_pki
from tests.netkit import free_port, wait_until

TOKEN = "s3cret-token-value"
PASSWORD = "correct horse battery"

# -- notification items, as the stages write them --------------------------------------------


def enqueue(
    spool: Spool, channel: dict[str, Any], body: str = '{"text": "hi"}', **fields: Any
) -> str:
    """Publish one notification item into notify/ (built in scratch, renamed in whole)."""
    name = new_id()
    record = {
        "id": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "event": "delivered",
        "subject": "",
        "body": body,
        "channel": Channel.from_json(channel).to_json(),
        "source": {"item": "job-1", "rule": "stroke", "target": "pacs"},
        **fields,
    }
    with Worker(spool, "test") as worker:
        folder = worker.tmp_path()
        make_dir(folder)
        write_json(folder / NOTIFICATION_FILE, record)
        spool.publish_item(folder, NOTIFY, name)
    return name


def notify_once(spool: Spool, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mercli", "notify", "--once", "--spool", str(spool.root)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def service(spool: Spool, **env: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "mercli", "notify", "--spool", str(spool.root)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def events(spool: Spool, name: str) -> list[dict[str, Any]]:
    return [e for e in spool.events.read() if e["event"] == name]


def names(spool: Spool, state: str) -> list[str]:
    return [item.name for item in spool.items(state)]


# -- a webhook ----------------------------------------------------------------------------------


class Hook:
    """An HTTP(S) server that records every request and answers from a script.

    `answers`: (status, headers, body) for the first requests, then 200. `hang`: the first
    request waits on this event before answering (a peer that stops mid-request).
    """

    def __init__(
        self,
        port: int = 0,
        answers: list[tuple[int, dict[str, str], bytes]] | None = None,
        hang: threading.Event | None = None,
        pki: Pki | None = None,
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers = list(answers or [])
        self.hang = hang
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                hook.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
                if hook.hang is not None and len(hook.requests) == 1:
                    hook.hang.wait(60)
                    return
                status, headers, answer = hook.answers.pop(0) if hook.answers else (200, {}, b"ok")
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_POST = do_PUT = do_GET = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        if pki is not None:
            context = server_context(str(pki.server_cert), str(pki.server_key))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/hooks/abc?x=1"

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[list[Hook]]:
    made: list[Hook] = []
    yield made
    for hook in made:
        hook.close()


def webhook(url: str, **options: Any) -> dict[str, Any]:
    return {"name": "teams", "type": "webhook", "url": url, "retry_delay": 0.2, **options}


# -- webhooks -----------------------------------------------------------------------------------


def test_webhook_gets_body_method_and_headers_with_env_secret(
    spool: Spool, hooks: list[Hook]
) -> None:
    hook = Hook()
    hooks.append(hook)
    channel = webhook(
        hook.url(),
        method="PUT",
        headers={"Authorization": "${HOOK_TOKEN}", "X-Site": "north"},
        content_type="application/json; charset=utf-8",
    )
    body = '{"text": "delivered: stroke \u00e9 -> pacs"}'
    name = enqueue(spool, channel, body)
    result = notify_once(spool, HOOK_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    [request] = hook.requests
    assert request["method"] == "PUT" and request["path"] == "/hooks/abc?x=1"
    assert request["body"] == body.encode("utf-8")
    headers = request["headers"]
    assert headers["Authorization"] == TOKEN and headers["X-Site"] == "north"
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Idempotency-Key"] == name
    assert names(spool, NOTIFY_SENT) == [name] and names(spool, NOTIFY) == []
    [event] = events(spool, "notified")
    assert event["item"] == name and event["channel"] == "teams"
    assert event["on"] == "delivered" and event["attempt"] == 1
    progress = json.loads((spool.state_dir(NOTIFY_SENT) / name / PROGRESS_FILE).read_text())
    assert progress["attempts"] == 1 and progress["finished"]
    assert TOKEN not in result.stderr


def test_server_down_then_up_delivers_exactly_once(spool: Spool, hooks: list[Hook]) -> None:
    port = free_port()
    channel = webhook(f"http://127.0.0.1:{port}/hook", retry_delay=0.2, retry_backoff=1.5,
                      retry_max_delay=0.5)  # fmt: skip
    name = enqueue(spool, channel)
    running = service(spool)
    try:
        wait_until(lambda: len(events(spool, "notify_retry")) >= 3, timeout=30, what="retries")
        hook = Hook(port)
        hooks.append(hook)
        wait_until(lambda: names(spool, NOTIFY_SENT) == [name], timeout=30, what="delivery")
        time.sleep(1.0)  # further retries would have come by now (retry_max_delay 0.5 s)
    finally:
        running.terminate()
        assert running.wait(timeout=30) == 0
    assert len(hook.requests) == 1
    retries = events(spool, "notify_retry")
    assert all("cannot connect to 127.0.0.1" in e["error"] for e in retries)
    assert names(spool, NOTIFY) == [] and spool.claimed() == []


def test_4xx_fails_for_good_with_the_reason_and_no_secret(spool: Spool, hooks: list[Hook]) -> None:
    echo = f"bad token {TOKEN} for /hooks/abc".encode()
    hook = Hook(answers=[(403, {}, echo)])
    hooks.append(hook)
    name = enqueue(spool, webhook(hook.url(), headers={"Authorization": "${HOOK_TOKEN}"}))
    result = notify_once(spool, HOOK_TOKEN=TOKEN)
    assert result.returncode == 1
    assert names(spool, NOTIFY_FAILED) == [name] and len(hook.requests) == 1
    error_text = (spool.state_dir(NOTIFY_FAILED) / name / ERROR_FILE).read_text()
    error = json.loads(error_text)
    assert "403" in error["reason"] and "bad token *** for" in error["reason"]
    assert error["channel"] == "teams" and error["attempts"] == 1
    assert error["gave_up"] == "cannot be sent"
    assert TOKEN not in error_text and TOKEN not in result.stderr
    [event] = events(spool, "notify_failed")
    assert event["item"] == name and TOKEN not in json.dumps(event)
    assert '"text"' not in json.dumps(event)  # never the rendered body


def test_503_with_retry_after_waits_as_asked(spool: Spool, hooks: list[Hook]) -> None:
    hook = Hook(answers=[(503, {"Retry-After": "2"}, b"busy")])
    hooks.append(hook)
    name = enqueue(spool, webhook(hook.url(), retry_delay=300))
    before = time.time()
    assert notify_once(spool).returncode == 1
    progress = json.loads((spool.state_dir(NOTIFY) / name / PROGRESS_FILE).read_text())
    assert before + 1.5 < progress["next_attempt"] < time.time() + 2.5  # not 300 s
    assert "503" in progress["last_error"] and progress["attempts"] == 1
    assert notify_once(spool).returncode == 0  # not due yet: nothing to do
    assert len(hook.requests) == 1
    wait_until(lambda: time.time() > progress["next_attempt"], timeout=5)
    assert notify_once(spool).returncode == 0 and names(spool, NOTIFY_SENT) == [name]


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(301, True), (308, True), (400, True), (401, True), (404, True), (410, True),
     (408, False), (425, False), (429, False), (500, False), (502, False), (503, False)],
)  # fmt: skip
def test_what_each_http_status_means(status: int, permanent: bool) -> None:
    request = Request(False, "h", 80, "/", "POST", {}, [])
    assert judge(Answer(200, "OK", b"", None), request, "c").ok
    outcome = judge(Answer(status, "X", b"", None), request, "c")
    assert not outcome.ok and outcome.permanent is permanent


def test_unreachable_webhook_exits_5_and_waits(spool: Spool) -> None:
    port = free_port()
    name = enqueue(spool, webhook(f"http://127.0.0.1:{port}/", retry_delay=60))
    result = notify_once(spool)
    assert result.returncode == 5 and "unreachable: teams" in result.stderr
    progress = json.loads((spool.state_dir(NOTIFY) / name / PROGRESS_FILE).read_text())
    assert progress["attempts"] == 1 and progress["next_attempt"] > time.time() + 50


def test_https_webhook_trusts_the_given_ca_only(
    tmp_path: Path, spool: Spool, hooks: list[Hook]
) -> None:
    pki = make_pki(tmp_path / "pki")
    hook = Hook(pki=pki)
    hooks.append(hook)
    good = enqueue(spool, webhook(hook.url("https", "localhost"), tls_ca=str(pki.ca)))
    assert notify_once(spool).returncode == 0
    assert names(spool, NOTIFY_SENT) == [good] and len(hook.requests) == 1
    bad = enqueue(spool, webhook(hook.url("https", "localhost"), tls_ca=str(pki.other_ca)))
    assert notify_once(spool).returncode == 1
    progress = json.loads((spool.state_dir(NOTIFY) / bad / PROGRESS_FILE).read_text())
    assert "TLS certificate not accepted" in progress["last_error"]
    assert len(hook.requests) == 1


def test_kill_9_mid_send_then_the_notification_is_sent(spool: Spool, hooks: list[Hook]) -> None:
    hook = Hook(hang=threading.Event())
    hooks.append(hook)
    name = enqueue(spool, webhook(hook.url(), timeout=60))
    running = service(spool)
    wait_until(lambda: len(hook.requests) == 1, timeout=30, what="the first request")
    running.kill()
    running.wait()
    assert names(spool, NOTIFY) == [] and len(spool.claimed(NOTIFY)) == 1
    assert hook.hang is not None
    hook.hang.set()
    assert notify_once(spool).returncode == 0  # recovers the dead sender's claim first
    assert names(spool, NOTIFY_SENT) == [name] and spool.claimed() == []
    assert [r["headers"]["Idempotency-Key"] for r in hook.requests] == [name, name]


def test_unusable_notification_goes_to_notify_failed(spool: Spool) -> None:
    name = enqueue(spool, webhook("http://127.0.0.1:9/"))
    (spool.state_dir(NOTIFY) / name / NOTIFICATION_FILE).write_text("{not json")
    assert notify_once(spool).returncode == 1
    assert names(spool, NOTIFY_FAILED) == [name]
    error = json.loads((spool.state_dir(NOTIFY_FAILED) / name / ERROR_FILE).read_text())
    assert "notification.json unreadable" in error["reason"]


def test_several_workers_send_each_notification_once(spool: Spool, hooks: list[Hook]) -> None:
    hook = Hook()
    hooks.append(hook)
    sent = {enqueue(spool, webhook(hook.url())) for _ in range(200)}
    started = time.monotonic()
    assert notify_once(spool, "--workers", "8").returncode == 0
    seconds = time.monotonic() - started
    assert set(names(spool, NOTIFY_SENT)) == sent
    keys = [r["headers"]["Idempotency-Key"] for r in hook.requests]
    assert sorted(keys) == sorted(sent)
    print(f"200 notifications to a local webhook in {seconds:.2f} s (process start included)")


# -- email --------------------------------------------------------------------------------------


class Mailbox:
    """What the SMTP server accepted: (envelope from, recipients, parsed message)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 OK"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"router"
    ok = ok and data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535 itself


def smtp_controller(pki: Pki, mailbox: Mailbox, *, implicit_tls: bool = False) -> Controller:
    """aiosmtpd on a free loopback port with AUTH required: STARTTLS required, or implicit
    TLS (SMTPS). aiosmtpd counts only STARTTLS as TLS when it decides whether to offer AUTH,
    so with implicit TLS it is told not to require TLS for AUTH (the connection is TLS from
    its first byte)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    tls: dict[str, Any] = (
        {"ssl_context": context, "auth_require_tls": False}
        if implicit_tls
        else {"tls_context": context, "require_starttls": True}
    )
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=authenticate,
        auth_required=True,
        **tls,
    )
    controller.start()
    return controller


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[Controller, Mailbox, Pki]]:
    pki = make_pki(tmp_path / "smtp-pki")
    mailbox = Mailbox()
    controller = smtp_controller(pki, mailbox)
    yield controller, mailbox, pki
    controller.stop()


def mail_channel(port: int, pki: Pki, secret: Path, **options: Any) -> dict[str, Any]:
    return {
        "name": "oncall", "type": "email", "smtp_host": "127.0.0.1", "smtp_port": port,
        "starttls": True, "user": "router", "password_file": str(secret), "tls_ca": str(pki.ca),
        "from": "router@example.org", "to": ["pacs-admin@example.org", "ai@example.org"],
        "retry_delay": 0.2, **options,
    }  # fmt: skip


def test_email_over_starttls_with_login(
    tmp_path: Path, spool: Spool, smtp_server: tuple[Controller, Mailbox, Pki]
) -> None:
    controller, mailbox, pki = smtp_server
    secret = tmp_path / "smtp.pass"
    secret.write_text(PASSWORD + "\n")
    body = "mercli delivered: rule stroke, target pacs\nseries 1.2.3 (CT Kopf \u00fc)\n"
    name = enqueue(
        spool, mail_channel(controller.port, pki, secret), body,
        subject="mercli delivered: stroke\r\nBcc: evil@example.org",
    )  # fmt: skip
    result = notify_once(spool)
    assert result.returncode == 0, result.stderr
    [(sender, recipients, message)] = mailbox.messages
    assert sender == "router@example.org"
    assert recipients == ["pacs-admin@example.org", "ai@example.org"]
    assert message["Subject"] == "mercli delivered: stroke Bcc: evil@example.org"  # one line
    assert message["Bcc"] is None
    assert message["From"] == "router@example.org"
    assert message["To"] == "pacs-admin@example.org, ai@example.org"
    assert message["Message-ID"] == f"<mercli.{name}@example.org>"
    assert message["Date"] and message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "text/plain"
    assert message.get_content().replace("\r\n", "\n") == body  # SMTP lines end in CRLF
    assert names(spool, NOTIFY_SENT) == [name]


def test_wrong_password_is_retried_with_a_reason_without_it(
    tmp_path: Path, spool: Spool, smtp_server: tuple[Controller, Mailbox, Pki]
) -> None:
    controller, mailbox, pki = smtp_server
    wrong = "wrong-password-123"
    name = enqueue(
        spool, mail_channel(controller.port, pki, tmp_path / "x", password_file=None,
                            password="${SMTP_PASSWORD}"),
    )  # fmt: skip
    result = notify_once(spool, SMTP_PASSWORD=wrong)
    assert result.returncode == 1 and mailbox.messages == []
    progress_text = (spool.state_dir(NOTIFY) / name / PROGRESS_FILE).read_text()
    assert "refused the login of router: 535" in progress_text
    assert wrong not in progress_text and wrong not in result.stderr
    [event] = events(spool, "notify_retry")
    assert wrong not in json.dumps(event) and "535" in event["error"]
    time.sleep(0.3)  # past retry_delay
    assert notify_once(spool, SMTP_PASSWORD=PASSWORD).returncode == 0
    assert len(mailbox.messages) == 1 and names(spool, NOTIFY_SENT) == [name]


def test_login_over_a_plain_connection_is_refused(
    tmp_path: Path, spool: Spool, smtp_server: tuple[Controller, Mailbox, Pki]
) -> None:
    controller, mailbox, pki = smtp_server
    secret = tmp_path / "smtp.pass"
    secret.write_text(PASSWORD)
    name = enqueue(spool, mail_channel(controller.port, pki, secret, starttls=False))
    assert notify_once(spool).returncode == 1 and mailbox.messages == []
    error = json.loads((spool.state_dir(NOTIFY_FAILED) / name / ERROR_FILE).read_text())
    assert "never sent in plain text" in error["reason"] and PASSWORD not in json.dumps(error)


def test_the_same_message_id_on_every_send(
    tmp_path: Path, spool: Spool, smtp_server: tuple[Controller, Mailbox, Pki]
) -> None:
    from mercli.notify.outbox import Notification
    from mercli.notify.smtp import build_message

    controller, _mailbox, pki = smtp_server
    name = enqueue(spool, mail_channel(controller.port, pki, tmp_path / "p"))
    note = Notification.load(name, spool.state_dir(NOTIFY) / name)
    assert build_message(note)["Message-ID"] == build_message(note)["Message-ID"]


# -- status and `mercli run` --------------------------------------------------------------------


def test_status_shows_the_outbox_per_channel(spool: Spool, hooks: list[Hook]) -> None:
    hook = Hook(answers=[(404, {}, b"gone")])
    hooks.append(hook)
    enqueue(spool, webhook(hook.url()))
    assert notify_once(spool).returncode == 1
    enqueue(spool, webhook(hook.url()))
    enqueue(spool, webhook(hook.url(), name="mail"))
    document = collect_status(spool)
    assert document["states"][NOTIFY]["items"] == 2
    assert document["states"][NOTIFY_FAILED]["items"] == 1
    assert document["notify"]["channels"] == {
        "mail": {"waiting": 1, "failed": 0},
        "teams": {"waiting": 1, "failed": 1},
    }
    [failure] = document["notify"]["recent_failures"]
    assert "404" in failure["reason"]
    command = [sys.executable, "-m", "mercli", "status", "--spool", str(spool.root)]
    wide = {**os.environ, "COLUMNS": "300"}  # a reason on one line
    table = subprocess.run(command, capture_output=True, text=True, timeout=60, env=wide).stderr
    lines = [" ".join(line.replace("│", " ").split()) for line in table.splitlines()]
    assert "~> mail 1" in lines and "~> teams (1 failed) 1" in lines, table
    given_up = lines.index("Recent notifications given up")
    assert lines[given_up + 1].startswith(failure["id"]) and "404" in lines[given_up + 1]


def test_run_supervises_notify_only_when_channels_exist(tmp_path: Path) -> None:
    config = RunConfig(tmp_path / "spool", tmp_path / "rules.toml")
    assert "notify" not in [part.name for part in plan(config)]
    parts = plan(RunConfig(tmp_path / "spool", tmp_path / "rules.toml", notify=True))
    assert parts[-1].name == "notify" and "notify" in parts[-1].args
