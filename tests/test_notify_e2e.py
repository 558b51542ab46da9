"""Notifications end to end, every event from the stage that causes it to a real server.

storescu -> `mercli run` (which supervises `mercli notify` because the rules define a
channel) -> a folder target, with a webhook that is down for ten seconds while the series are
received, routed and delivered; then `mercli metrics` scraped over HTTP for what happened.
Then each remaining event from its real stage to a real server on loopback: `failed` from
dispatch by email over implicit TLS (aiosmtpd), `failed` from a rule that ran out of time and
from a module that failed, `processed` from a module, and `mercli notify` killed at every
filesystem step of sending.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mercli.notify.service import NotifyService
from mercli.spool import (
    ERROR,
    ERROR_FILE,
    NOTIFY,
    NOTIFY_FAILED,
    NOTIFY_SENT,
    SUCCESS,
    Spool,
    Worker,
)
from tests.certs import Pki, make_pki
from tests.crashkit import run_until_done
from tests.dicomfiles import make_instance
from tests.netkit import free_port, storescu, wait_until
from tests.test_dispatch import Scp, dicom_target, dispatch_once, rules_for
from tests.test_dispatch import routed as dispatch_routed
from tests.test_e2e import mercli_run
from tests.test_metrics import scrape, value
from tests.test_notify_send import (
    PASSWORD,
    Hook,
    Mailbox,
    enqueue,
    names,
    notify_once,
    smtp_controller,
    webhook,
)
from tests.test_process import (
    COPY_MODULE,
    FLAKY_MODULE,
    process_once,
    process_rules,
    receive_series,
    route_all,
)
from tests.test_process import SERIES as PROCESS_SERIES
from tests.test_route import receive_file, series_files

# -- the webhook down for 10 s while `mercli run` routes ---------------------------------------

DOWN = 10.0  # seconds the webhook stays down once the first attempt has failed
SERIES, PER_SERIES, SCOUTS = 6, 4, 3
STUDY = "1.2.826.0.1.3680043.10.1234.19"

RUN_RULES = """
[route]
settle = "1s"
series_timeout = "30s"

[notify.hook]
type = "webhook"
url = "http://127.0.0.1:{hook_port}/hook"
body = '{{{{ event }}}}|{{{{ rule }}}}|{{{{ series_uid }}}}|{{{{ instances }}}}'
retry_delay = "1s"
retry_backoff = 1.5
retry_max_delay = "2s"
max_attempts = 1000

[targets.folder]
type = "folder"
path = "{folder}"

[[rules]]
name = "scouts"
when = 'Modality == "OT"'
action = "discard"
notify = ["hook"]
notify_on = ["discarded"]

