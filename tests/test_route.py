"""`mercli route`: completion, rule semantics as jobs, late instances, concurrency, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from mercli.cli import cli
from mercli.fsutil import write_new
from mercli.names import safe_name
from mercli.route.router import Router, RouteSummary, SeriesState, scan
from mercli.rules.config import load_rules
from mercli.spool import DISCARD, INCOMING, JOB_FILE, OUTGOING, Spool, Worker, recover
from mercli.tags import read_tags
from tests.crashkit import run_until_done
from tests.dicomfiles import make_instance
from tests.kit import PACS_AND_ARCHIVE
from tests.netkit import receiver, storescu, wait_until
from tests.spoolkit import assert_whole_instances, receive_instance

RULES = (
    """
[route]
settle = "{settle}"
series_timeout = "{timeout}"

"""
    + PACS_AND_ARCHIVE
    + """
[targets.ai]
type = "folder"
path = "ai"

[[rules]]
name = "ct-to-pacs"
when = 'Modality == "CT"'
targets = ["pacs", "archive"]

[[rules]]
name = "chest-to-ai"
when = '"CHEST" in StudyDescription.upper()'
targets = ["ai", "archive"]

[[rules]]
name = "no-scouts"
when = '"LOCALIZER" in ImageType'
action = "discard"

