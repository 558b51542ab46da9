"""`mercli notify` against what goes wrong with one item, one channel or the clock: the
other notifications are still collected and sent, nothing is retried in a tight loop, and
`--once` does not exit 0 with work left undone."""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mercli.notify import PROGRESS_FILE
from mercli.notify.channels import Channel, render
from mercli.notify.outbox import NotifyProgress
from mercli.notify.sender import Sender
from mercli.notify.service import NotifyService
from mercli.spool import NOTIFICATION_FILE, NOTIFY, NOTIFY_SENT, Spool, Worker
from mercli.spool.notices import COMMIT
from tests.test_notify_send import Hook, enqueue, names, notify_once, webhook


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


def _progress(spool: Spool, name: str) -> Path:
    return spool.state_dir(NOTIFY) / name / PROGRESS_FILE


@pytest.mark.parametrize(
    "content",
    ["", "{cut sh", "[1, 2]", '{"attempts": "3"}', '{"next_attempt": null, "attempts": 1}'],
)
def test_an_unreadable_progress_file_starts_afresh_and_every_item_is_sent(
    spool: Spool, hook: Hook, content: str
) -> None:
    first = enqueue(spool, webhook(hook.url()))
    second = enqueue(spool, webhook(hook.url()))
    _progress(spool, first).write_text(content)
    result = notify_once(spool)
    assert result.returncode == 0, result.stderr
    assert sorted(names(spool, NOTIFY_SENT)) == sorted([first, second])
    assert "progress.json in" in result.stderr and "starting afresh" in result.stderr


def test_a_retry_time_beyond_any_retry_counts_as_due(spool: Spool, hook: Hook) -> None:
    """Written while the clock was a year ahead, then the clock was set right."""
    name = enqueue(spool, webhook(hook.url(), retry_max_delay=600))
    record = {"attempts": 1, "next_attempt": time.time() + 365 * 86400, "last_error": "x"}
    _progress(spool, name).write_text(json.dumps(record))
    soon = enqueue(spool, webhook(hook.url(), retry_max_delay=600))
    _progress(spool, soon).write_text(json.dumps({**record, "next_attempt": time.time() + 300}))
    result = notify_once(spool)
    assert result.returncode == 0, result.stderr
    assert names(spool, NOTIFY_SENT) == [name] and names(spool, NOTIFY) == [soon]


