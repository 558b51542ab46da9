"""Study-level rules (SPEC §4.1): config, holding, completion, forcing, follow-ups, crashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom import dcmread

from mercli.cli import cli
from mercli.errors import ConfigError
from mercli.jobs import Progress
from mercli.route.complete import Completer, due_studies
from mercli.route.router import Router, RouteSummary
from mercli.route.studies import HeldCache, scan_studies
from mercli.rules.config import RuleSet, load_rules
from mercli.spool import (
    DISCARD,
    INCOMING,
    JOB_FILE,
    OUTGOING,
    STUDIES,
    SUCCESS,
    Spool,
    Worker,
    recover,
)
from tests import test_e2e as e2e
from tests.crashkit import run_until_done
from tests.dicomfiles import dataset_bytes
from tests.kit import PACS_AND_ARCHIVE
from tests.netkit import DCMTK_ENV, free_port, port_open, storescu, wait_until
from tests.test_dispatch import Scp, dispatch_once
from tests.test_route import receive_file, series_files

STUDY = "1.2.826.0.1.3680043.99.1"
RULES = (
    """
[route]
study_settle = "10s"
study_timeout = "15m"

"""
    + PACS_AND_ARCHIVE
    + """
[targets.ai]
type = "folder"
path = "ai"

[[rules]]
name = "brain"
trigger = "study"
when = 'Modality == "MR"'
require = ['"T1" in SeriesDescription', '"FLAIR" in SeriesDescription']
on_timeout = "{on_timeout}"
targets = ["pacs", "archive"]