[[rules]]
name = "ct"
when = 'Modality == "CT"'
targets = ["folder"]
notify = ["hook"]
notify_on = ["received", "routed", "delivered"]
"""


def _study(folder: Path) -> tuple[list[Path], dict[str, int]]:
    """SERIES CT series of PER_SERIES instances and one scout series (OT) the rules discard;
    the files, and the instance count of each series."""
    folder.mkdir(parents=True)
    files: list[Path] = []
    counts: dict[str, int] = {}
    for s in range(1, SERIES + 2):
        uid = f"{STUDY}.{s}"
        scout = s == SERIES + 1
        counts[uid] = SCOUTS if scout else PER_SERIES
        files += [
            make_instance(folder, series=uid, study=STUDY, number=n, SeriesNumber=s,
                          modality="OT" if scout else "CT")
            for n in range(counts[uid])
        ]  # fmt: skip
    return files, counts


def _events(spool: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in Spool.open(spool).events.read() if e["event"] == kind]


def test_webhook_down_for_10_s_under_mercli_run_delays_no_series_and_loses_no_notification(
    tmp_path: Path,
) -> None:
    """Every series is received, routed and delivered while the webhook refuses connections;
    once it is up, every notification (received, routed, delivered per CT series, discarded
    for the scouts) arrives exactly once, and the metrics count what was sent."""
    files, counts = _study(tmp_path / "study")
    spool, folder = tmp_path / "spool", tmp_path / "delivered"
    reserved = socket.socket()  # bound, never listening: connections are refused, and no
    reserved.bind(("127.0.0.1", 0))  # other socket takes the port while the webhook is down
    hook_port = reserved.getsockname()[1]
    rules = tmp_path / "rules.toml"
    rules.write_text(RUN_RULES.format(hook_port=hook_port, folder=folder))
    hook: Hook | None = None
    try:
        with mercli_run(spool, rules) as port:
            sent_at = time.monotonic()
            assert storescu(port, files).returncode == 0
            wait_until(lambda: _events(spool, "notify_retry"), timeout=60, what="a failed try")
            first_failure = time.monotonic()
            delivered = SERIES * PER_SERIES
            wait_until(
                lambda: folder.is_dir() and len(list(folder.rglob("*.dcm"))) == delivered,
                timeout=60,
                what="every CT instance in the folder target",
            )
            wait_until(lambda: len(_events(spool, "dispatched")) == SERIES, what="settled")
            latency = time.monotonic() - sent_at
            assert names(Spool.open(spool), NOTIFY_SENT) == []  # all of it with the hook down
            time.sleep(max(0.0, first_failure + DOWN - time.monotonic()))
            down_for = time.monotonic() - first_failure
            retried = len(_events(spool, "notify_retry"))
            assert names(Spool.open(spool), NOTIFY_FAILED) == []  # still being tried
            reserved.close()
            hook = Hook(hook_port)
            expected = 3 * SERIES + 1
            wait_until(
                lambda: len(names(Spool.open(spool), NOTIFY_SENT)) == expected,
                timeout=60,
                what="every notification sent",
            )
            time.sleep(2.5)  # a duplicate send would come by now (retry_max_delay 2 s)
    finally:
        reserved.close()
        if hook is not None:
            hook.close()
    print(
        f"{len(files)} instances delivered {latency:.1f} s after storescu started, with the "
        f"webhook down; it stayed down {down_for:.1f} s, {retried} retries meanwhile"
    )
    assert hook is not None
    bodies = [request["body"].decode() for request in hook.requests]
    keys = [request["headers"]["Idempotency-Key"] for request in hook.requests]
    assert len(keys) == len(set(keys)) == expected  # each once
    told = Counter(tuple(body.split("|")) for body in bodies)
    wanted = Counter()
    for uid, count in counts.items():
        if count == SCOUTS:
            wanted[("discarded", "scouts", uid, str(count))] += 1
        else:
            for event in ("received", "routed", "delivered"):
                wanted[(event, "ct", uid, str(count))] += 1
    assert told == wanted
    state = Spool.open(spool)
    assert names(state, NOTIFY) == [] and names(state, NOTIFY_FAILED) == []
    assert len(names(state, SUCCESS)) == SERIES and names(state, ERROR) == []

    with_metrics = [sys.executable, "-m", "mercli", "metrics", "--spool", str(spool)]
    metrics_port = free_port()
    exporter = subprocess.Popen([*with_metrics, "--listen", f"127.0.0.1:{metrics_port}"])
    try:
        wait_until(lambda: _scraped(metrics_port) is not None, what="the metrics exporter")
        samples = scrape(metrics_port)
    finally:
        exporter.terminate()
        code = exporter.wait(timeout=30)
    assert code == 0
    assert value(samples, "mercli_received_instances_total") == len(files)
    assert value(samples, "mercli_dispatched_total", target="folder") == SERIES
    assert value(samples, "mercli_dispatched_instances_total", target="folder") == delivered
    assert value(samples, "mercli_discarded_total") == 1
    assert value(samples, "mercli_routed_rule_total", rule="ct") == SERIES
    assert value(samples, "mercli_events_total", event="notified") == expected
    assert value(samples, "mercli_events_total", event="notify_retry") >= retried
    assert value(samples, "mercli_failed_total") == 0


def _scraped(port: int) -> object | None:
    try:
        return scrape(port, timeout=2.0)
    except OSError:
        return None


# -- each remaining event from its real stage to a real server --------------------------------

HOOK_CHANNEL = (
    '[notify.hook]\ntype = "webhook"\nurl = "{url}"\nbody = \''
    + "|".join(
        f"{{{{{{{{ {name} }}}}}}}}"
        for name in ("event", "rule", "module", "series_uid", "notification", "error", "target")
    )
    + "'\n"
)


def _sent(hook: Hook) -> list[list[str]]:
    return sorted(request["body"].decode().split("|") for request in hook.requests)


@pytest.mark.parametrize("outcome", ["processed", "failed"])
def test_a_modules_processed_and_failed_reach_a_webhook(
    tmp_path: Path, spool: Spool, outcome: str
) -> None:
    """`mercli process` runs a module that succeeds with a notification text in its
    result.json, or one that fails for good; `mercli notify --once` sends what it told."""
    if outcome == "processed":
        module = COPY_MODULE.replace(
            "result = {", 'result = {"__mercure_notification": {"text": "found nothing"}, '
        )
        rules = process_rules(tmp_path, module)
    else:
        rules = process_rules(tmp_path, FLAKY_MODULE, attempts=1)
    hook = Hook()
    try:
        text = rules.read_text().replace(
            'env = { MODULE_ENV = "set" }', 'env = { MODULE_ENV = "set" }\nnotify = ["hook"]'
        )
        rules.write_text(HOOK_CHANNEL.format(url=hook.url()) + text)
        receive_series(tmp_path, spool, PROCESS_SERIES, 2, SeriesDescription="CHEST")
        route_all(spool, rules)
        summary = process_once(spool)
        assert (summary.processed, summary.failed) == ((1, 0) if outcome == "processed" else (0, 1))
        result = notify_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        hook.close()
    if outcome == "processed":
        expected = ["processed", "ai", "copy", PROCESS_SERIES, "found nothing", "", ""]
    else:
        failure = 'module "copy": exit status 3'
        expected = ["failed", "ai", "copy", PROCESS_SERIES, "", failure, ""]
    assert _sent(hook) == [expected]


RUNAWAY_RULES = """
[route]
rule_timeout = "0.5s"

