"""`mercli cancel`: waiting jobs, retrying jobs, ordered targets, a job being sent, resend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mercli.cli import cli
from mercli.jobs import CANCEL_FILE, DISPATCH_FILE, JOB_FILE
from mercli.spool import ERROR, OUTGOING, SUCCESS, Spool
from tests import test_dispatch
from tests.netkit import free_port, wait_until
from tests.test_dispatch import dicom_target, dispatch_once, routed, rules_for


def cancel(spool: Spool, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["cancel", "--spool", str(spool.root), *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def resend(spool: Spool, *args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, ["resend", "--spool", str(spool.root), *args])
    return result.exit_code, result.stdout.split()


def series_of(spool: Spool, state: str) -> dict[str, str]:
    """SeriesInstanceUID -> job id of the jobs in `state`."""
    return {
        json.loads((item.path / JOB_FILE).read_text())["SeriesInstanceUID"]: item.name
        for item in spool.items(state)
    }


def error_of(spool: Spool, name: str) -> dict[str, Any]:
    record = json.loads((spool.state_dir(ERROR) / name / "error.json").read_text())
    assert isinstance(record, dict)
    return record


def cancelled_events(spool: Spool) -> list[dict[str, Any]]:
    return [e for e in spool.events.read() if e["event"] == "cancelled"]


def test_a_retrying_job_is_cancelled_and_resend_brings_it_back(
    tmp_path: Path, spool: Spool
) -> None:
    rules = rules_for(tmp_path, dicom_target("down", free_port(), max_attempts=9), '"down"')
    routed(tmp_path, spool, rules, {"1.2.81": 2})
    assert dispatch_once(spool).returncode == 5  # unreachable: retrying
    (job,) = spool.items(OUTGOING)
    assert json.loads((job.path / DISPATCH_FILE).read_text())["attempts"] == 1
    code, out, err = cancel(spool, "--target", "down", "--reason", "wrong PACS")
    assert (code, out) == (0, f"cancelled: outgoing/{job.name}\n"), err
    assert spool.items(OUTGOING) == [] and spool.claimed() == []
    record = error_of(spool, job.name)
    assert record["reason"] == "cancelled: wrong PACS" and record["from"] == OUTGOING
    assert record["uid"] == os.getuid() and record["cancelled_by"] and record["cancelled_at"]
    (event,) = cancelled_events(spool)
    assert (event["item"], event["reason"]) == (job.name, "wrong PACS")
    code, copies = resend(spool, "--from", "error", job.name)
    assert code == 0 and copies[0].startswith("outgoing/")
    (back,) = spool.items(OUTGOING)
    assert json.loads((back.path / JOB_FILE).read_text())["target"]["name"] == "down"
    assert spool.items(ERROR) == [] and not (back.path / CANCEL_FILE).exists()


def test_cancelling_the_blocking_series_lets_the_next_of_the_study_go(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    target = dicom_target("pacs", port, max_attempts=9, ordered=True)
    routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.82": 2, "1.2.83": 2})
    jobs = series_of(spool, OUTGOING)
    assert dispatch_once(spool).returncode == 5
    assert not (spool.state_dir(OUTGOING) / jobs["1.2.83"] / DISPATCH_FILE).exists()  # waited
    code, out, _ = cancel(spool, "--series", "1.2.82")
    assert (code, out) == (0, f"cancelled: outgoing/{jobs['1.2.82']}\n")
    monkeypatch.setattr(test_dispatch, "free_port", lambda: port)
    server = test_dispatch.Scp()  # the target comes back
    try:
        result = dispatch_once(spool)
        assert result.returncode == 0, result.stderr
    finally:
        server.close()
    assert {uid for uid, _, _ in server.received} == {"1.2.83"}
    assert series_of(spool, SUCCESS) == {"1.2.83": jobs["1.2.83"]}
    assert error_of(spool, jobs["1.2.82"])["reason"] == "cancelled: by request"


def test_a_job_being_sent_stops_after_the_current_instance(tmp_path: Path, spool: Spool) -> None:
    server = test_dispatch.Scp(delay=0.3)
    try:
        rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
        routed(tmp_path, spool, rules, {"1.2.84": 10})
        (job,) = spool.items(OUTGOING)
        command = [sys.executable, "-m", "mercli", "dispatch", "--once"]
        dispatcher = subprocess.Popen(
            [*command, "--spool", str(spool.root)], stderr=subprocess.PIPE, text=True
        )
        try:
            wait_until(lambda: len(server.received) >= 1, what="the first instance")
            code, out, err = cancel(spool, job.name, "--reason", "stop it")
            assert code == 0, err
            assert out.startswith(f"cancel requested: {job.name} (being sent by dispatch")
            assert out.rstrip().endswith("stops after the current instance)")
            _, stderr = dispatcher.communicate(timeout=60)
        finally:
            if dispatcher.poll() is None:
                dispatcher.kill()
        assert dispatcher.returncode == 0, stderr
    finally:
        server.close()
    assert spool.claimed() == [] and spool.items(OUTGOING) == []
    assert list(spool.tmp.iterdir()) == []  # no scratch, no partial files
    record = error_of(spool, job.name)
    assert record["reason"] == "cancelled: stop it" and record["target"] == "pacs"
    progress = json.loads((spool.state_dir(ERROR) / job.name / DISPATCH_FILE).read_text())
    assert 1 <= len(server.received) < 10
    assert len(progress["delivered"]) == len(server.received)  # none torn, none lost
    (event,) = cancelled_events(spool)
    assert event["item"] == job.name and event["target"] == "pacs"
    assert resend(spool, "--from", "error", job.name)[0] == 0
    (back,) = spool.items(OUTGOING)
    assert not (back.path / CANCEL_FILE).exists()
    carried = json.loads((back.path / DISPATCH_FILE).read_text())["delivered"]
    assert carried == progress["delivered"]  # resent: only the rest goes


def test_dry_run_changes_nothing_and_unknown_ids_fail(tmp_path: Path, spool: Spool) -> None:
    dest = tmp_path / "dest"
    rules = rules_for(tmp_path, f'[targets.ai]\ntype = "folder"\npath = "{dest}"\n', '"ai"')
    routed(tmp_path, spool, rules, {"1.2.85": 1, "1.2.86": 1})
    jobs = series_of(spool, OUTGOING)
    code, out, _ = cancel(spool, "--target", "ai", "--dry-run")
    assert code == 0 and sorted(out.split()) == sorted(f"outgoing/{n}" for n in jobs.values())
    assert series_of(spool, OUTGOING) == jobs and spool.items(ERROR) == []
    code, out, _ = cancel(spool, "--target", "elsewhere")
    assert (code, out) == (0, "") and series_of(spool, OUTGOING) == jobs
    code, out, err = cancel(spool, "-", stdin=f"outgoing/{jobs['1.2.85']}\nnosuchjob\n")
    assert code == 1 and "no job nosuchjob" in err
    assert out == f"cancelled: outgoing/{jobs['1.2.85']}\n"
    assert series_of(spool, OUTGOING) == {"1.2.86": jobs["1.2.86"]}
    assert cancel(spool)[0] == 2  # nothing selected: usage
    assert cancel(spool, "success/x")[0] == 2