def test_a_spool_error_on_one_item_sets_it_aside_and_the_others_are_sent(
    spool: Spool, hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claiming one notification fails (a full disk refuses the claim's folder): the others
    are sent, the run says one is left to retry, and no claim is left behind."""
    stuck = enqueue(spool, webhook(hook.url()))
    other = enqueue(spool, webhook(hook.url()))
    claim = Worker.claim

    def refuse(self: Worker, state: str, name: str) -> Any:
        if name == stuck:
            raise OSError(errno.ENOSPC, "No space left on device")
        return claim(self, state, name)

    monkeypatch.setattr(Worker, "claim", refuse)
    summary = NotifyService(spool.root, 2).run(once=True)
    assert (summary.sent, summary.retried) == (1, 1)
    assert names(spool, NOTIFY_SENT) == [other] and names(spool, NOTIFY) == [stuck]
    assert spool.claimed() == []


def test_a_progress_that_cannot_be_saved_never_resends_in_a_loop(
    spool: Spool, hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on progress.json: a sent notification still goes to notify_sent/ (sent once);
    one to retry is set aside in memory instead of being tried again at once."""
    sent = enqueue(spool, webhook(hook.url()))

    def full(self: NotifyProgress, worker: Worker, folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NotifyProgress, "save", full)
    assert NotifyService(spool.root, 1).run(once=True).sent == 1
    assert names(spool, NOTIFY_SENT) == [sent] and len(hook.requests) == 1

    hook.answers = [(503, {}, b"busy")] * 50
    again = enqueue(spool, webhook(hook.url(), retry_delay=30))
    with Worker(spool, "notify") as worker:
        sender = Sender(spool, worker)  # as the service runs it: no --once limit
        picked = sender.pick()
        assert picked is not None
        with pytest.raises(OSError):
            sender.attempt(*picked)  # the retry's save fails: the claim is released
        assert names(spool, NOTIFY) == [again]
        assert sender.pick() is None  # set aside, not tried again at once
    assert len(hook.requests) == 2


class Silent:
    """A server that accepts connections and never answers; counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_webhook_that_never_answers_holds_up_no_other_channel(spool: Spool, hook: Hook) -> None:
    """Ten notifications to a peer that accepts and stays silent, then one to a healthy
    webhook: once the first attempts time out the silent channel is left alone until its
    retry, so the healthy one is sent and the silent peer saw one connection per worker,
    not ten."""
    silent = Silent()
    try:
        url = f"http://127.0.0.1:{silent.port}/hook"
        stalled = [enqueue(spool, webhook(url, name="silent", timeout=0.5)) for _ in range(10)]
        healthy = enqueue(spool, webhook(hook.url(), name="teams"))
        result = notify_once(spool, "--workers", "4")
    finally:
        silent.close()
    assert result.returncode == 5, result.stderr  # the silent channel counts as unreachable
    assert names(spool, NOTIFY_SENT) == [healthy]
    assert sorted(names(spool, NOTIFY)) == sorted(stalled)
    assert 1 <= len(silent.accepted) <= 4
    assert "unreachable: silent" in result.stderr


def test_a_template_that_fails_on_odd_data_is_collected_saying_so(spool: Spool) -> None:
    """A module's result.json carries a list where the template expects a mapping (passing
    `rules check`'s sample values): that notification is collected with a body saying the
    template failed, and the logs of other workers are collected all the same."""
    template = "{% for k, v in result.get('scores', {}) | dictsort %}{{ k }}{% endfor %}"
    channel = Channel(name="hook", type="webhook", url="http://127.0.0.1:9/", body=template)
    odd = {
        "created": "2026-12-01T00:00:00+00:00",
        "event": "processed",
        "channel": channel.to_json(),
        "source": {"item": "job-1"},
        "variables": {"event": "processed", "result": {"scores": [0.9]}},
    }
    plain = {**odd, "variables": {"event": "processed", "result": {"scores": {"a": 1}}}}
    with Worker(spool, "process") as first, Worker(spool, "route") as second:
        assert first.id < second.id  # the odd line's log is collected first
        for txn, writer, record in (("t1", first, odd), ("t2", second, plain)):
            writer.notices.open_transaction(txn, "k", [record])
            writer.notices.mark(txn, "k", COMMIT)
        with Worker(spool, "notify") as worker:
            from mercli.notify.collect import collect

            assert collect(spool, worker) == 2
    bodies = sorted(
        json.loads((item.path / NOTIFICATION_FILE).read_text())["body"]
        for item in spool.items(NOTIFY)
    )
    assert bodies == ["a", "mercli processed: the hook template failed at run time: AttributeError"]


def test_rendering_stops_at_its_time_budget_in_any_thread() -> None:
    """A loop over a large value (three nested loops over 2000 items: hours) is cut at the
    budget, also outside the main thread, where SIGALRM cannot serve."""
    template = (
        "{% for a in x %}{% for b in x %}{% for c in x %}{% endfor %}{% endfor %}{% endfor %}"
    )
    outcome: list[str] = []

    def run() -> None:
        try:
            render(template, {"x": list(range(2000))}, seconds=0.3)
            outcome.append("finished")
        except Exception as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert outcome == ["template failed: took over 0.3 s"]
    assert render("{{ a }}-{{ b }}", {"a": 1, "b": 2}) == "1-2"  # and tracing is off again


class Trickler:
    """A server that starts a TLS record (handshake, 16 KiB long) and then sends one byte of
    it every 0.2 s: each read of the client succeeds well within its timeout, for an hour."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(b"\x16\x03\x03\x40\x00")
                while not self.stop.wait(0.2):
                    conn.sendall(b"\x02")
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_an_smtps_server_that_trickles_its_handshake_is_cut_at_the_timeout(
    tmp_path: Path, spool: Spool
) -> None:
    """Implicit TLS: smtplib keeps the socket to itself until the handshake is over, out of
    reach of the attempt's deadline; Python's ssl bounds the whole handshake by the socket's
    timeout instead (not each read), so the attempt ends after `timeout`, as unreachable."""
    trickler = Trickler()
    secret = tmp_path / "smtp.pass"
    secret.write_text("x")
    channel = {
        "name": "oncall", "type": "email", "smtp_host": "127.0.0.1", "smtp_port": trickler.port,
        "tls": True, "from": "router@example.org", "to": ["a@example.org"], "timeout": 0.5,
    }  # fmt: skip
    try:
        name = enqueue(spool, channel)
        result = notify_once(spool)
    finally:
        trickler.close()
    assert result.returncode == 5, result.stderr
    progress = json.loads(_progress(spool, name).read_text())
    assert progress["last_error"].endswith(f"127.0.0.1:{trickler.port}: timed out"), progress
