"""`mercli resend`: filters, ids, routing, targets, failed jobs, crashes, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mercli.cli import cli
from mercli.jobs import DISPATCH_FILE, Target, study_record
from mercli.resend import Filters, parse_time, resend_items, select
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import RuleSet, load_rules
from mercli.spool import (
    DISCARD,
    ERROR,
    INCOMING,
    JOB_FILE,
    OUTGOING,
    STATES,
    STUDIES,
    SUCCESS,
    Spool,
    Worker,
    link_instances,
    recover,
    write_json,
)
from tests import test_studies as studies
from tests.crashkit import run_until_done
from tests.dicomfiles import make_instance
from tests.netkit import free_port
from tests.spoolkit import assert_whole_instances, receive_instance
from tests.test_dispatch import Scp, dicom_target, dispatch_once, rules_for
from tests.test_purge import listing
from tests.test_route import receive_file, route_all, series_files

FOLDER = '[targets.archive]\ntype = "folder"\npath = "archive"\n'
ONLY_MR = FOLDER + '[[rules]]\nname = "mr"\nwhen = \'Modality == "MR"\'\ntargets = ["archive"]\n'
EVERYTHING = FOLDER + '[[rules]]\nname = "all"\ntargets = ["archive"]\n'
SERIES = {
    "1.2.1": {"StudyInstanceUID": "1.9.1", "PatientID": "P1", "AccessionNumber": "A1"},
    "1.2.2": {"StudyInstanceUID": "1.9.1", "PatientID": "P2", "AccessionNumber": "A2"},
    "1.2.3": {"StudyInstanceUID": "1.9.2", "PatientID": "P1", "AccessionNumber": "A3"},
}


def write_rules(folder: Path, text: str, name: str = "rules.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def discarded(tmp_path: Path, spool: Spool, series: dict[str, dict[str, str]]) -> dict[str, str]:
    """Receive two CT instances per series and route them by a rule that wants only MR."""
    with Worker(spool, "receive") as worker:
        for uid, attrs in series.items():
            for path in series_files(tmp_path / "src" / uid, uid, 2, **attrs):
                receive_file(worker, path)
    route_all(spool, write_rules(tmp_path, ONLY_MR, "only-mr.toml"))
    return {
        json.loads((item.path / JOB_FILE).read_text())["SeriesInstanceUID"]: item.name
        for item in spool.items(DISCARD)
    }


def resend(spool: Spool, *args: str, stdin: str | None = None) -> tuple[int, list[str], str]:
    command = ["resend", "--spool", str(spool.root), *args]
    result = CliRunner().invoke(cli, command, input=stdin)
    return result.exit_code, result.stdout.split(), result.stderr


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.iterdir() if p.suffix in (".dcm", ".tags")}


# -- selecting ----------------------------------------------------------------------------------


def test_each_filter_and_ids_select_and_dry_run_changes_nothing(
    tmp_path: Path, spool: Spool
) -> None:
    items = discarded(tmp_path, spool, SERIES)
    label = {uid: f"discard/{name}" for uid, name in items.items()}
    before = listing(spool.root)

    def chosen(*args: str, stdin: str | None = None) -> list[str]:
        code, out, _ = resend(spool, "--from", "discard", "--dry-run", *args, stdin=stdin)
        assert code == 0
        return sorted(out)

    one, two, three = (label[uid] for uid in SERIES)
    assert chosen("--study", "1.9.1") == sorted([one, two])
    assert chosen("--series", "1.2.3") == [three]
    assert chosen("--patient-id", "P1") == sorted([one, three])
    assert chosen("--accession", "A2") == [two]
    assert chosen("--study", "1.9.1", "--patient-id", "P1") == [one]
    assert chosen("--all") == sorted([one, two, three])
    assert chosen(items["1.2.2"]) == [two]
    assert chosen("-", stdin=f"{three}\n\n{items['1.2.1']}\n") == sorted([one, three])
    assert chosen("-", "--patient-id", "P2", stdin=f"{one}\n{two}\n") == [two]
    assert chosen("--since", "1h") == sorted([one, two, three])
    assert chosen("--until", "1h") == []
    assert chosen("--since", "2999-01-01") == []
    assert chosen("--until", "2999-01-01T00:00:00+00:00") == sorted([one, two, three])
    assert listing(spool.root) == before


def test_time_parsing() -> None:
    assert parse_time("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_time("2026-11-28T00:00:00+00:00", 0) == 1795824000.0
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday", 0)


# -- back through routing -----------------------------------------------------------------------


def test_discarded_series_goes_back_through_routing(tmp_path: Path, spool: Spool) -> None:
    items = discarded(tmp_path, spool, SERIES)
    source = spool.state_dir(DISCARD) / items["1.2.1"]
    linked = inodes(source)
    with Worker(spool, "receive") as worker:  # a late instance of the series is waiting
        receive_file(worker, make_instance(tmp_path, series="1.2.1", number=9))
    code, out, _ = resend(spool, "--from", "discard", "--series", "1.2.1")
    assert (code, out) == (0, ["incoming/1.2.1"])
    group = spool.state_dir(INCOMING) / "1.2.1"
    assert not source.exists()
    assert sorted(p.suffix for p in group.iterdir()) == [".dcm"] * 3 + [".tags"] * 3
    assert {name: ino for name, ino in inodes(group).items() if name in linked} == linked
    assert spool.read_hint("1.2.1") is not None  # route takes it after `settle`
    (event,) = [e for e in spool.events.read() if e["event"] == "resent"]
    assert (event["from"], event["to"]) == (f"discard/{items['1.2.1']}", "incoming/1.2.1")
    route_all(spool, write_rules(tmp_path, EVERYTHING))
    (job,) = [json.loads((i.path / JOB_FILE).read_text()) for i in spool.items(OUTGOING)]
    assert (job["series"], job["instances"], job["rules"]) == ("1.2.1", 3, ["all"])


def test_resending_twice_finds_nothing_the_second_time(tmp_path: Path, spool: Spool) -> None:
    discarded(tmp_path, spool, SERIES)
    code, out, _ = resend(spool, "--from", "discard", "--all")
    assert (code, sorted(out)) == (0, [f"incoming/{uid}" for uid in SERIES])
    assert resend(spool, "--from", "discard", "--all")[:2] == (0, [])


def test_quarantined_instance_is_rebuilt_or_left_alone(tmp_path: Path, spool: Spool) -> None:
    good = make_instance(tmp_path, series="1.2.40", sop="1.2.40.1")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all" * 10)
    with Worker(spool, "receive") as worker:
        for path in (good, bad):
            copy = worker.tmp_path()
            shutil.copy(path, copy)
            meta = {"SenderAET": "MODALITY", "ReceivedAt": "2026-11-28T00:00:00+00:00"}
            worker.quarantine_files({"instance.dcm": copy}, "bug", "receive", **meta)
    bad_item = max(spool.items(ERROR), key=lambda i: (i.path / "instance.dcm").stat().st_size < 200)
    ctime = bad_item.path.stat().st_ctime
    code, out, err = resend(spool, "--from", "error", "--all")
    assert (code, out) == (1, ["incoming/1.2.40"])
    assert f"cannot resend error/{bad_item.name}: instance still unreadable" in err
    assert [i.name for i in spool.items(ERROR)] == [bad_item.name]
    assert bad_item.path.stat().st_ctime == ctime  # not even claimed
    group = spool.state_dir(INCOMING) / "1.2.40"
    assert sorted(p.name for p in group.iterdir()) == ["1.2.40.1.dcm", "1.2.40.1.tags"]
    sidecar = json.loads((group / "1.2.40.1.tags").read_text())
    assert (sidecar["SOPInstanceUID"], sidecar["SenderAET"]) == ("1.2.40.1", "MODALITY")


# -- straight to a target -----------------------------------------------------------------------


def test_resend_to_a_target_makes_a_job_like_routes(tmp_path: Path, spool: Spool) -> None:
    items = discarded(tmp_path, spool, SERIES)
    rules = write_rules(tmp_path, EVERYTHING)
    source = spool.state_dir(DISCARD) / items["1.2.2"]
    linked = inodes(source)
    code, out, _ = resend(
        spool,
        "--from",
        "discard",
        "--accession",
        "A2",
        "--rules",
        str(rules),
        "--target",
        "archive",
    )
    assert code == 0 and len(out) == 1 and out[0].startswith("outgoing/")
    job_dir = spool.root / out[0]
    assert inodes(job_dir) == linked  # hard links, not copies
    job = json.loads((job_dir / JOB_FILE).read_text())
    assert job["target"] == load_rules(rules).targets["archive"].to_json()
    assert (job["id"], job["series"], job["rules"]) == (job_dir.name, "1.2.2", ["resend"])
    assert (job["StudyInstanceUID"], job["instances"]) == ("1.9.1", 2)
    assert job["resent_from"] == f"discard/{items['1.2.2']}"
    with Worker(spool, "receive") as worker:  # a job route made, for its keys
        for path in series_files(tmp_path / "src2", "1.2.9", 1, **SERIES["1.2.2"]):
            receive_file(worker, path)
    route_all(spool, rules)
    routed = next(
        json.loads((i.path / JOB_FILE).read_text())
        for i in spool.items(OUTGOING)
        if i.name != job_dir.name
    )
    assert set(job) == set(routed) | {"resent_from"}
    assert Target.from_json(job["target"]).name == "archive"


def test_unknown_target_and_usage_errors(tmp_path: Path, spool: Spool) -> None:
    items = discarded(tmp_path, spool, {"1.2.1": SERIES["1.2.1"]})
    rules = write_rules(tmp_path, EVERYTHING)
    code, _, err = resend(
        spool, "--from", "discard", "--all", "--rules", str(rules), "--target", "pacs"
    )
    assert code == 3 and f'Error: unknown target "pacs" ({rules}; defined: archive)' in err
    assert resend(spool, "--from", "discard")[0] == 2  # nothing selected
    assert resend(spool, "--from", "discard", "--all", "--target", "archive")[0] == 2
    assert resend(spool, "--from", "discard", "--since", "soon")[0] == 2
    assert resend(spool, "--from", "outgoing", "--all")[0] == 2
    assert resend(spool, "--from", "discard", f"error/{items['1.2.1']}")[0] == 2
    code, out, err = resend(spool, "--from", "discard", "nope", items["1.2.1"])
    assert (code, out) == (1, ["incoming/1.2.1"])
    assert "Error: no item nope in discard/" in err
    (tmp_path / "file").write_text("")
    command = ["resend", "--from", "discard", "--all", "--spool", str(tmp_path / "file")]
    assert CliRunner().invoke(cli, command).exit_code == 4


def test_failed_job_goes_back_to_its_target_with_only_the_missing(
    tmp_path: Path, spool: Spool
) -> None:
    scp = Scp(status=lambda ds: 0xA700 if int(ds.InstanceNumber) >= 2 else 0)
    try:
        rules = rules_for(tmp_path, dicom_target("pacs", scp.port, max_attempts=1), '"pacs"')
        with Worker(spool, "receive") as worker:
            for path in series_files(tmp_path / "src", "1.2.50", 4):
                receive_file(worker, path)
        route_all(spool, rules)
        assert dispatch_once(spool).returncode == 1
        (failed,) = spool.items(ERROR)
        assert sorted(n for _, n, _ in scp.received) == [0, 1]
        scp.status = lambda ds: 0  # the target is fixed
        code, out, _ = resend(spool, "--from", "error", "--all")
        assert code == 0 and out[0].startswith("outgoing/")
        job_dir = spool.root / out[0]
        job = json.loads((job_dir / JOB_FILE).read_text())
        assert job["target"]["port"] == scp.port and job["resent_from"] == f"error/{failed.name}"
        progress = json.loads((job_dir / DISPATCH_FILE).read_text())
        assert (len(progress["delivered"]), progress["attempts"]) == (2, 0)
        result = dispatch_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        scp.close()
    assert sorted(n for _, n, _ in scp.received) == [0, 1, 2, 3]  # 2 and 3 sent once, late
    assert spool.items(ERROR) == [] and len(spool.items(SUCCESS)) == 1


# -- crashes and concurrency ----------------------------------------------------------------------

CRASH_SERIES = "1.2.840.5"
CRASH_INSTANCES = sorted(f"{CRASH_SERIES}.{n}" for n in range(3))


def _crash_setup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    spool = Spool.open(root)
    with Worker(spool, "route") as worker:
        for sop in CRASH_INSTANCES:
            receive_instance(worker, CRASH_SERIES, sop)
        claim = worker.claim(INCOMING, CRASH_SERIES)
        assert claim is not None
        transaction = claim.transaction()
        folder = transaction.new_item(DISCARD, "d1")
        link_instances(claim.path, folder)
        write_json(folder / JOB_FILE, {"series": CRASH_SERIES, "SeriesInstanceUID": CRASH_SERIES})
        transaction.commit()


@pytest.mark.parametrize("to_target", [False, True], ids=["routing", "target"])
def test_resend_survives_kill_at_every_step(tmp_path: Path, to_target: bool) -> None:
    root = tmp_path / "spool"
    target = Target(name="archive", type="folder", path=tmp_path / "archive") if to_target else None

    def scenario() -> None:
        spool = Spool(root)
        resend_items(spool, select(spool, DISCARD, Filters())[0], target=target)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        seen = {
            f"{state}/{item.name}": sorted(assert_whole_instances(item.path))
            for state in STATES
            for item in spool.items(state)
        }
        assert list(seen.values()) == [CRASH_INSTANCES], (step, seen)  # exactly one copy
        (where,) = seen
        assert where in ("discard/d1", f"incoming/{CRASH_SERIES}") or (
            to_target and where.startswith("outgoing/")
        ), (step, where)
        assert list(spool.claims.iterdir()) == [] and list(spool.tmp.iterdir()) == []

    assert run_until_done(scenario, check, setup=lambda: _crash_setup(root)) > 20


def _mercli(spool: Spool, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "mercli", *args, "--spool", str(spool.root)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


PURGED = "success,discard"


def test_purge_dispatch_and_resend_at_once_lose_nothing(tmp_path: Path, spool: Spool) -> None:
    discards = discarded(tmp_path, spool, SERIES)
    rules = write_rules(tmp_path, EVERYTHING)
    with Worker(spool, "receive") as worker:
        for n in range(4):
            for path in series_files(tmp_path / "out" / str(n), f"1.3.{n}", 2):
                receive_file(worker, path)
    route_all(spool, rules)
    jobs = {
        item.name: sorted(p.name for p in item.path.glob("*.dcm")) for item in spool.items(OUTGOING)
    }
    processes = [
        _mercli(spool, "dispatch", "--once"),
        _mercli(spool, "resend", "--from", "discard", "--all"),
        *(_mercli(spool, "purge", "--older-than", "0", "--state", PURGED) for _ in range(3)),
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in processes]
    assert [code for code, _ in results] == [0] * 5, results
    for job, names in jobs.items():  # every job reached its target, whatever purge did after
        assert sorted(p.name for p in (tmp_path / "archive" / job).glob("*.dcm")) == names
    events: dict[str, list[str]] = {}
    for event in spool.events.read():
        if event["event"] in ("resent", "purged") and event.get("item") in discards.values():
            events.setdefault(event["item"], []).append(event["event"])
    for uid, item in discards.items():  # each discard item: resent or purged, exactly once
        assert events[item] in (["resent"], ["purged"]), (uid, events)
        group = spool.state_dir(INCOMING) / uid
        assert group.exists() == (events[item] == ["resent"])
    assert spool.items(OUTGOING) == spool.items(DISCARD) == []
    assert list(spool.claims.iterdir()) == [] and os.listdir(spool.tmp) == []


def test_failed_job_resent_after_the_target_comes_back(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    rules = rules_for(tmp_path, dicom_target("pacs", port, max_attempts=1), '"pacs"')
    with Worker(spool, "receive") as worker:
        for path in series_files(tmp_path / "src", "1.2.60", 3):
            receive_file(worker, path)
    route_all(spool, rules)
    assert dispatch_once(spool).returncode == 5  # nobody listening: error/ after one attempt
    (failed,) = spool.items(ERROR)
    monkeypatch.setattr("tests.test_dispatch.free_port", lambda: port)
    scp = Scp()  # the target is back, on its port
    try:
        code, out, _ = resend(spool, "--from", "error", failed.name)
        assert code == 0 and out[0].startswith("outgoing/")
        assert not (spool.root / out[0] / DISPATCH_FILE).exists()  # nothing delivered before
        result = dispatch_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        scp.close()
    assert sorted(n for _, n, _ in scp.received) == [0, 1, 2]


# -- study jobs and discarded studies (SPEC §4.1) -------------------------------------------------

BRAIN = (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010))  # the study's series, in arrival order
BRAIN_SERIES = [studies.series_uid(description, at) for description, at in BRAIN]


def study_items(
    tmp_path: Path, spool: Spool, state: str | None = SUCCESS, pacs: str = "port = 104"
) -> tuple[Path, dict[str, str]]:
    """The brain study completed into study jobs for pacs and archive (and T1's series job for
    ai), moved to `state` (None: left in outgoing/); the rules file, and the items by target."""
    path = studies.rules_file(tmp_path)
    path.write_text(path.read_text().replace("port = 104", pacs))
    rules = load_rules(path)
    for description, at in BRAIN:
        studies.send_series(tmp_path, spool, rules, description, at)
    assert len(studies.complete_due(spool, rules, 1020)[0]) == 2
    items = {}
    with Worker(spool, "test") as worker:
        for item in spool.items(OUTGOING):
            items[json.loads((item.path / JOB_FILE).read_text())["target"]["name"]] = item.name
            claim = worker.claim(OUTGOING, item.name)
            assert claim is not None
            if state == ERROR:
                claim.quarantine("test: refused")
            elif state is not None:
                claim.move_to(state)
            else:
                claim.release()
    return path, items


def route_due(spool: Spool, rules: RuleSet) -> None:
    summary = RouteSummary()
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, rules)
        for state in router.due(float("inf"))[0]:
            router.route(state, summary)


def tree_inodes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_ino
        for p in folder.rglob("*")
        if p.suffix in (".dcm", ".tags")
    }


def test_study_items_are_selected_by_study_and_by_their_series(
    tmp_path: Path, spool: Spool
) -> None:
    _, items = study_items(tmp_path, spool)
    label = {target: f"success/{name}" for target, name in items.items()}

    def chosen(*args: str) -> list[str]:
        code, out, _ = resend(spool, "--from", "success", "--dry-run", *args)
        assert code == 0
        return sorted(out)

    assert chosen("--study", studies.STUDY) == sorted(label.values())
    assert chosen("--study", "1.2.3") == []
    both = sorted([label["pacs"], label["archive"]])
    assert chosen("--series", studies.series_uid("DWI", 1005)) == both  # held by the studies
    assert chosen("--series", studies.series_uid("T1", 1000)) == sorted(label.values())
    assert chosen("--series", studies.series_uid("DWI", 1005), "--patient-id", "nobody") == []


def test_a_study_job_resent_to_a_target_stays_one_study_job(tmp_path: Path, spool: Spool) -> None:
    rules, items = study_items(tmp_path, spool)
    source = spool.state_dir(SUCCESS) / items["pacs"]
    original = json.loads((source / JOB_FILE).read_text())
    linked = tree_inodes(source)
    assert len(linked) == 14
    args = ["--from", "success", "--rules", str(rules), "--target", "archive", items["pacs"]]
    code, out, _ = resend(spool, *args)
    assert code == 0 and len(out) == 1 and out[0].startswith("outgoing/")
    job_dir = spool.root / out[0]
    assert tree_inodes(job_dir) == linked and not source.exists()  # hard links, same folders
    job = json.loads((job_dir / JOB_FILE).read_text())
    assert set(job) == set(original) | {"resent_from"}
    assert job["study"] is True and job["series"] == original["series"]
    assert (job["id"], job["rules"], job["instances"]) == (job_dir.name, ["resend"], 7)
    assert job["resent_from"] == f"success/{items['pacs']}"
    assert job["target"] == load_rules(rules).targets["archive"].to_json()
    for key in ("StudyInstanceUID", "PatientID", "Modality", "first_received", "last_received"):
        assert job[key] == original[key], key
    assert not (job_dir / DISPATCH_FILE).exists()
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    delivered = tmp_path / "archive" / job_dir.name
    assert sorted(p.name for p in delivered.iterdir()) == sorted(BRAIN_SERIES)
    assert len(list(delivered.rglob("*.dcm"))) == 7


def test_a_failed_study_job_goes_back_to_its_target_with_only_the_missing(
    tmp_path: Path, spool: Spool
) -> None:
    refuse = {("FLAIR", 1)}
    server = Scp(
        status=lambda ds: 0xA700 if (ds.SeriesDescription, ds.InstanceNumber) in refuse else 0
    )
    try:
        study_items(tmp_path, spool, None, f"port = {server.port}\nmax_attempts = 1")
        assert dispatch_once(spool).returncode == 1
        (failed,) = spool.items(ERROR)
        refuse.clear()  # the target is fixed
        code, out, _ = resend(spool, "--from", "error", "--study", studies.STUDY)
        assert code == 0 and len(out) == 1 and out[0].startswith("outgoing/")
        job_dir = spool.root / out[0]
        job = json.loads((job_dir / JOB_FILE).read_text())
        assert job["study"] is True and job["target"]["port"] == server.port
        assert [s["series"] for s in job["series"]] == BRAIN_SERIES
        assert job["resent_from"] == f"error/{failed.name}" and job["priority"] == "normal"
        progress = json.loads((job_dir / DISPATCH_FILE).read_text())
        assert (len(progress["delivered"]), progress["attempts"]) == (6, 0)
        assert all("/" in key for key in progress["delivered"])
        result = dispatch_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        server.close()
    order = [(uid, number) for uid, number, _ in server.received]
    expected = [
        (studies.series_uid(d, at), n)
        for d, at in BRAIN
        for n in range(studies.SERIES[d])
        if (d, n) != ("FLAIR", 1)
    ]
    assert order == [*expected, (studies.series_uid("FLAIR", 1010), 1)]  # the missing one, once
    assert spool.items(ERROR) == [] and spool.items(OUTGOING) == []


def test_a_study_back_through_routing_is_held_and_completed_again(
    tmp_path: Path, spool: Spool
) -> None:
    path, items = study_items(tmp_path, spool)
    rules = load_rules(path)
    source = spool.state_dir(SUCCESS) / items["archive"]
    linked = tree_inodes(source)
    code, out, _ = resend(spool, "--from", "success", items["archive"])
    assert (code, out) == (0, [f"incoming/{uid}" for uid in BRAIN_SERIES])
    assert not source.exists()
    for uid in BRAIN_SERIES:
        group = spool.state_dir(INCOMING) / uid
        assert {f"{uid}/{name}": ino for name, ino in inodes(group).items()} == {
            key: ino for key, ino in linked.items() if key.startswith(f"{uid}/")
        }
        assert spool.read_hint(uid) is not None  # route takes it after `settle`
    events = [e for e in spool.events.read() if e["event"] == "resent"]
    assert [e["to"] for e in events] == out
    route_due(spool, rules)
    (group,) = spool.items(STUDIES)
    assert len(list(group.path.iterdir())) == 3
    made, _ = studies.complete_due(spool, rules, time.time() + 3600)
    assert len(made) == 2
    jobs = studies.study_jobs(spool)
    assert sorted(job["target"]["name"] for job in jobs) == ["archive", "pacs"]
    for job in jobs:
        assert [s["series"] for s in job["series"]] == BRAIN_SERIES  # in their order again
        assert job["instances"] == 7 and job["rules"] == ["brain"]


def test_a_discarded_incomplete_study_goes_back_through_routing(
    tmp_path: Path, spool: Spool
) -> None:
    rules = load_rules(studies.rules_file(tmp_path, "discard"))
    for description, at in BRAIN[:2]:
        studies.send_series(tmp_path, spool, rules, description, at)
    studies.complete_due(spool, rules, 1905)
    (discarded,) = studies.study_jobs(spool, DISCARD)
    assert discarded["reason"].startswith("study incomplete: missing")
    code, out, _ = resend(spool, "--from", "discard", "--study", studies.STUDY)
    assert (code, out) == (0, [f"incoming/{uid}" for uid in BRAIN_SERIES[:2]])
    assert spool.items(DISCARD) == []
    studies.send_series(tmp_path, spool, rules, "FLAIR", 1010)  # the missing series, late
    made, _ = studies.complete_due(spool, rules, time.time() + 3600)
    assert len(made) == 2 and spool.items(STUDIES) == []
    for job in studies.study_jobs(spool):
        assert sorted(s["series"] for s in job["series"]) == sorted(BRAIN_SERIES)
        assert job["instances"] == 7


def test_a_study_item_resend_cannot_copy_whole_is_refused_and_left_alone(spool: Spool) -> None:
    listed = {"id": "x", "study": True, "series": [{"series": "1.2.3"}]}
    unlisted = spool.state_dir(ERROR) / "20261130T000000.000000-unlisted"
    (unlisted / "1.2.3").mkdir(parents=True)
    (unlisted / "1.2.3" / "1.2.3.1.dcm").write_bytes(b"x")
    (unlisted / "1.2.4").mkdir()
    (unlisted / "1.2.4" / "1.2.4.1.dcm").write_bytes(b"y")
    (unlisted / JOB_FILE).write_text(json.dumps(listed))
    linked = spool.state_dir(ERROR) / "20261130T000000.000000-symlink"
    (linked / "1.2.3").mkdir(parents=True)
    (linked / "1.2.3" / "1.2.3.1.dcm").symlink_to("/etc/passwd")
    (linked / JOB_FILE).write_text(json.dumps(listed))
    before = listing(spool.root)
    report = resend_items(spool, select(spool, ERROR, Filters())[0])
    assert report.resent == [] and report.vanished == 0
    reasons = dict(report.failed)
    assert "folders its job.json does not list: 1.2.4" in reasons[f"error/{unlisted.name}"]
    assert "1.2.3/1.2.3.1.dcm is not a regular file" in reasons[f"error/{linked.name}"]
    assert listing(spool.root) == before  # not even claimed


CRASH_STUDY = {"1.2.840.6": 2, "1.2.840.7": 3}  # series -> instances
CRASH_STUDY_INSTANCES = sorted(f"{s}.{n}" for s, count in CRASH_STUDY.items() for n in range(count))


def _crash_study_setup(root: Path) -> None:
    """discard/s1: a discarded study of two series, made as completion makes one."""
    shutil.rmtree(root, ignore_errors=True)
    spool = Spool.open(root)
    with Worker(spool, "route") as worker:
        claims = []
        for series, count in CRASH_STUDY.items():
            for n in range(count):
                receive_instance(worker, series, f"{series}.{n}")
            claim = worker.claim(INCOMING, series)
            assert claim is not None
            claims.append(claim)
        transaction = claims[0].transaction()
        folder = transaction.new_item(DISCARD, "s1")
        entries = []
        for claim in claims:
            os.mkdir(folder / claim.name)
            link_instances(claim.path, folder / claim.name)
            names = sorted(p.stem for p in (folder / claim.name).glob("*.dcm"))
            entries.append(
                {"series": claim.name, "SeriesInstanceUID": claim.name, "instances": names}
            )
        keys = {"StudyInstanceUID": "1.9.6", "first_received": None, "last_received": None}
        record = study_record("s1", entries, keys, ["r"], reason="study incomplete: missing x")
        write_json(folder / JOB_FILE, record)
        transaction.commit()
        claims[1].transaction().commit()  # consumed too


def _whole_tree(folder: Path) -> list[str]:
    """The instance names of an item, its series sub-folders included, each checked whole."""
    names = sorted(assert_whole_instances(folder))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        names += sorted(assert_whole_instances(sub))
    return names


@pytest.mark.parametrize("to_target", [False, True], ids=["routing", "target"])
def test_resending_a_study_survives_kill_at_every_step(tmp_path: Path, to_target: bool) -> None:
    root = tmp_path / "spool"
    target = Target(name="archive", type="folder", path=tmp_path / "archive") if to_target else None
    routed = {f"{INCOMING}/{series}" for series in CRASH_STUDY}

    def scenario() -> None:
        spool = Spool(root)
        resend_items(spool, select(spool, DISCARD, Filters())[0], target=target)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        seen = {
            f"{state}/{item.name}": _whole_tree(item.path)
            for state in STATES
            for item in spool.items(state)
        }
        everything = sorted(name for names in seen.values() for name in names)
        assert everything == CRASH_STUDY_INSTANCES, (step, seen)  # exactly one copy of each
        if set(seen) == routed:
            for series in CRASH_STUDY:
                assert all(n.startswith(series) for n in seen[f"{INCOMING}/{series}"]), step
        elif set(seen) != {"discard/s1"}:
            assert to_target, (step, seen)
            (where,) = seen
            assert where.startswith("outgoing/"), (step, where)
            job = json.loads((spool.root / where / JOB_FILE).read_text())
            assert [s["series"] for s in job["series"]] == list(CRASH_STUDY), step
            assert job["resent_from"] == "discard/s1" and job["study"] is True, step
        assert list(spool.claims.iterdir()) == [] and list(spool.tmp.iterdir()) == []

    assert run_until_done(scenario, check, setup=lambda: _crash_study_setup(root)) > 20
