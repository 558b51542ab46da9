"""Notifications written by the stage that causes the event, in the same transaction
(SPEC §8): route (received, routed, discarded), dispatch (delivered, failed), process
(processed, failed); rendering in Jinja2's sandbox, patient data only with `phi = true`,
template errors caught by `rules check`, and kill -9 at every step of a routing transaction
never leaving a routed series without its notification (or the reverse)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mercli.errors import ConfigError
from mercli.notify.collect import collect
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import RuleSet, load_rules
from mercli.spool import (
    ERROR,
    INCOMING,
    NOTIFY,
    OUTGOING,
    SUCCESS,
    Spool,
    Worker,
    recover,
)
from tests.crashkit import run_until_done
from tests.test_dispatch import dispatch_once, routed
from tests.test_route import receive_file, series_files

CHANNEL = """
[notify.hook]
type = "webhook"
url = "http://127.0.0.1:9/hook"
body = '{body}'
phi = {phi}
"""
FOLDER = '[targets.out]\ntype = "folder"\npath = "out"\n{target_notify}\n'
RULE = """
[[rules]]
name = "ct"
when = 'Modality == "CT"'
targets = ["out"]
notify = ["hook"]
notify_on = {events}
"""
DEFAULT_BODY = "{{ event }}|{{ rule }}|{{ target }}|{{ series_description }}|{{ instances }}"


def rules_file(
    tmp_path: Path,
    *,
    events: str = '["received", "routed", "delivered", "failed"]',
    body: str = DEFAULT_BODY,
    phi: bool = False,
    target_notify: str = "",
    target: str | None = None,
) -> Path:
    text = CHANNEL.format(body=body, phi=str(phi).lower())
    text += target if target is not None else FOLDER.format(target_notify=target_notify)
    text += RULE.format(events=events)
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def notifications(spool: Spool) -> list[dict[str, Any]]:
    """The notification items, once the workers' logs are collected into notify/."""
    with Worker(spool, "notify") as worker:
        collect(spool, worker)
    found = [
        json.loads((item.path / "notification.json").read_text()) for item in spool.items(NOTIFY)
    ]
    return sorted(found, key=lambda n: (n["event"], n["created"]))


def test_route_writes_received_once_per_series_and_routed(tmp_path: Path, spool: Spool) -> None:
    rules = rules_file(tmp_path)
    routed(tmp_path, spool, rules, {"1.2.20": 3})
    made = notifications(spool)
    assert [n["event"] for n in made] == ["received", "routed"]
    received, routed_ = made
    assert received["body"].split("|")[:2] == ["received", "ct"]
    assert received["body"].endswith("|3")
    assert routed_["body"].startswith("routed|ct|out|")
    assert routed_["channel"]["name"] == "hook" and routed_["source"]["rule"] == "ct"
    assert routed_["channel"]["url"] == "http://127.0.0.1:9/hook"
    (job,) = spool.items(OUTGOING)
    record = json.loads((job.path / "job.json").read_text())
    assert [s["on"] for s in record["notify"]] == [["received", "routed", "delivered", "failed"]]


def test_no_channel_no_notification_and_no_notify_key(tmp_path: Path, spool: Spool) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(FOLDER.format(target_notify="") + '[[rules]]\nname = "a"\ntargets = ["out"]\n')
    routed(tmp_path, spool, rules, {"1.2.21": 1})
    assert notifications(spool) == []
    (job,) = spool.items(OUTGOING)
    assert "notify" not in json.loads((job.path / "job.json").read_text())


def test_discarded_series_notify_the_discarding_rule(tmp_path: Path, spool: Spool) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        CHANNEL.format(body="{{ event }} by {{ rule }}: {{ error }}", phi="false")
        + '[[rules]]\nname = "drop"\naction = "discard"\nnotify = ["hook"]\n'
        + 'notify_on = ["discarded"]\n'
    )
    routed(tmp_path, spool, rules, {"1.2.22": 2})
    (made,) = notifications(spool)
    assert made["event"] == "discarded" and made["body"].startswith("discarded by drop: ")


def test_delivered_goes_with_the_job_into_success(tmp_path: Path, spool: Spool) -> None:
    rules = rules_file(tmp_path, events='["delivered"]', target_notify='notify = ["hook"]')
    routed(tmp_path, spool, rules, {"1.2.23": 2})
    assert notifications(spool) == []
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    assert len(spool.items(SUCCESS)) == 1
    made = notifications(spool)
    assert [n["event"] for n in made] == ["delivered"]  # rule and target: one per channel
    assert made[0]["body"].startswith("delivered|ct|out|") and made[0]["body"].endswith("|2")
    assert made[0]["source"]["target"] == "out"


