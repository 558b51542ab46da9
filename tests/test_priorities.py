"""Priorities (SPEC §4.1): urgent jobs go first without starving normal ones, offpeak jobs wait
for their window, ordered targets keep their order, status shows the backlog per priority."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from click.testing import CliRunner

from mercli.cli import cli
from mercli.dispatch.dispatcher import URGENT_IN_A_ROW, Dispatcher
from mercli.jobs import JobInfo, OffpeakWindow, highest_priority, job_priority
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import DISCARD, ERROR, JOB_FILE, OUTGOING, SUCCESS, Spool, Worker
from tests.reliability.kit import dicom_target, storescp, target_toml
from tests.test_dispatch import Scp, dispatch_once
from tests.test_route import receive_file, series_files

NOON, NIGHT = datetime(2026, 11, 28, 12, 0), datetime(2026, 11, 28, 23, 30)

# Series whose description names their priority get it from a rule; all go to every target.
RULES = """
[[rules]]
name = "stroke"
when = '"URGENT" in SeriesDescription'
priority = "urgent"
targets = [{names}]

[[rules]]
name = "research"
when = '"OFFPEAK" in SeriesDescription'
priority = "offpeak"
targets = [{names}]

[[rules]]
name = "rest"
when = '"URGENT" not in SeriesDescription and "OFFPEAK" not in SeriesDescription'
targets = [{names}]