[targets.pacs]
type = "folder"
path = "pacs"

{target_notify}
[[rules]]
name = "ct-to-pacs"
when = 'Modality == "CT" and re("(a|aa)+$", StudyDescription)'
targets = ["pacs"]
{rule_notify}
"""


@pytest.mark.parametrize("subscriber", ["rule", "target"])
def test_a_rule_that_ran_out_of_time_tells_failed(
    tmp_path: Path, spool: Spool, subscriber: str
) -> None:
    """A crafted StudyDescription makes the rule's regex backtrack past `rule_timeout`: the
    series goes whole to error/, and the rule's subscribers and its targets' (whose default
    is `failed`) hear `failed`, with the reason."""
    hostile = series_files(tmp_path / "a", "1.2.666", 2, StudyDescription="a" * 60 + "!")
    with Worker(spool, "receive") as worker:
        for path in hostile:
            receive_file(worker, path)
    hook = Hook()
    try:
        rules = tmp_path / "rules.toml"
        notify = 'notify = ["hook"]'
        rules.write_text(
            HOOK_CHANNEL.format(url=hook.url())
            + RUNAWAY_RULES.format(
                target_notify=notify if subscriber == "target" else "",
                rule_notify=f'{notify}\nnotify_on = ["routed", "failed"]'
                if subscriber == "rule"
                else "",
            )
        )
        command = [sys.executable, "-m", "mercli", "route", "--spool", str(spool.root)]
        routed = subprocess.run(
            [*command, "--rules", str(rules), "--once", "--all"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert routed.returncode == 1, routed.stderr
        (error,) = spool.items(ERROR)
        result = notify_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        hook.close()
    reason = 'rule "ct-to-pacs" exceeded the 0.5 s evaluation limit'
    assert _sent(hook) == [["failed", "ct-to-pacs", "", "1.2.666", "", reason, "pacs"]]
    assert json.loads((error.path / ERROR_FILE).read_text())["reason"] == reason


EMAIL_RULES = """
[notify.oncall]
type = "email"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
tls = true
user = "router"
password_file = "{secret}"
tls_ca = "{ca}"
from = "router@example.org"
to = ["pacs-admin@example.org"]
subject = "mercli {{{{ event }}}}: {{{{ target }}}} {{{{ series_description }}}}"
body = "{{{{ instances }}}} instance(s) not delivered: {{{{ error }}}}"
retry_delay = "1s"