[[rules]]
name = "t1-to-ai"
when = '"T1" in SeriesDescription'
targets = ["ai"]
"""
)
SERIES = {"T1": 3, "DWI": 2, "FLAIR": 2}  # description -> instances, in arrival order


def rules_file(folder: Path, on_timeout: str = "proceed") -> Path:
    path = folder / "rules.toml"
    path.write_text(RULES.format(on_timeout=on_timeout))
    return path


def series_uid(description: str, follow_up: int = 0) -> str:
    return f"{STUDY}.{follow_up + 1}{len(description)}{ord(description[0])}"


def send_series(
    tmp: Path,
    spool: Spool,
    rules: RuleSet,
    description: str,
    at: float,
    received: str | None = None,
) -> None:
    """Receive one series of the study and route it, its sender having ended at `at` (its
    instances received at `received`, an ISO time, if given)."""
    uid = series_uid(description, int(at))
    files = series_files(
        tmp / "files" / uid,
        uid,
        SERIES.get(description, 1),
        study=STUDY,
        modality="MR",
        SeriesDescription=description,
    )
    meta = {} if received is None else {"ReceivedAt": received}
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path, **meta)
    os.utime(spool.state_dir(INCOMING) / uid, (at, at))
    summary = RouteSummary()
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, rules)
        for state in router.due(float("inf"))[0]:
            router.route(state, summary)


def complete_due(spool: Spool, rules: RuleSet, now: float) -> tuple[list[str], float | None]:
    """One completion pass at `now`: the ids it made, and when the next study is due."""
    cache = HeldCache()
    made: list[str] = []
    due, next_at = due_studies(scan_studies(spool, cache), rules, now)
    with Worker(spool, "route") as worker:
        for study in due:
            done = Completer(spool, worker, rules, cache).complete(study.name, now)
            made += done.jobs + done.discarded
    return made, next_at


def records(spool: Spool, state: str = OUTGOING) -> list[dict[str, Any]]:
    return [json.loads((item.path / JOB_FILE).read_text()) for item in spool.items(state)]


def study_jobs(spool: Spool, state: str = OUTGOING) -> list[dict[str, Any]]:
    return [record for record in records(spool, state) if record.get("study")]


# -- config -------------------------------------------------------------------------------------


def test_study_rule_config_and_defaults(tmp_path: Path) -> None:
    rules = load_rules(rules_file(tmp_path))
    brain = rules.rules[0]
    assert brain.study and brain.on_timeout == "proceed"
    assert [need.text for need in brain.require] == [
        '"T1" in SeriesDescription',
        '"FLAIR" in SeriesDescription',
    ]
    assert not rules.rules[1].study
    assert (rules.settings.study_settle, rules.settings.study_timeout) == (10.0, 900.0)
    assert "SeriesDescription" in rules.keywords
    alias = tmp_path / "alias.toml"
    alias.write_text(
        PACS_AND_ARCHIVE + '[[rules]]\nname = "s"\naction_trigger = "study"\ntargets = ["pacs"]\n'
    )
    loaded = load_rules(alias)
    assert loaded.rules[0].study and loaded.rules[0].require == ()
    assert loaded.settings.study_settle == 10.0


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ('trigger = "exam"', 7, 'trigger must be "series" or "study", not "exam"'),
        ('action_trigger = "patient"', 7, 'action_trigger must be "series" or "study"'),
        ('require = ["T1"]', 7, '"require" needs trigger = "study"'),
        ('on_timeout = "discard"', 7, '"on_timeout" needs trigger = "study"'),
        ('trigger = "study"\non_timeout = "drop"', 8, 'on_timeout must be "proceed" or "discard"'),
        ('trigger = "study"\nrequire = ["Nonsense == 1"]', 8, "bad require expression"),
        ('trigger = "study"\nrequire = "T1"', 8, 'unknown keyword "T1"'),
        ('trigger = "study"\naction_trigger = "study"', 8, "not both"),
    ],
)
def test_study_rule_errors_name_file_line_and_rule(
    tmp_path: Path, lines: str, line: int, message: str
) -> None:
    path = tmp_path / "rules.toml"
    header = '[targets.pacs]\ntype = "folder"\npath = "p"\n\n[[rules]]\nname = "r"\n'
    path.write_text(
        header.replace('name = "r"\n', f'name = "r"\n{lines}\n') + 'targets = ["pacs"]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_rules(path)
    text = str(caught.value)
    assert text.startswith(f'{path}:{line}: rule "r": '), text
    assert message in text


def test_route_settings_study_settle(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[route]\nstudy_settle = "3s"\nstudy_timeout = "2m"\n\n'
        + PACS_AND_ARCHIVE
        + '[[rules]]\nname = "r"\ntargets = ["pacs"]\n'
    )
    settings = load_rules(path).settings
    assert (settings.study_settle, settings.study_timeout) == (3.0, 120.0)
    path.write_text('[route]\nstudy_settle = "soon"\n' + PACS_AND_ARCHIVE)
    with pytest.raises(ConfigError, match=r"rules.toml:2: .*study_settle"):
        load_rules(path)


# -- holding and completion ---------------------------------------------------------------------


def test_three_series_make_one_study_job_per_target(tmp_path: Path, spool: Spool) -> None:
    rules = load_rules(rules_file(tmp_path))
    send_series(tmp_path, spool, rules, "T1", 1000)
    send_series(tmp_path, spool, rules, "DWI", 1005)
    assert complete_due(spool, rules, 1100) == ([], 1005 + 900)  # FLAIR still required
    send_series(tmp_path, spool, rules, "FLAIR", 1010)
    [group] = spool.items(STUDIES)
    assert group.name == STUDY and len(list(group.path.iterdir())) == 3
    assert complete_due(spool, rules, 1019.9) == ([], 1020)  # study_settle after the last
    made, _ = complete_due(spool, rules, 1020)
    assert len(made) == 2 and spool.items(STUDIES) == []
    jobs = {job["target"]["name"]: job for job in study_jobs(spool)}
    assert set(jobs) == {"pacs", "archive"}
    for job in jobs.values():
        assert job["StudyInstanceUID"] == STUDY and job["instances"] == 7
        assert job["rules"] == ["brain"] and job["priority"] == "normal"
        assert [s["series"] for s in job["series"]] == [
            series_uid(d, at) for d, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010))
        ]
        folder = spool.state_dir(OUTGOING) / job["id"]
        for entry in job["series"]:
            names = sorted(p.stem for p in (folder / entry["series"]).glob("*.dcm"))
            assert names == entry["instances"]
            assert len(list((folder / entry["series"]).glob("*.tags"))) == len(names)
    # the T1 series also matched a series rule: its ai job shares the inodes
    [ai] = [r for r in records(spool) if not r.get("study")]
    assert ai["target"]["name"] == "ai" and ai["instances"] == 3
    pacs = spool.state_dir(OUTGOING) / jobs["pacs"]["id"] / ai["series"]
    for path in (spool.state_dir(OUTGOING) / ai["id"]).glob("*.dcm"):
        assert os.stat(path).st_ino == os.stat(pacs / path.name).st_ino
    assert recover(spool).owners == []


@pytest.mark.parametrize("on_timeout", ["proceed", "discard"])
def test_missing_required_series_at_timeout(tmp_path: Path, spool: Spool, on_timeout: str) -> None:
    rules = load_rules(rules_file(tmp_path, on_timeout))
    send_series(tmp_path, spool, rules, "T1", 1000)
    send_series(tmp_path, spool, rules, "DWI", 1005)
    assert complete_due(spool, rules, 1904.9)[0] == []
    made, next_at = complete_due(spool, rules, 1905)
    assert next_at is None and spool.items(STUDIES) == []
    if on_timeout == "proceed":
        assert len(made) == 2 and spool.items(DISCARD) == []
        assert {job["instances"] for job in study_jobs(spool)} == {5}
    else:
        [discarded] = study_jobs(spool, DISCARD)
        assert made == [discarded["id"]] and study_jobs(spool) == []
        assert discarded["reason"] == 'study incomplete: missing "FLAIR" in SeriesDescription'
        assert discarded["instances"] == 5


def test_complete_study_forces_completion(tmp_path: Path, spool: Spool) -> None:
    path = rules_file(tmp_path)
    rules = load_rules(path)
    send_series(tmp_path, spool, rules, "T1", 1000)
    runner = CliRunner()
    args = ["route", "--spool", str(spool.root), "--rules", str(path), "--complete-study"]
    result = runner.invoke(cli, [*args, "1.2.3.4"])
    assert result.exit_code == 1, result.output
    assert "no held study 1.2.3.4" in result.stderr and result.stdout == ""
    result = runner.invoke(cli, [*args, STUDY])
    assert result.exit_code == 0, result.output
    ids = result.stdout.split()
    assert sorted(ids) == sorted(job["id"] for job in study_jobs(spool)) and len(ids) == 2
    assert spool.items(STUDIES) == []


def test_late_series_starts_a_follow_up_study(tmp_path: Path, spool: Spool) -> None:
    rules = load_rules(rules_file(tmp_path))
    for description, at in (("T1", 1000), ("FLAIR", 1001)):
        send_series(tmp_path, spool, rules, description, at)
    assert len(complete_due(spool, rules, 1011)[0]) == 2
    send_series(tmp_path, spool, rules, "DWI", 1050)
    assert complete_due(spool, rules, 1061)[0] == []  # a new collection, requirements unmet
    assert len(complete_due(spool, rules, 1950)[0]) == 2
    jobs = study_jobs(spool)
    assert sorted(job["instances"] for job in jobs) == [2, 2, 5, 5]


def test_rules_complete_separately(tmp_path: Path, spool: Spool) -> None:
    """A rule without `require` waits for study_timeout while another completes early."""
    text = RULES.format(on_timeout="proceed") + (
        '\n[[rules]]\nname = "all-mr"\ntrigger = "study"\nwhen = \'Modality == "MR"\'\n'
        'targets = ["ai"]\n'
    )
    (tmp_path / "rules.toml").write_text(text)
    rules = load_rules(tmp_path / "rules.toml")
    send_series(tmp_path, spool, rules, "T1", 1000)
    send_series(tmp_path, spool, rules, "FLAIR", 1001)
    made, next_at = complete_due(spool, rules, 1011)
    assert len(made) == 2 and next_at == 1901
    assert len(complete_due(spool, rules, 1901)[0]) == 1
    ai = [job for job in study_jobs(spool) if job["target"]["name"] == "ai"]
    assert [job["instances"] for job in ai] == [5] and ai[0]["rules"] == ["all-mr"]


# -- crashes ------------------------------------------------------------------------------------


def test_study_completion_survives_kill_at_every_step(tmp_path: Path) -> None:
    root, template = tmp_path / "spool", tmp_path / "template"
    rules = load_rules(rules_file(tmp_path))
    spool = Spool.open(template)
    for description, at in (("T1", 1000), ("DWI", 1001), ("FLAIR", 1002)):
        send_series(tmp_path, spool, rules, description, at)
    expected = {p.stem for p in (template / STUDIES).rglob("*.dcm")}
    assert len(expected) == 7

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root)

    def scenario() -> None:
        complete_due(Spool(root), rules, 2000)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        held = {p.stem for p in (root / STUDIES).rglob("*.dcm")}
        jobs = study_jobs(spool)
        if held:  # rolled back: all still held, no job
            assert held == expected and jobs == [], step
            complete_due(spool, rules, 2000)
            jobs = study_jobs(spool)
        assert sorted(job["target"]["name"] for job in jobs) == ["archive", "pacs"], step
        for job in jobs:
            folder = spool.state_dir(OUTGOING) / job["id"]
            assert {p.stem for p in folder.rglob("*.dcm")} == expected, step
        assert list((root / STUDIES).iterdir()) == [] and list(spool.claims.iterdir()) == []

    assert run_until_done(scenario, check, setup) > 20


# -- dispatch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ended", [(1000, 1000, 1000), (1000.0, 1000.1, 1000.2)])
def test_series_are_in_receipt_order_whenever_their_senders_ended(
    tmp_path: Path, spool: Spool, ended: tuple[float, float, float]
) -> None:
    """Series held last-received first, their senders' ends equal (hints written on one tick
    of the file clock) or reversed (one association's hints written in series-UID order):
    the study job lists them in the order their first instance was received."""
    rules = load_rules(rules_file(tmp_path))
    received = {"T1": "2026-12-01T09:00:00.100+00:00", "DWI": "2026-12-01T09:00:00.200+00:00"}
    received["FLAIR"] = "2026-12-01T09:00:00.300+00:00"
    for description, at in zip(("FLAIR", "DWI", "T1"), ended, strict=True):
        send_series(tmp_path, spool, rules, description, at, received[description])
    assert len(complete_due(spool, rules, 1020)[0]) == 2
    for job in study_jobs(spool):
        assert [s["SeriesInstanceUID"] for s in job["series"]] == [
            series_uid(d, 1000) for d in ("T1", "DWI", "FLAIR")
        ]


def study_to(tmp_path: Path, spool: Spool, port: int) -> list[str]:
    """Three series held and completed into study jobs for pacs (at `port`) and archive."""
    path = rules_file(tmp_path)
    path.write_text(path.read_text().replace("port = 104", f'port = {port}\nretry_delay = "0s"'))
    rules = load_rules(path)
    for description, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010)):
        send_series(tmp_path, spool, rules, description, at)
    return complete_due(spool, rules, 1020)[0]


def test_study_job_goes_over_one_association_in_order(tmp_path: Path, spool: Spool) -> None:
    refuse = {("FLAIR", 1)}
    server = Scp(
        status=lambda ds: 0xA700 if (ds.SeriesDescription, ds.InstanceNumber) in refuse else 0
    )
    try:
        assert len(study_to(tmp_path, spool, server.port)) == 2
        first = dispatch_once(spool)
        assert first.returncode == 1 and "1 refused" in first.stderr
        [pacs] = [j for j in study_jobs(spool) if j["target"]["name"] == "pacs"]
        folder = spool.state_dir(OUTGOING) / pacs["id"]
        delivered = Progress.load(folder).delivered
        assert len(delivered) == 6 and all("/" in key for key in delivered)
        refuse.clear()
        assert dispatch_once(spool).returncode == 0
    finally:
        server.close()
    order = [(uid, number) for uid, number, _ in server.received]
    expected = [
        (series_uid(d, at), n)
        for d, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010))
        for n in range(SERIES[d])
        if (d, n) != ("FLAIR", 1)
    ]
    assert order == [*expected, (series_uid("FLAIR", 1010), 1)]
    [archive] = [p for p in (tmp_path / "archive").iterdir()]
    assert sorted(p.name for p in archive.iterdir()) == sorted(
        series_uid(d, at) for d, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010))
    )
    counts = {p.name: len(list(p.glob("*.dcm"))) for p in archive.iterdir()}
    assert counts == {
        series_uid(d, at): SERIES[d] for d, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010))
    }
    assert len(list(archive.rglob("*.dcm"))) == 7 and len(spool.items(SUCCESS)) == 3


ORDERED_RULES = """
[route]
study_settle = "10s"

[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = {port}
called_aet = "PACS"
ordered = true
retry_delay = "0s"

[[rules]]
name = "brain"
trigger = "study"
when = '"LOC" not in SeriesDescription'
require = ['"T1" in SeriesDescription', '"FLAIR" in SeriesDescription']
targets = ["pacs"]

[[rules]]
name = "now"
when = '"DWI" in SeriesDescription or "LOC" in SeriesDescription'
targets = ["pacs"]
"""


def test_ordered_target_sends_study_and_series_jobs_by_first_received(
    tmp_path: Path, spool: Spool
) -> None:
    """On an ordered target a study job and the series jobs of its study leave in the order
    their first instance was received, whichever job was made first: the DWI series job,
    made before the study completed, waits for the study job (received earlier); the LOC
    series job, made last but received first, goes before both."""
    server = Scp()
    try:
        path = tmp_path / "rules.toml"
        path.write_text(ORDERED_RULES.format(port=server.port))
        rules = load_rules(path)
        sent = (("T1", 1000, 1), ("FLAIR", 1001, 2), ("DWI", 1002, 3))
        for description, at, second in sent:
            received = f"2026-11-28T00:00:{second:02d}+00:00"
            send_series(tmp_path, spool, rules, description, at, received)
        [dwi] = [r["id"] for r in records(spool) if not r.get("study")]  # before the study job
        [study] = complete_due(spool, rules, 1012)[0]
        send_series(tmp_path, spool, rules, "LOC", 1003, "2026-11-28T00:00:00+00:00")
        [loc] = [r["id"] for r in records(spool) if r["id"] not in (dwi, study)]
        assert dwi < study < loc  # made in this order: the names alone would send DWI first
        result = dispatch_once(spool, "--workers", "2")
        assert result.returncode == 0, result.stderr
    finally:
        server.close()
    uid = {description: series_uid(description, at) for description, at, _ in sent}
    uid["LOC"] = series_uid("LOC", 1003)
    expected = ["LOC"] + [d for d, _, _ in sent for _ in range(SERIES[d])] + ["DWI"] * 2
    assert [series for series, _, _ in server.received] == [uid[d] for d in expected]
    assert [e["item"] for e in spool.events.read() if e["event"] == "dispatched"] == [
        loc,
        study,
        dwi,
    ]


def test_study_job_reaches_storescp_byte_for_byte(tmp_path: Path, spool: Spool) -> None:
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    storescp = subprocess.Popen(
        ["storescp", "+B", "+xa", "-pm", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port))
        study_to(tmp_path, spool, port)
        result = dispatch_once(spool)
    finally:
        storescp.terminate()
        storescp.wait()
    assert result.returncode == 0, result.stderr
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    sources = list((tmp_path / "files").rglob("*.dcm"))
    assert len(received) == len(sources) == 7
    for path in sources:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(path)


E2E_RULES = """
[route]
settle = "0.3s"
study_settle = "1s"

[targets.storescp]
type = "dicom"
host = "127.0.0.1"
port = {port}
called_aet = "STORESCP"
retry_delay = "1s"

[[rules]]
name = "brain"
trigger = "study"
when = 'Modality == "MR"'
require = ['"T1" in SeriesDescription', '"FLAIR" in SeriesDescription']
targets = ["storescp"]
"""


def test_three_associations_make_one_study_job_end_to_end(tmp_path: Path) -> None:
    """storescu sends three series in three associations to `mercli run`; storescp gets one
    study job, byte for byte, no sooner than study_settle after the last association."""
    files = [
        path
        for description, count in SERIES.items()
        for path in series_files(
            tmp_path / "src" / description,
            series_uid(description),
            count,
            study=STUDY,
            modality="MR",
            SeriesDescription=description,
        )
    ]
    spool = tmp_path / "spool"
    with e2e.storescp(tmp_path / "storescp") as storescp_port:
        rules = tmp_path / "rules.toml"
        rules.write_text(E2E_RULES.format(port=storescp_port))
        with e2e.mercli_run(spool, rules) as port:
            for description in SERIES:
                sent = sorted((tmp_path / "src" / description).glob("*.dcm"))
                assert storescu(port, sent).returncode == 0
            last_sent = time.time()
            wait_until(lambda: len(list((tmp_path / "storescp").iterdir())) >= 7, timeout=60)
            wait_until(lambda: not e2e._pending(spool), timeout=60, what="outgoing to drain")
    received = e2e.by_uid(tmp_path / "storescp")
    assert len(received) == 7
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(path)
    [done] = list((spool / "success").iterdir())
    job = json.loads((done / JOB_FILE).read_text())
    assert job["study"] and [s["series"] for s in job["series"]] == [series_uid(d) for d in SERIES]
    created = datetime.fromisoformat(job["created"]).timestamp()
    assert created >= last_sent + 1.0 - 0.05  # study_settle after the last association ended
    assert list((spool / "studies").iterdir()) == []