[[rules]]
name = "scouts"
when = '"SCOUT" in SeriesDescription'
action = "discard"
"""


def write_rules(folder: Path, targets: Mapping[str, Mapping[str, object]]) -> Path:
    path = folder / "rules.toml"
    text = '[route]\noffpeak = "22:00-06:00"\n\n'
    text += "".join(target_toml(name, settings) for name, settings in targets.items())
    text += RULES.format(names=", ".join(json.dumps(name) for name in targets))
    path.write_text(text)
    return path


def folder(tmp_path: Path, name: str = "dest", **options: object) -> dict[str, object]:
    return {"type": "folder", "path": str(tmp_path / name), **options}


def route(
    tmp_path: Path, spool: Spool, rules: Path, series: list[tuple[str, str]], study: str = "1.9"
) -> list[str]:
    """Receive one instance per (uid, description) and route the series one after the other
    (so jobs are created, and first received, in list order); the new job ids per series."""
    made = []
    ruleset = load_rules(rules)
    for uid, description in series:
        stamp = f"2026-11-28T00:{len(made) // 60:02d}:{len(made) % 60:02d}+00:00"
        with Worker(spool, "receive") as worker:
            (path,) = series_files(
                tmp_path / "src" / uid,
                uid,
                1,
                StudyInstanceUID=study,
                SeriesDescription=description,
            )
            receive_file(worker, path, ReceivedAt=stamp)
        summary = RouteSummary()
        with Worker(spool, "route") as worker:
            router = Router(spool, worker, ruleset)
            for state in router.due(float("inf"))[0]:
                router.route(state, summary)
        made += summary.jobs
    return made


def job(spool: Spool, name: str, state: str = OUTGOING) -> dict[str, object]:
    result: dict[str, object] = json.loads((spool.state_dir(state) / name / JOB_FILE).read_text())
    return result


def dispatched(spool: Spool) -> list[str]:
    return [e["item"] for e in spool.events.read() if e["event"] == "dispatched"]


# -- the priority of a job -----------------------------------------------------------------------


def test_job_json_priority_comes_from_the_rules_and_the_target(
    tmp_path: Path, spool: Spool
) -> None:
    targets = {"a": folder(tmp_path, "a"), "b": folder(tmp_path, "b", priority="urgent")}
    rules = write_rules(tmp_path, targets)
    urgent = route(tmp_path, spool, rules, [("1.2.1", "URGENT head")])
    normal = route(tmp_path, spool, rules, [("1.2.2", "plain")])
    offpeak = route(tmp_path, spool, rules, [("1.2.3", "OFFPEAK study")])
    route(tmp_path, spool, rules, [("1.2.4", "SCOUT")])
    by_target = {
        key: {job(spool, n)["target"]["name"]: job(spool, n) for n in names}  # type: ignore[index]
        for key, names in (("urgent", urgent), ("normal", normal), ("offpeak", offpeak))
    }
    assert by_target["urgent"]["a"]["priority"] == "urgent"
    assert by_target["normal"]["a"]["priority"] == "normal"
    assert by_target["offpeak"]["a"]["priority"] == "offpeak"
    assert by_target["offpeak"]["a"]["offpeak"] == "22:00-06:00"  # dispatch needs no rules file
    assert "offpeak" not in by_target["normal"]["a"]
    for key in ("urgent", "normal", "offpeak"):  # the target says urgent: its jobs are urgent
        assert by_target[key]["b"]["priority"] == "urgent"
        assert "offpeak" not in by_target[key]["b"]
    (scout,) = spool.items(DISCARD)
    assert "priority" not in job(spool, scout.name, DISCARD)


def test_jobs_without_a_priority_are_normal_and_windows_wrap_midnight(tmp_path: Path) -> None:
    assert job_priority({}) == job_priority({"priority": "asap"}) == "normal"
    assert highest_priority(["offpeak", "normal", "urgent"]) == "urgent"
    assert highest_priority([]) == "normal"
    night = OffpeakWindow.parse("22:00-06:00")
    inside = [datetime(2026, 1, 1, h, m) for h, m in ((22, 0), (23, 59), (0, 0), (5, 59))]
    outside = [datetime(2026, 1, 1, h, m) for h, m in ((6, 0), (12, 0), (21, 59))]
    assert all(night.contains(t) for t in inside) and not any(night.contains(t) for t in outside)
    lunch = OffpeakWindow.parse("12:00-13:30")
    assert lunch.contains(datetime(2026, 1, 1, 13, 29)) and not lunch.contains(NIGHT)
    record = {"created": "2026-11-28T00:00:00+00:00", "target": {"name": "t", "type": "folder"}}
    (tmp_path / JOB_FILE).write_text(json.dumps(record))  # written before priorities existed
    info = JobInfo.load("old", tmp_path)
    assert (info.priority, info.offpeak) == ("normal", None)
    (tmp_path / JOB_FILE).write_text(json.dumps({**record, "priority": "offpeak"}))
    assert JobInfo.load("x", tmp_path).offpeak is None  # no window: any time, last


# -- dispatch order ------------------------------------------------------------------------------


def test_an_urgent_job_overtakes_the_normal_backlog_to_storescp(
    tmp_path: Path, spool: Spool
) -> None:
    with storescp(tmp_path / "storescp") as port:
        rules = write_rules(tmp_path, {"pacs": dicom_target(port, retry_delay="0s")})
        normal = route(tmp_path, spool, rules, [(f"1.2.10.{n}", "plain") for n in range(20)])
        with Worker(spool, "dispatch") as worker:  # one normal job is under way...
            dispatcher = Dispatcher(spool, worker)
            picked = dispatcher.pick()
            assert picked is not None and picked[0].name == normal[0]
            assert dispatcher.attempt(*picked).ok
        (urgent,) = route(tmp_path, spool, rules, [("1.2.10.99", "URGENT")])  # ...it arrives
        result = dispatch_once(spool, "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert dispatched(spool) == [normal[0], urgent, *normal[1:]]
    assert len(list((tmp_path / "storescp").iterdir())) == 21


def test_normal_jobs_are_not_starved_by_urgent_ones(tmp_path: Path, spool: Spool) -> None:
    rules = write_rules(tmp_path, {"dest": folder(tmp_path)})
    series = [(f"1.2.20.{n}", "URGENT") for n in range(10)]
    series += [(f"1.2.21.{n}", "plain") for n in range(5)]
    made = route(tmp_path, spool, rules, series)
    urgent, normal = set(made[:10]), made[10:]
    assert dispatch_once(spool, "--workers", "1").returncode == 0
    order = dispatched(spool)
    pattern = "".join("U" if name in urgent else "N" for name in order)
    assert pattern == "UUUUNUUUUNUUNNN"  # at most URGENT_IN_A_ROW urgent while normal waits
    assert "U" * (URGENT_IN_A_ROW + 1) not in pattern
    assert [name for name in order if name not in urgent] == normal  # oldest first


def test_offpeak_jobs_wait_for_their_window(tmp_path: Path, spool: Spool) -> None:
    rules = write_rules(tmp_path, {"dest": folder(tmp_path)})
    (offpeak,) = route(tmp_path, spool, rules, [("1.2.30", "OFFPEAK")])
    (normal,) = route(tmp_path, spool, rules, [("1.2.31", "plain")])
    with Worker(spool, "dispatch") as worker:
        dispatcher = Dispatcher(spool, worker, clock=lambda: NOON)
        picked = dispatcher.pick()
        assert picked is not None and picked[0].name == normal  # the older offpeak one waits
        dispatcher.attempt(*picked)
        assert dispatcher.pick() is None
        dispatcher.clock = lambda: datetime(2026, 11, 28, 6, 0)  # the window just closed
        assert dispatcher.pick() is None
        dispatcher.clock = lambda: NIGHT
        picked = dispatcher.pick()
        assert picked is not None and picked[0].name == offpeak
        assert picked[1].priority == "offpeak" and dispatcher.attempt(*picked).ok
    assert [item.name for item in spool.items(SUCCESS)] == sorted([offpeak, normal])


def test_inside_the_window_offpeak_jobs_go_after_the_others(tmp_path: Path, spool: Spool) -> None:
    rules = write_rules(tmp_path, {"dest": folder(tmp_path)})
    made = route(tmp_path, spool, rules, [("1.2.32", "OFFPEAK"), ("1.2.33", "plain")])
    made += route(tmp_path, spool, rules, [("1.2.34", "URGENT")])
    with Worker(spool, "dispatch") as worker:
        dispatcher = Dispatcher(spool, worker, once=True, clock=lambda: NIGHT)
        order = []
        while (picked := dispatcher.pick()) is not None:
            order.append(picked[0].name)
            dispatcher.attempt(*picked)
    assert order == [made[2], made[1], made[0]]


def test_an_ordered_target_keeps_study_order_whatever_the_priorities(
    tmp_path: Path, spool: Spool
) -> None:
    """An urgent series never overtakes an earlier series of its study on an ordered target;
    that earlier series goes at the urgent one's priority, ahead of the normal backlog."""
    server = Scp()
    try:
        target = {**dicom_target(server.port, retry_delay="0s"), "ordered": True}
        rules = write_rules(tmp_path, {"pacs": target})
        backlog = [(f"1.2.40.{n}", "plain") for n in range(3)]
        route(tmp_path, spool, rules, backlog, study="1.9.1")
        study = [("1.2.41.1", "plain"), ("1.2.41.2", "URGENT"), ("1.2.41.3", "plain")]
        route(tmp_path, spool, rules, study, study="1.9.2")
        assert dispatch_once(spool, "--workers", "1").returncode == 0
        arrival = [uid for uid, _, _ in server.received]
    finally:
        server.close()
    # the urgent one and the one before it first; the normal rest of the study oldest first
    assert arrival == ["1.2.41.1", "1.2.41.2", "1.2.40.0", "1.2.40.1", "1.2.40.2", "1.2.41.3"]


