"""`mercli log`: trails from a spool filled by the real commands, the index beside the log
(rebuilt, incremental, concurrent), keyed accession/patient lookups, --follow, escaping."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mercli.audit.index import INDEX_FILE, open_index
from mercli.cli import cli
from mercli.rules.config import load_rules
from mercli.spool import Spool
from tests.dicomfiles import make_instance
from tests.netkit import receiver, storescu

STUDY = "1.2.826.0.1.3680043.10.5555.1"
OTHER_STUDY = "1.2.826.0.1.3680043.10.5555.2"
SERIES = {f"{STUDY}.1": "CT", f"{STUDY}.2": "MR"}
OTHER_SERIES = f"{OTHER_STUDY}.1"
ACCESSION = "ACC-77231"
PATIENT = "PID-4242-99"

RULES = """
[route]
settle = "0s"

[targets.archive]
type = "folder"
path = "{archive}"

[[rules]]
name = "ct-archive"
when = 'Modality == "CT"'
targets = ["archive"]

[[rules]]
name = "mr-archive"
when = 'Modality == "MR"'
targets = ["archive"]
"""


def mercli(spool: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mercli", *args[:1], "--spool", str(spool), *args[1:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def log_lines(spool: Path, *args: str) -> list[str]:
    return mercli(spool, "log", *args).stdout.splitlines()


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spool the real commands filled: storescu -> `mercli receive` (two series of one
    study, one of another), `mercli route --once`, `mercli dispatch --once` to a folder."""
    base = tmp_path_factory.mktemp("log")
    files = base / "files"
    files.mkdir()
    ids = {"PatientID": PATIENT, "AccessionNumber": ACCESSION}
    for series, modality in SERIES.items():
        for n in range(3 if modality == "CT" else 2):
            make_instance(files, series=series, study=STUDY, modality=modality, number=n, **ids)
    make_instance(files, series=OTHER_SERIES, study=OTHER_STUDY, PatientID="OTHER")
    spool = base / "spool"
    with receiver(spool) as running:
        sent = storescu(running.port, sorted(files.iterdir()))
        assert sent.returncode == 0, sent.stderr
    rules = base / "rules.toml"
    rules.write_text(RULES.format(archive=base / "archive"))
    mercli(spool, "route", "--rules", str(rules), "--once", "--all")
    mercli(spool, "dispatch", "--once")
    assert len(list((base / "archive").rglob("*.dcm"))) == 6
    return spool


@pytest.fixture
def copy(filled: Path, tmp_path: Path) -> Path:
    """A private copy of the filled spool (without an index yet, unless a test made one)."""
    shutil.copytree(filled, tmp_path / "spool", symlinks=True)
    return tmp_path / "spool"


def events_of(spool: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for f in sorted((spool / "events").glob("*.ndjson"))
        for line in f.read_text().splitlines()
    ]


def test_a_study_shows_received_routed_and_delivered_for_each_series(copy: Path) -> None:
    lines = log_lines(copy, "--study", STUDY)
    assert lines[0].startswith("TIME (UTC)")
    text = "\n".join(lines)
    assert OTHER_SERIES not in text
    routed = {e["series"]: e for e in events_of(copy) if e["event"] == "routed"}
    for series, modality in SERIES.items():
        count = 3 if modality == "CT" else 2
        mine = [line for line in lines if series in line or routed[series]["item"] in line]
        kinds = [line.split()[2] for line in mine]
        assert kinds == ["received", "routed", "dispatched"], mine
        assert f"{count} instance(s) from STORESCU" in mine[0]
        assert f"rules {modality.lower()}-archive -> target archive" in mine[1]
        assert "delivered to archive" in mine[2]
    assert (copy / "events" / INDEX_FILE).stat().st_mode & 0o777 == 0o640
    assert (copy / "keys" / "audit.key").stat().st_mode & 0o777 == 0o640


def test_the_index_is_rebuilt_when_deleted_and_answers_alike(copy: Path) -> None:
    before = log_lines(copy, "--study", STUDY)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{copy / 'events' / INDEX_FILE}{suffix}").unlink(missing_ok=True)
    assert log_lines(copy, "--study", STUDY) == before
    assert (copy / "events" / INDEX_FILE).is_file()


