"""Resource faults: a spool filling up while routing, a folder target filling up while
dispatching, a read-only spool, and a spool whose tmp/ is on another filesystem.

Full disks are real: a small tmpfs in a private mount namespace (`unshare -rm`), where the
scenario runs (tests/reliability/fullfs.py) and reports what it saw as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mercli.spool import Spool, Worker
from tests.dicomfiles import make_instance
from tests.kit import ROOT
from tests.reliability.kit import ENV, items, mercli, write_rules
from tests.test_route import receive_file

SERIES = [f"1.2.826.0.1.3680043.9.30.{n}" for n in range(8)]


def in_namespace(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
        check=False,
    )


def scenario(name: str, mount: Path, size: str, **args: Any) -> dict[str, Any]:
    mount.mkdir(exist_ok=True)
    payload = json.dumps({"mount": mount, **args}, default=str)
    command = (
        f"mount -t tmpfs -o size={size} tmpfs {mount} && "
        f"exec {sys.executable} -m tests.reliability.fullfs {name} '{payload}'"
    )
    result = in_namespace(command)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_route_on_a_filling_disk_keeps_series_whole_and_routes_them_later(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for uid in SERIES:
        for n in range(3):
            make_instance(source, series=uid, number=n, sop=f"{uid}.{n}")
    rules = write_rules(
        tmp_path / "rules.toml",
        {"a": {"type": "folder", "path": "/nowhere/a"}, "b": {"type": "folder", "path": "/b"}},
    )
    report = scenario("route", tmp_path / "mnt", "2m", source=source, keep_pages=7, rules=rules)
    before = report["before"]["incoming"]
    assert sorted(before) == SERIES

    full, after = report["full"], report["after_full"]
    assert full["code"] == 1, full  # some series routed, the rest failed
    assert "No space left on device" in full["stderr"], full["stderr"]
    left = set(after["incoming"])
    assert left, "the disk never filled while routing; make keep_pages smaller"
    for series in left:  # not routed: still there, byte for byte
        assert after["incoming"][series] == before[series], f"{series} changed"
    routed = {job["job"]["series"] for job in after["outgoing"].values()}
    assert routed, "the disk was full before routing began; make keep_pages larger"
    assert routed.isdisjoint(left) and routed | left == set(SERIES)
    assert_whole_jobs(after["outgoing"], before)
    assert after["tmp"] == [] and after["claims"] == [] and after["error"] == {}

    freed, final = report["freed"], report["after_freed"]
    assert freed["code"] == 0, freed["stderr"]
    assert final["incoming"] == {} and final["error"] == {}
    assert_whole_jobs(final["outgoing"], before)
    per_series = sorted(job["job"]["series"] for job in final["outgoing"].values())
    assert per_series == sorted(SERIES * 2), "each series routed exactly once per target"


def assert_whole_jobs(jobs: dict[str, Any], before: dict[str, dict[str, str]]) -> None:
    """Every job in outgoing/ is complete: job.json readable, every instance and sidecar."""
    for name, job in jobs.items():
        record = job["job"]
        assert isinstance(record, dict), f"job {name} has no readable job.json"
        expected = [*before[record["series"]], "job.json"]
        assert job["files"] == sorted(expected), f"job {name} is incomplete"
        assert record["instances"] == 3


def test_dispatch_to_a_full_folder_target_retries_then_delivers_or_gives_up(
    tmp_path: Path,
) -> None:
    spool = Spool.open(tmp_path / "spool")
    mount = tmp_path / "mnt"
    source = tmp_path / "src"
    source.mkdir()
    files = [make_instance(source, series=SERIES[0], number=n, rows=128) for n in range(10)]
    dest = {"type": "folder", "path": str(mount / "dest"), "retry_delay": "0s"}
    rules = write_rules(
        tmp_path / "rules.toml",
        {"keep": {**dest, "max_attempts": 5}, "once": dest | {"max_attempts": 1}},
    )
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    assert (
        mercli("route", "--once", "--all", "--rules", rules, "--spool", spool.root).returncode == 0
    )
    assert len(items(spool.root, "outgoing")) == 2

    report = scenario("dispatch", mount, "256k", spool=spool.root)
    full = report["full"]
    assert full["code"] == 1, full
    assert "no space left" in full["stderr"]
    assert report["dest_full"] == [], "something half-written at the target"
    after = report["after_full"]
    (kept,) = after["outgoing"].values()
    assert kept["job"]["target"]["name"] == "keep"
    (failed,) = after["error"].values()
    assert failed["job"]["target"]["name"] == "once"
    assert failed["error"]["reason"].startswith("cannot deliver to folder target: no space left")
    assert str(mount / "dest") in failed["error"]["reason"]
    assert len([f for f in failed["files"] if f.endswith(".dcm")]) == 10  # resendable, whole

    freed = report["freed"]
    assert freed["code"] == 0, freed["stderr"]
    (job_id,) = {entry.split("/")[0] for entry in report["dest_freed"]}
    delivered = [e for e in report["dest_freed"] if e.endswith(".dcm")]
    assert len(delivered) == 10 and not job_id.startswith(".")
    assert report["after_freed"]["outgoing"] == {}


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, Path]:
    """A spool with one series waiting in incoming/ and one job in outgoing/."""
    spool = Spool.open(tmp_path / "spool")
    source = tmp_path / "src"
    source.mkdir()
    rules = write_rules(tmp_path / "rules.toml", {"a": {"type": "folder", "path": "a"}})
    with Worker(spool, "receive") as worker:
        receive_file(worker, make_instance(source, series=SERIES[0]))
        assert (
            mercli("route", "--once", "--all", "--rules", rules, "--spool", spool.root).returncode
            == 0
        )
        receive_file(worker, make_instance(source, series=SERIES[1]))
    return spool.root, rules


COMMANDS = {
    "route": ["route", "--once", "--all", "--rules", "{rules}"],
    "route-service": ["route", "--rules", "{rules}"],
    "dispatch": ["dispatch", "--once"],
    "dispatch-service": ["dispatch"],
    "receive": ["receive", "--processes", "1", "--host", "127.0.0.1", "--port", "0"],
}


def command_line(name: str, spool: Path, rules: Path) -> str:
    args = [a.format(rules=rules) for a in COMMANDS[name]]
    return " ".join([sys.executable, "-m", "mercli", *args, "--spool", str(spool)])


def tree(spool: Path) -> list[str]:
    return sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if "events" not in p.parts)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_read_only_spool_exits_4_with_a_clear_message(
    populated: tuple[Path, Path], command: str
) -> None:
    spool, rules = populated
    before = tree(spool)
    result = in_namespace(
        f"mount --bind {spool} {spool} && mount -o remount,bind,ro {spool} && "
        f"exec {command_line(command, spool, rules)}",
        timeout=60,
    )
    assert result.returncode == 4, (result.returncode, result.stderr)
    assert result.stderr.startswith("Error: ") and "Read-only file system" in result.stderr
    assert str(spool) in result.stderr and "Traceback" not in result.stderr
    assert tree(spool) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_tmp_on_another_filesystem_is_refused(populated: tuple[Path, Path], command: str) -> None:
    spool, rules = populated
    before = tree(spool)
    result = in_namespace(
        f"mount -t tmpfs tmpfs {spool}/tmp && exec {command_line(command, spool, rules)}",
        timeout=60,
    )
    assert result.returncode == 4, (result.returncode, result.stderr)
    assert "span several filesystems" in result.stderr and str(spool) in result.stderr
    assert tree(spool) == before


def test_status_still_reports_a_read_only_spool(populated: tuple[Path, Path]) -> None:
    """Monitoring keeps working when the spool's filesystem has gone read-only."""
    spool, _ = populated
    result = in_namespace(
        f"mount --bind {spool} {spool} && mount -o remount,bind,ro {spool} && "
        f"exec {sys.executable} -m mercli status --json --spool {spool}",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["states"]["incoming"]["items"] >= 1