[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = {dead_port}
called_aet = "PACS"
max_attempts = 1
notify = ["oncall"]

[[rules]]
name = "ct"
when = 'Modality == "CT"'
targets = ["pacs"]
"""


class TlsMailbox(Mailbox):
    """A Mailbox that also records the TLS version each message came over."""

    def __init__(self) -> None:
        super().__init__()
        self.tls: list[str | None] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sock = server.transport.get_extra_info("ssl_object")
        self.tls.append(sock.version() if sock is not None else None)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def smtps_server(tmp_path: Path) -> Iterator[tuple[Controller, TlsMailbox, Pki]]:
    """aiosmtpd speaking implicit TLS (SMTPS, as on port 465) with AUTH required."""
    pki = make_pki(tmp_path / "smtps-pki")
    mailbox = TlsMailbox()
    controller = smtp_controller(pki, mailbox, implicit_tls=True)
    yield controller, mailbox, pki
    controller.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # see smtps_server
def test_a_failed_delivery_is_emailed_over_implicit_tls_with_the_rules_templates(
    tmp_path: Path, spool: Spool, smtps_server: tuple[Controller, TlsMailbox, Pki]
) -> None:
    """route -> dispatch to a PACS that refuses connections (one attempt) -> error/ with the
    target's `failed` -> `mercli notify --once` mails it over SMTPS, logged in, subject and body
    rendered from the rules' templates."""
    controller, mailbox, pki = smtps_server
    secret = tmp_path / "smtp.pass"
    secret.write_text(PASSWORD + "\n")
    rules = tmp_path / "rules.toml"
    rules.write_text(
        EMAIL_RULES.format(
            smtp_port=controller.port, secret=secret, ca=pki.ca, dead_port=free_port()
        )
    )
    check = subprocess.run(
        [sys.executable, "-m", "mercli", "rules", "check", str(rules)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    receive_series(tmp_path, spool, "1.2.444", 3, SeriesDescription="CTA Kopf")
    route_all(spool, rules)
    dispatched = dispatch_once(spool)
    assert dispatched.returncode == 5, dispatched.stderr  # the target was unreachable
    assert len(spool.items(ERROR)) == 1
    result = notify_once(spool)
    assert result.returncode == 0, result.stderr
    [(sender, recipients, message)] = mailbox.messages
    assert (sender, recipients) == ("router@example.org", ["pacs-admin@example.org"])
    assert mailbox.tls[0] in ("TLSv1.2", "TLSv1.3")
    assert message["Subject"] == "mercli failed: pacs CTA Kopf"
    body = message.get_content()
    assert body.startswith("3 instance(s) not delivered: ") and "127.0.0.1" in body
    assert PASSWORD not in result.stderr


def test_rules_check_catches_a_broken_subject_template(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    text = EMAIL_RULES.format(smtp_port=465, secret=tmp_path / "p", ca=tmp_path / "ca",
                              dead_port=104)  # fmt: skip
    rules.write_text(text.replace("{{ target }}", "{{ target | nosuchfilter }}"))
    result = subprocess.run(
        [sys.executable, "-m", "mercli", "rules", "check", str(rules)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "nosuchfilter" in result.stderr and 'notify "oncall"' in result.stderr


# -- mercli notify killed at every step of sending ---------------------------------------------


def test_kill_9_at_every_step_of_sending_then_each_notification_is_sent(tmp_path: Path) -> None:
    """`mercli notify --once` with two notifications, killed at its N-th filesystem step for
    every N: after recovery and a second run, both are in notify_sent/ (at least once: a
    kill between the server's answer and the move sends one again, with the same
    Idempotency-Key), nothing is left claimed, waiting or failed."""
    root = tmp_path / "spool"
    hook = Hook()
    made: list[str] = []

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        spool = Spool.open(root)
        made[:] = [enqueue(spool, webhook(hook.url())) for _ in range(2)]
        hook.requests.clear()

    def scenario() -> None:
        NotifyService(root, 1).run(once=True)

    def check(step: int) -> None:
        NotifyService(root, 1).run(once=True)  # recovers the dead sender's claim first
        spool = Spool.open(root)
        assert sorted(names(spool, NOTIFY_SENT)) == sorted(made), step
        assert names(spool, NOTIFY) == names(spool, NOTIFY_FAILED) == [], step
        assert spool.claimed() == [], step
        keys = [request["headers"]["Idempotency-Key"] for request in hook.requests]
        assert set(keys) == set(made), step
        assert len(keys) <= len(made) + 1, step  # only the one in hand is sent twice

    try:
        steps = run_until_done(scenario, check, setup=setup)
    finally:
        hook.close()
    assert steps > 10


@pytest.fixture
def refusing_pacs() -> Iterator[Scp]:
    """A pynetdicom SCP that refuses instances 1 and 3 with 0xA700 and stores the others."""
    server = Scp(status=lambda ds: 0xA700 if int(ds.InstanceNumber) in (1, 3) else 0)
    yield server
    server.close()


def test_failed_counts_the_instances_the_pacs_did_not_store(
    tmp_path: Path, spool: Spool, refusing_pacs: Scp
) -> None:
    """A PACS stores three instances of five and refuses two (0xA700, out of resources): the
    job fails for good after its one attempt, and `failed` says two were not delivered."""
    hook = Hook()
    try:
        server = refusing_pacs
        target = dicom_target("pacs", server.port, max_attempts=1) + 'notify = ["hook"]\n'
        body = "{{ event }}|{{ target }}|{{ instances }}"
        channel = HOOK_CHANNEL.format(url=hook.url()).split("body =")[0] + f"body = '{body}'\n"
        rules = rules_for(tmp_path, channel + target, '"pacs"')
        dispatch_routed(tmp_path, spool, rules, {"1.2.445": 5})
        assert dispatch_once(spool).returncode == 1
        assert len(server.received) == 3
        result = notify_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        hook.close()
    assert [request["body"].decode() for request in hook.requests] == ["failed|pacs|2"]