def test_json_lines_hold_the_same_events(copy: Path) -> None:
    records = [json.loads(line) for line in log_lines(copy, "--study", STUDY, "--json")]
    assert [r["event"] for r in records].count("received") == 5
    ours = [e for e in events_of(copy) if _of_study(e, events_of(copy))]
    assert records == ours
    table = log_lines(copy, "--study", STUDY)
    assert len(table) == 1 + 2 * 3  # header; received (collapsed), routed, dispatched per series


def _of_study(event: dict[str, object], everything: list[dict[str, object]]) -> bool:
    items = {e["item"] for e in everything if e.get("study") == STUDY}
    return event.get("series") in SERIES or event.get("item") in items


def test_accession_and_patient_id_find_the_study_and_appear_nowhere(copy: Path) -> None:
    by_study = log_lines(copy, "--study", STUDY)
    assert log_lines(copy, "--accession", ACCESSION) == by_study
    assert log_lines(copy, "--patient-id", PATIENT) == by_study
    assert log_lines(copy, "--patient-id", "PID-0000") == []
    routed = [e for e in events_of(copy) if e["event"] == "routed"]
    assert all(
        e.get("patient_key") and e.get("accession_key") for e in routed if e["study"] == STUDY
    )
    for path in (copy / "events").iterdir():
        data = path.read_bytes()
        assert ACCESSION.encode() not in data and PATIENT.encode() not in data, path.name
        assert ACCESSION.encode("utf-16-le") not in data


def test_new_events_are_indexed_incrementally(copy: Path) -> None:
    spool = Spool.open(copy)
    index = open_index(spool.events, spool.tmp)
    first = index.cursor
    index.close()
    item = next(e["item"] for e in events_of(copy) if e.get("study") == STUDY)
    spool.log("purged", state="success", item=item, bytes=1234, age=86400.0)
    spool.log("received", series="9.9.9", instance="9.9.9.1", sender="X", replaced=False)
    index = open_index(spool.events, spool.tmp)  # updates: reads only the two new lines
    try:
        assert index.cursor > first
        assert index.cursor.offset - first.offset == sum(
            len(line) + 1 for line in _tail_lines(copy, 2)
        )
        assert index.update() == 0  # nothing new: nothing read again
    finally:
        index.close()
    lines = log_lines(copy, "--study", STUDY)
    assert any("purged" in line and item in line and "1234 bytes" in line for line in lines)


def _tail_lines(spool: Path, count: int) -> list[bytes]:
    day = sorted((spool / "events").glob("*.ndjson"))[-1]
    return day.read_bytes().splitlines()[-count:]


def test_a_corrupt_index_is_rebuilt_with_a_warning(copy: Path) -> None:
    before = log_lines(copy, "--study", STUDY)
    (copy / "events" / INDEX_FILE).write_bytes(b"this is not a database" * 100)
    result = mercli(copy, "log", "--study", STUDY)
    assert result.stdout.splitlines() == before
    assert "unusable" in result.stderr and "rebuilding" in result.stderr
    with sqlite3.connect(copy / "events" / INDEX_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_several_log_processes_at_once_build_one_index(copy: Path) -> None:
    expected = log_lines(copy, "--study", STUDY)
    (copy / "events" / INDEX_FILE).unlink()
    command = [sys.executable, "-m", "mercli", "log", "--spool", str(copy), "--study", STUDY]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120)[0] for process in running]
    assert [p.returncode for p in running] == [0] * 4
    assert all(output.splitlines() == expected for output in outputs)
    assert not list((copy / "tmp").glob("index-*"))