[[rules]]
name = "mr-fallback"
fallback = true
when = 'Modality == "MR"'
targets = ["archive"]
"""
)


def write_rules(folder: Path, settle: str = "2s", timeout: str = "60s", text: str = RULES) -> Path:
    path = folder / "rules.toml"
    path.write_text(text.format(settle=settle, timeout=timeout))
    return path


def receive_file(worker: Worker, path: Path, **meta: Any) -> str:
    """Publish a DICOM file with its real sidecar into incoming/, as receive does."""
    sidecar = {**read_tags(path), "SenderAET": "TEST", "ReceivedAt": "2026-11-28T00:00:00+00:00"}
    sidecar.update(meta)
    name = safe_name(sidecar["SOPInstanceUID"])
    dcm, tags = worker.tmp_path(".dcm"), worker.tmp_path(".tags")
    write_new(dcm, path.read_bytes())
    write_new(tags, json.dumps(sidecar).encode())
    series = safe_name(sidecar["SeriesInstanceUID"])
    worker.spool.publish_to_group(INCOMING, series, [(dcm, f"{name}.dcm"), (tags, f"{name}.tags")])
    return series


def series_files(folder: Path, series: str, count: int, **attrs: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_instance(folder, series=series, number=n, **attrs) for n in range(count)]


def jobs(spool: Spool, state: str = OUTGOING) -> list[dict[str, Any]]:
    return [json.loads((item.path / JOB_FILE).read_text()) for item in spool.items(state)]


def instance_names(item: Path) -> set[str]:
    return {p.stem for p in item.glob("*.dcm")}


def route_all(spool: Spool, rules: Path) -> RouteSummary:
    summary = RouteSummary()
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in router.due(float("inf"))[0]:
            router.route(state, summary)
    return summary


# -- completion ---------------------------------------------------------------------------------


def test_completion_by_hint_and_by_timeout(tmp_path: Path, spool: Spool) -> None:
    rules = load_rules(write_rules(tmp_path, settle="2s", timeout="60s"))
    with Worker(spool, "receive") as worker:
        receive_instance(worker, "1.2.1", "1.2.1.1")
        receive_instance(worker, "1.2.2", "1.2.2.1")
        router = Router(spool, worker, rules)
        os.utime(spool.state_dir(INCOMING) / "1.2.1", (1000, 1000))
        os.utime(spool.state_dir(INCOMING) / "1.2.2", (1000, 1000))
        worker.write_hint("1.2.1", {"ended": "released"})
        os.utime(spool.root / "hints" / "1.2.1", (1001, 1001))
        due, next_at = router.due(now=1002.9)
        assert due == [] and next_at == 1003.0  # hint + settle
        due, next_at = router.due(now=1003.0)
        assert [s.name for s in due] == ["1.2.1"] and next_at == 1060.0  # the other: timeout
        assert [s.name for s in router.due(now=1060.0)[0]] == ["1.2.1", "1.2.2"]


def test_an_instance_after_the_hint_waits_for_the_timeout(tmp_path: Path, spool: Spool) -> None:
    settings = load_rules(write_rules(tmp_path, settle="2s", timeout="30s")).settings
    assert SeriesState("s", arrived=100.0, hint=99.0).ready_at(settings) == 130.0
    assert SeriesState("s", arrived=100.0, hint=100.0).ready_at(settings) == 102.0
    assert SeriesState("s", arrived=100.0, hint=None).ready_at(settings) == 130.0


def test_scan_costs_one_stat_per_series_not_per_instance(spool: Spool) -> None:
    with Worker(spool, "receive") as worker:
        for n in range(50):
            receive_instance(worker, "1.2.3", f"1.2.3.{n}")
        receive_instance(worker, "1.2.4", "1.2.4.1")
    states = scan(spool)
    assert sorted(s.name for s in states) == ["1.2.3", "1.2.4"]
    assert all(s.hint is None for s in states)


def test_a_batch_that_grew_since_the_scan_is_left_for_later(tmp_path: Path, spool: Spool) -> None:
    rules = write_rules(tmp_path)
    with Worker(spool, "receive") as worker:
        receive_instance(worker, "1.2.5", "1.2.5.1")
        (state,) = scan(spool)
        os.utime(state_path := spool.state_dir(INCOMING) / "1.2.5", (1, 1))
        stale = SeriesState(state.name, arrived=0.5, hint=None)
        with Worker(spool, "route") as router_worker:
            Router(spool, router_worker, load_rules(rules)).route(stale, RouteSummary())
    assert state_path.is_dir() and spool.items(OUTGOING) == []


# -- rules become jobs --------------------------------------------------------------------------


def test_fan_out_hard_links_and_carries_the_target(tmp_path: Path, spool: Spool) -> None:
    files = series_files(tmp_path / "src", "1.2.10", 3, StudyDescription="Chest CT")
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    summary = route_all(spool, write_rules(tmp_path))
    assert summary.series == 1 and summary.instances == 3 and len(summary.jobs) == 3
    by_target = {job["target"]["name"]: job for job in jobs(spool)}
    assert set(by_target) == {"pacs", "archive", "ai"}  # archive named twice, sent once
    assert by_target["archive"]["rules"] == ["ct-to-pacs", "chest-to-ai"]
    assert by_target["archive"]["target"]["path"] == str(tmp_path / "archive")
    assert by_target["pacs"]["target"]["called_aet"] == "PACS"
    assert (
        by_target["pacs"]["SeriesInstanceUID"] == "1.2.10" and by_target["pacs"]["instances"] == 3
    )
    inodes = {
        (p.name, p.stat().st_ino) for item in spool.items(OUTGOING) for p in item.path.glob("*.dcm")
    }
    assert len(inodes) == 3  # the same three files in every job: hard links, no copies
    assert spool.items(INCOMING) == []
    events = [e for e in spool.events.read() if e["event"] == "routed"]
    assert {e["target"] for e in events} == {"pacs", "archive", "ai"}
    assert all(e["rules"] and e["series"] == "1.2.10" for e in events)


def test_a_symlink_in_incoming_is_never_followed_into_a_job(tmp_path: Path, spool: Spool) -> None:
    """os.link's default is to follow symlinks (Python 3.11 on Linux happens not to): a link
    planted in incoming/ must never put the file it points to into a job."""
    files = series_files(tmp_path / "src", "1.2.11", 2, StudyDescription="Chest CT")
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"not for any target")
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    series = spool.state_dir(INCOMING) / "1.2.11"
    victim = next(series.glob("*.dcm"))
    victim.unlink()
    victim.symlink_to(secret)
    route_all(spool, write_rules(tmp_path))
    carried = [p for item in spool.items(OUTGOING) for p in item.path.glob("*.dcm")]
    assert carried and all(
        p.is_symlink() or p.stat().st_ino != secret.stat().st_ino for p in carried
    )
    assert secret.stat().st_nlink == 1  # never hard-linked into the spool


def test_discard_rule_and_no_match_keep_the_reason(tmp_path: Path, spool: Spool) -> None:
    scouts = series_files(tmp_path / "a", "1.2.20", 2, ImageType=["ORIGINAL", "LOCALIZER"])
    other = series_files(tmp_path / "b", "1.2.21", 2, Modality="US")
    with Worker(spool, "receive") as worker:
        for path in [*scouts, *other]:
            receive_file(worker, path)
    summary = route_all(spool, write_rules(tmp_path))
    assert len(summary.discarded) == 2 and summary.jobs == []
    reasons = {job["SeriesInstanceUID"]: job for job in jobs(spool, DISCARD)}
    assert "no-scouts" in reasons["1.2.20"]["reason"] and reasons["1.2.20"]["rules"]
    assert reasons["1.2.21"]["reason"] == "no rule matched"
    assert all("target" not in job for job in reasons.values())
    discarded = [e for e in spool.events.read() if e["event"] == "discarded"]
    assert len(discarded) == 2 and all(e["reason"] for e in discarded)


def test_fallback_applies_only_when_nothing_else_matched(tmp_path: Path, spool: Spool) -> None:
    files = series_files(tmp_path / "src", "1.2.30", 2, Modality="MR")
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    route_all(spool, write_rules(tmp_path))
    (job,) = jobs(spool)
    assert job["target"]["name"] == "archive" and job["rules"] == ["mr-fallback"]


def test_disagreeing_instances_split_the_series_never_merge(tmp_path: Path, spool: Spool) -> None:
    files = series_files(tmp_path / "src", "1.2.40", 4)
    with Worker(spool, "receive") as worker:
        for n, path in enumerate(files):
            receive_file(worker, path, Modality="CT" if n < 3 else "US")
    summary = route_all(spool, write_rules(tmp_path))
    assert len(summary.jobs) == 2 and len(summary.discarded) == 1
    sizes = sorted(len(instance_names(item.path)) for item in spool.items(OUTGOING))
    assert sizes == [3, 3]
    (discarded,) = spool.items(DISCARD)
    assert len(instance_names(discarded.path)) == 1


def test_a_missing_sidecar_is_rebuilt_from_the_instance(tmp_path: Path, spool: Spool) -> None:
    (path,) = series_files(tmp_path / "src", "1.2.50", 1)
    with Worker(spool, "receive") as worker:
        series = receive_file(worker, path)
    for tags in (spool.state_dir(INCOMING) / series).glob("*.tags"):
        tags.unlink()  # a crash between the .dcm and the .tags rename
    route_all(spool, write_rules(tmp_path))
    for item in spool.items(OUTGOING):
        (tags,) = item.path.glob("*.tags")
        assert json.loads(tags.read_text())["SeriesInstanceUID"] == "1.2.50"


# -- late instances, concurrency, crashes -------------------------------------------------------


def test_an_instance_arriving_during_routing_goes_to_a_follow_up_batch(
    tmp_path: Path, spool: Spool
) -> None:
    rules = load_rules(write_rules(tmp_path))
    files = series_files(tmp_path / "src", "1.2.60", 3)
    with Worker(spool, "receive") as receiver_worker, Worker(spool, "route") as worker:
        for path in files[:2]:
            receive_file(receiver_worker, path)
        router = Router(spool, worker, rules)
        claim = worker.claim(INCOMING, "1.2.60")
        assert claim is not None
        receive_file(receiver_worker, files[2])  # lands while the batch is claimed
        router._route_claimed(claim, RouteSummary())
        assert instance_names(spool.state_dir(INCOMING) / "1.2.60") == {files[2].name[:-4]}
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    per_target: dict[str, set[str]] = {}
    for item in spool.items(OUTGOING):
        target = json.loads((item.path / JOB_FILE).read_text())["target"]["name"]
        per_target.setdefault(target, set()).update(instance_names(item.path))
    assert per_target == {t: {p.name[:-4] for p in files} for t in ("pacs", "archive")}


def test_concurrent_routers_route_each_series_once(tmp_path: Path, spool: Spool) -> None:
    rules = write_rules(tmp_path)
    with Worker(spool, "receive") as worker:
        for s in range(40):
            for n in range(3):
                receive_instance(worker, f"1.2.70.{s}", f"1.2.70.{s}.{n}")
    text = RULES.replace("when = 'Modality == \"CT\"'\n", "")  # route everything to pacs+archive
    rules.write_text(text.format(settle="2s", timeout="60s"))
    command = [sys.executable, "-m", "mercli", "route", "--spool", str(spool.root)]
    routers = [
        subprocess.Popen(
            [*command, "--rules", str(rules), "--once", "--all"], stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    assert [r.wait(timeout=120) for r in routers] == [0, 0, 0]
    per_series: dict[str, list[set[str]]] = {}
    for job in jobs(spool):
        per_series.setdefault(job["series"], []).append(
            instance_names(spool.state_dir(OUTGOING) / job["id"])
        )
    assert len(per_series) == 40
    for series, batches in per_series.items():
        assert len(batches) == 2, series  # pacs + archive, once each
        assert all(names == {f"{series}.{n}" for n in range(3)} for names in batches)


def test_kill_9_at_every_step_of_routing_routes_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    rules = write_rules(tmp_path, text=RULES.replace("when = 'Modality == \"CT\"'\n", ""))
    series, members = "1.2.80", {f"1.2.80.{n}" for n in range(3)}

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        with Worker(Spool.open(root), "receive") as worker:
            for sop in sorted(members):
                receive_instance(worker, series, sop)

    def scenario() -> None:
        route_all(Spool(root), rules)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        route_all(spool, rules)  # the next router finishes the work
        targets: dict[str, set[str]] = {}
        for item in spool.items(OUTGOING):
            target = json.loads((item.path / JOB_FILE).read_text())["target"]["name"]
            assert target not in targets, (step, "routed twice")
            targets[target] = assert_whole_instances(item.path)
        assert targets == {"pacs": members, "archive": members}, step
        assert spool.items(INCOMING) == [] and list(spool.claims.iterdir()) == []

    steps = run_until_done(scenario, check, setup=setup)
    assert steps > 20


# -- the command --------------------------------------------------------------------------------


def test_route_once_cli_and_invalid_rules_exit_3(tmp_path: Path, spool: Spool) -> None:
    rules = write_rules(tmp_path)
    with Worker(spool, "receive") as worker:
        receive_instance(worker, "1.2.90", "1.2.90.1")
    runner = CliRunner()
    base = ["route", "--spool", str(spool.root), "--rules", str(rules)]
    result = runner.invoke(cli, [*base, "--once"])
    assert result.exit_code == 0 and "routed 0 series" in result.output  # not complete yet
    result = runner.invoke(cli, [*base, "--once", "--all"])
    assert result.exit_code == 0 and "routed 1 series" in result.output
    assert runner.invoke(cli, [*base, "--all"]).exit_code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "x"\nwhen = "Modalty == 1"\ntargets = ["nowhere"]\n')
    result = runner.invoke(cli, ["route", "--spool", str(spool.root), "--rules", str(bad)])
    assert result.exit_code == 3 and "bad.toml" in result.output


def test_service_routes_within_settle_of_the_sender_releasing(tmp_path: Path) -> None:
    """receive + route as services: a hint makes the series leave well before the timeout."""
    spool = tmp_path / "spool"
    rules = write_rules(tmp_path, settle="1s", timeout="1h")
    files = series_files(tmp_path / "src", "1.2.95", 5)
    route = subprocess.Popen(
        [sys.executable, "-m", "mercli", "route", "--spool", str(spool), "--rules", str(rules)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with receiver(spool, "--processes", "1") as running:
            assert storescu(running.port, files).returncode == 0
            wait_until(lambda: len(list((spool / OUTGOING).iterdir())) == 2, timeout=30)
    finally:
        route.send_signal(signal.SIGTERM)
        assert route.wait(timeout=30) == 0, route.stderr.read() if route.stderr else ""
    assert list((spool / INCOMING).iterdir()) == []