def test_failed_goes_with_the_job_into_error(tmp_path: Path, spool: Spool) -> None:
    bad = tmp_path / "not-a-folder"
    bad.write_text("a file where the target folder should be")
    target = (
        f'[targets.out]\ntype = "folder"\npath = "{bad}/sub"\nmax_attempts = 1\nnotify = ["hook"]\n'
    )
    body = "{{ event }}: {{ target }}: {{ error }}"
    rules = rules_file(tmp_path, events='["failed"]', target=target, body=body)
    routed(tmp_path, spool, rules, {"1.2.24": 1})
    assert dispatch_once(spool).returncode == 1
    assert len(spool.items(ERROR)) == 1
    (made,) = notifications(spool)
    assert made["event"] == "failed" and made["body"].startswith("failed: out: ")
    assert len(made["body"]) > len("failed: out: ")  # the reason is in it


def test_patient_data_only_for_phi_channels(tmp_path: Path, spool: Spool) -> None:
    body = "{{ event }} {{ patient_name }} {{ patient_id }}"
    with pytest.raises(ConfigError, match="patient data needs phi = true"):
        load_rules(rules_file(tmp_path, body=body, events='["routed"]'))
    rules = rules_file(tmp_path, body=body, events='["routed"]', phi=True)
    routed(tmp_path, spool, rules, {"1.2.25": 1})
    (made,) = notifications(spool)
    assert made["body"].startswith("routed ") and len(made["body"].split()) == 3