# -- status and resend ---------------------------------------------------------------------------


def test_status_counts_the_backlog_per_priority(tmp_path: Path, spool: Spool) -> None:
    targets = {"a": folder(tmp_path, "a"), "b": folder(tmp_path, "b", priority="urgent")}
    rules = write_rules(tmp_path, targets)
    route(tmp_path, spool, rules, [("1.2.50", "URGENT"), ("1.2.51", "plain")])
    route(tmp_path, spool, rules, [("1.2.52", "plain"), ("1.2.53", "OFFPEAK")])
    result = CliRunner().invoke(cli, ["status", "--json", "--spool", str(spool.root)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["priorities"] == {
        OUTGOING: {"urgent": 5, "normal": 2, "offpeak": 1},
        ERROR: {"urgent": 0, "normal": 0, "offpeak": 0},
    }
    assert document["targets"]["a"] == {
        "jobs": 4,
        "priorities": {"urgent": 1, "normal": 2, "offpeak": 1},
    }
    assert document["targets"]["b"]["priorities"] == {"urgent": 4, "normal": 0, "offpeak": 0}
    wide = {"COLUMNS": "120"}  # target rows do not wrap
    table = CliRunner().invoke(cli, ["status", "--spool", str(spool.root)], env=wide)
    assert table.exit_code == 0
    assert "-> a (1 urgent, 1 offpeak)" in table.output and "-> b (4 urgent)" in table.output
    rows = {line.split()[1]: line.split()[3] for line in table.output.splitlines()[4:-2]}
    assert (rows["urgent"], rows["normal"], rows["offpeak"]) == ("5", "2", "1")


def test_resend_keeps_or_recomputes_the_priority(tmp_path: Path, spool: Spool) -> None:
    targets = {"a": folder(tmp_path, "a"), "night": folder(tmp_path, "n", priority="offpeak")}
    rules = write_rules(tmp_path, targets)
    made = route(tmp_path, spool, rules, [("1.2.60", "URGENT")])
    (job_a,) = [name for name in made if job(spool, name)["target"]["name"] == "a"]  # type: ignore[index]
    with Worker(spool, "test") as worker:  # the urgent job failed for good
        claim = worker.claim(OUTGOING, job_a)
        assert claim is not None
        claim.quarantine("test: refused")
    runner = CliRunner()
    back = runner.invoke(cli, ["resend", "--from", "error", "--spool", str(spool.root), job_a])
    assert back.exit_code == 0, back.output
    assert job(spool, back.stdout.split()[0].split("/")[1])["priority"] == "urgent"  # kept
    for item in spool.items(OUTGOING):
        with Worker(spool, "test") as worker:
            claim = worker.claim(OUTGOING, item.name)
            assert claim is not None
            claim.move_to(SUCCESS)
    (first, *_) = spool.items(SUCCESS)
    args = ["resend", "--from", "success", "--spool", str(spool.root), "--rules", str(rules)]
    moved = runner.invoke(cli, [*args, "--target", "night", first.name])
    assert moved.exit_code == 0, moved.output
    record = job(spool, moved.stdout.split()[0].split("/")[1])
    assert (record["priority"], record["offpeak"]) == ("offpeak", "22:00-06:00")  # the target's