def test_follow_prints_a_new_event_quickly_and_stops_on_sigterm(copy: Path) -> None:
    command = [sys.executable, "-m", "mercli", "log", "--spool", str(copy), "--study", STUDY]
    process = subprocess.Popen([*command, "--follow"], stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in process.stdout or []])
    reader.start()
    try:
        history = [lines.get(timeout=30) for _ in range(7)]  # header + 6 lines of history
        assert "dispatched" in history[-1]
        item = history[-1].split()[3]
        spool = Spool.open(copy)
        appended = time.monotonic()
        spool.log("resent", **{"from": f"success/{item}"}, item=item, to="outgoing/20261130T0-1")
        line = lines.get(timeout=5)
        assert time.monotonic() - appended < 2.0
        assert "resent" in line and "to outgoing/20261130T0-1" in line
        spool.log("received", series=OTHER_SERIES, instance="1.2", sender="X", replaced=False)
        spool.log("dispatched", item="20261130T0-1", target="archive", attempt=1, instances=5)
        assert "20261130T0-1" in lines.get(timeout=5)  # the resent copy is followed too
        late = f"{STUDY}.3"  # a new series of the study: received, then routed
        for n in range(2):
            spool.log("received", series=late, instance=f"{late}.{n}", sender="X", replaced=False)
        spool.log("routed", item="late-1", series=late, rules=["r"], study=STUDY, target="t")
        assert "2 instance(s) from X" in lines.get(timeout=5)  # kept back until routed
        assert "late-1" in lines.get(timeout=5)
        spool.log("purged", state="success", item="late-1", bytes=1, age=1.0)
        assert "purged" in lines.get(timeout=5)  # next: the other study's events were not shown
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        reader.join(timeout=10)


def test_hostile_values_are_escaped_in_the_table(spool: Spool) -> None:
    evil = "\x1b[31mEVIL\x1b]0;pwned\x07\x9b2J"
    spool.log("received", series="1.2.3", instance="1.2.3.4", sender=evil, replaced=False)
    spool.log("routed", item="job-1", series="1.2.3", instances=1, rules=[evil], target=evil)
    result = CliRunner().invoke(cli, ["log", "--spool", str(spool.root), "--series", "1.2.3"])
    assert result.exit_code == 0, result.output
    for control in ("\x1b", "\x07", "\x9b"):
        assert control not in result.output
    assert "\\x1b[31mEVIL" in result.stdout and "\\x9b2J" in result.stdout
    as_json = CliRunner().invoke(cli, ["log", "--spool", str(spool.root), "--json"])
    assert "\x1b" not in as_json.output and "\x9b" not in as_json.output
    assert json.loads(as_json.stdout.splitlines()[0])["sender"] == evil


def test_without_a_filter_every_event_is_shown_and_since_limits_them(copy: Path) -> None:
    everything = log_lines(copy, "--json")
    assert len(everything) == len(events_of(copy))
    assert log_lines(copy, "--json", "--since", "2999-01-01") == []
    assert log_lines(copy, "--json", "--since", "1h") == everything
    bad = mercli(copy, "log", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "neither a duration" in bad.stderr


def test_study_rules_link_held_series_to_their_study_jobs(tmp_path: Path, spool: Spool) -> None:
    from tests import test_studies as studies

    rules = load_rules(studies.rules_file(tmp_path))
    for description, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010)):
        studies.send_series(tmp_path, spool, rules, description, at)
    made, _ = studies.complete_due(spool, rules, 1020)
    held = [e for e in events_of(spool.root) if e["event"] == "held"]
    assert len(held) == 3 and all(e["study"] == studies.STUDY for e in held)
    assert len({e["patient_key"] for e in held}) == 1  # every series of PatientID P001
    jobs = [e for e in events_of(spool.root) if e.get("item") in made]
    assert [e["patient_key"] for e in jobs] == [held[0]["patient_key"]] * 2

    def shown(*query: str) -> list[dict[str, object]]:
        result = CliRunner().invoke(cli, ["log", "--spool", str(spool.root), "--json", *query])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    whole = shown("--patient-id", "P001")
    assert whole == shown("--study", studies.STUDY) and len(whole) == 3 + 1 + 2  # held, ai, jobs
    t1 = studies.series_uid("T1", 1000)
    of_t1 = shown("--series", t1)
    assert {e["event"] for e in of_t1} == {"routed", "held"}
    assert {e.get("series") for e in of_t1} == {t1, None}  # no other series of the study
    assert {e["item"] for e in of_t1 if "series" not in e} == set(made)