def test_values_are_never_templates_and_output_is_capped(tmp_path: Path, spool: Spool) -> None:
    body = "{{ series_description }}{% for i in range(99999) %}xxxxxxxxxx{% endfor %}"
    rules = rules_file(tmp_path, body=body, events='["routed"]')
    files = series_files(tmp_path / "src", "1.2.26", 1, SeriesDescription="{{ 7*7 }}\x1b[31m")
    with Worker(spool, "receive") as worker:
        receive_file(worker, files[0])
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    (made,) = notifications(spool)
    assert made["body"].startswith("{{ 7*7 }}\x1b[31m") and "49" not in made["body"][:20]
    assert len(made["body"]) == 64 * 1024


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{{ event ", "body template: "),
        ("{{ no_such_variable }}", "'no_such_variable' is undefined"),
        ("{{ event.__class__.__mro__ }}", "body template: "),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "body template takes over 2 s",
        ),
    ],
)
def test_rules_check_catches_template_problems(tmp_path: Path, body: str, message: str) -> None:
    rules = rules_file(tmp_path, body=body)
    result = subprocess.run(
        [sys.executable, "-m", "mercli", "rules", "check", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3
    assert message in result.stderr and 'rules.toml:5: notify "hook"' in result.stderr


def test_notify_keys_are_checked(tmp_path: Path) -> None:
    path = rules_file(tmp_path)
    path.write_text(path.read_text().replace('notify = ["hook"]', 'notify = ["teams"]'))
    with pytest.raises(ConfigError, match='unknown notification channel "teams"'):
        load_rules(path)
    path = rules_file(tmp_path, target_notify='notify = ["hook"]\nnotify_on = ["routed"]')
    with pytest.raises(ConfigError, match='a target cannot notify on "routed"'):
        load_rules(path)
    path = rules_file(tmp_path, events='["sent"]')
    with pytest.raises(ConfigError, match='a rule cannot notify on "sent"'):
        load_rules(path)


SERIES = "1.2.27"


def _fresh(root: Path, source: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    spool = Spool.open(root)
    with Worker(spool, "receive") as worker:
        for path in sorted(source.iterdir()):
            receive_file(worker, path)


def _route_everything(root: Path, rules: RuleSet) -> None:
    spool = Spool(root)
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, rules)
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())


def test_kill_9_mid_routing_never_separates_event_and_notification(tmp_path: Path) -> None:
    """At every step of routing a series: either the series is still in incoming/ and no
    notification exists, or its job and both notifications exist (after recovery)."""
    root = tmp_path / "spool"
    source = tmp_path / "src"
    series_files(source, SERIES, 2)
    rules = load_rules(rules_file(tmp_path, events='["received", "routed"]'))

    def scenario() -> None:
        _route_everything(root, rules)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        pending = spool.items(INCOMING)
        jobs, told = spool.items(OUTGOING), notifications(spool)
        if pending:
            assert (jobs, told) == ([], []), step
        else:
            assert len(jobs) == 1 and [n["event"] for n in told] == ["received", "routed"], step

    steps = run_until_done(scenario, check, setup=lambda: _fresh(root, source))
    assert steps > 10


def test_kill_9_mid_quarantine_never_separates_the_error_and_its_failed(tmp_path: Path) -> None:
    """A rule runs past `rule_timeout`: at every step of moving the series to error/, after
    recovery either it is back in incoming/ and nobody was told, or it is in error/ with its
    error.json and exactly one `failed` notification (the rule's and its target's, one
    channel)."""
    root = tmp_path / "spool"
    source = tmp_path / "src"
    series_files(source, SERIES, 2, StudyDescription="a" * 60 + "!")
    path = rules_file(tmp_path, events='["routed", "failed"]', target_notify='notify = ["hook"]')
    text = path.read_text().replace(
        """when = 'Modality == "CT"'""",
        """when = 'Modality == "CT" and re("(a|aa)+$", StudyDescription)'""",
    )
    path.write_text('[route]\nrule_timeout = "0.05s"\n' + text)
    rules = load_rules(path)

    def scenario() -> None:
        _route_everything(root, rules)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        pending, errors, told = spool.items(INCOMING), spool.items(ERROR), notifications(spool)
        if pending:
            assert (errors, told) == ([], []), step
            assert len(list(pending[0].path.glob("*.dcm"))) == 2, step  # nothing lost
        else:
            (error,) = errors
            assert json.loads((error.path / "error.json").read_text())["rule"] == "ct", step
            assert [(n["event"], n["source"]["rule"]) for n in told] == [("failed", "ct")], step

    steps = run_until_done(scenario, check, setup=lambda: _fresh(root, source))
    assert steps > 10


def test_processed_tells_the_modules_notification_text(tmp_path: Path, spool: Spool) -> None:
    from tests.test_process import (
        COPY_MODULE,
        SERIES,
        process_once,
        process_rules,
        receive_series,
        route_all,
    )

    module = COPY_MODULE.replace(
        "result = {", 'result = {"__mercure_notification": {"text": "found nothing"}, '
    )
    rules = process_rules(tmp_path, module)
    channel = CHANNEL.format(body="{{ event }} {{ module }} {{ notification }}", phi="false")
    text = channel + rules.read_text().replace(
        'env = { MODULE_ENV = "set" }', 'env = { MODULE_ENV = "set" }\nnotify = ["hook"]'
    )
    rules.write_text(text)
    receive_series(tmp_path, spool, SERIES, 2, SeriesDescription="CHEST")
    route_all(spool, rules)
    assert notifications(spool) == []
    assert process_once(spool).processed == 1
    (made,) = notifications(spool)
    assert made["body"] == "processed copy found nothing"
    assert made["source"]["module"] == "copy"


def test_kill_9_mid_dispatch_never_loses_the_delivered_notification(tmp_path: Path) -> None:
    """At every step of sending a job to a folder target: after recovery, either the job is
    back in outgoing/ with no notification (it will be sent again), or it is in success/
    with its `delivered` notification."""
    from mercli.dispatch.service import DispatchService

    root = tmp_path / "spool"
    template = tmp_path / "template"
    rules = rules_file(tmp_path, events='["delivered"]')
    routed(tmp_path, Spool.open(template), rules, {"1.2.28": 2})
    assert notifications(Spool(template)) == []

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        shutil.copytree(template, root, symlinks=True)

    def scenario() -> None:
        DispatchService(root, 1).run(once=True)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        waiting, done, told = spool.items(OUTGOING), spool.items(SUCCESS), notifications(spool)
        if waiting:
            assert (len(waiting), done, told) == (1, [], []), step
        else:
            assert len(done) == 1 and [n["event"] for n in told] == ["delivered"], step

    steps = run_until_done(scenario, check, setup=setup)
    assert steps > 10


def test_channel_record_holds_what_differs_from_the_defaults() -> None:
    """Job files and notification items carry a channel's own settings only; reading them
    back gives the same channel (and old items, holding every setting, read the same)."""
    from mercli.notify.channels import Channel, Subscription

    channel = Channel(name="hook", type="webhook", url="https://x/h", headers={"A": "b"}, to=())
    record = channel.record()
    assert set(record) == {"name", "type", "url", "headers"}
    assert Channel.from_json(record) == channel == Channel.from_json(channel.to_json())
    record["headers"]["A"] = "changed"  # a fresh dict each time: the cache is not shared
    assert channel.record()["headers"] == {"A": "b"}
    subscription = Subscription(channel, ("routed",))
    assert Subscription.from_json(subscription.to_json()) == subscription
