"""`mercli purge`: retention boundaries, dry runs, what it never touches, disk pressure, crashes."""

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
from mercli.errors import UsageError
from mercli.jobs import study_record
from mercli.purge import KeepFree, delete_items, retention_for, select_expired
from mercli.rules.config import PurgeSettings
from mercli.spool import (
    DISCARD,
    ERROR,
    INCOMING,
    JOB_FILE,
    OUTGOING,
    SUCCESS,
    Spool,
    Worker,
    link_instances,
    recover,
    write_json,
)
from tests.crashkit import run_until_done
from tests.spoolkit import assert_whole_instances, receive_instance

REPO = Path(__file__).resolve().parent.parent
DAY = 86400.0


def make_item(spool: Spool, state: str, name: str, instances: int = 2, size: int = 4096) -> Path:
    """An item of `state` holding instances, made by the protocol (receive, claim, move)."""
    series = f"1.2.{abs(hash(name)) % 10**8}"
    with Worker(spool, "test") as worker:
        for n in range(instances):
            receive_instance(worker, series, f"{series}.{n}", size=size)
        claim = worker.claim(INCOMING, series)
        assert claim is not None
        return claim.move_to(state, name).path


def make_study_item(spool: Spool, state: str, name: str, instances: int = 2) -> Path:
    """A study job of `state` (SPEC §4.1: one sub-folder per series, job.json listing them),
    made as study completion makes one: one transaction consuming its two series."""
    prefix = f"1.2.{abs(hash(name)) % 10**8}"
    with Worker(spool, "test") as worker:
        claims = []
        for series in (f"{prefix}.1", f"{prefix}.2"):
            for n in range(instances):
                receive_instance(worker, series, f"{series}.{n}")
            claim = worker.claim(INCOMING, series)
            assert claim is not None
            claims.append(claim)
        transaction = claims[0].transaction()
        folder = transaction.new_item(state, name)
        entries = []
        for claim in claims:
            os.mkdir(folder / claim.name)
            link_instances(claim.path, folder / claim.name)
            names = sorted(p.stem for p in (folder / claim.name).glob("*.dcm"))
            entries.append({"series": claim.name, "instances": names})
        target = {"name": "pacs", "type": "folder", "path": "/nowhere"}
        write_json(folder / JOB_FILE, study_record(name, entries, {}, ["brain"], target=target))
        transaction.commit()
        claims[1].transaction().commit()
    return spool.state_dir(state) / name


def entered(spool: Spool, state: str, name: str) -> float:
    return os.stat(spool.state_dir(state) / name).st_ctime


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every path under the spool with its inode and size: what a dry run must not change."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            info = path.lstat()
            found.append((str(path.relative_to(root)), info.st_ino, info.st_size))
    return sorted(found)


def purge(spool: Spool, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["purge", "--spool", str(spool.root), *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


# -- retention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [SUCCESS, DISCARD, ERROR])
def test_retention_boundary_per_state(spool: Spool, state: str) -> None:
    make_item(spool, state, "item-1")
    at = entered(spool, state, "item-1")
    assert select_expired(spool, {state: DAY}, at + DAY - 0.01) == []
    (due,) = select_expired(spool, {state: DAY}, at + DAY + 0.01)
    assert (due.label, due.entered) == (f"{state}/item-1", at)
    others = {s: 0.0 for s in (SUCCESS, DISCARD, ERROR) if s != state}
    assert select_expired(spool, others, at + 10 * DAY) == []  # only the states asked for


def test_defaults_and_configured_retention() -> None:
    defaults = retention_for((SUCCESS, DISCARD), PurgeSettings(), None)
    assert defaults == {SUCCESS: 3 * DAY, DISCARD: 3 * DAY}
    assert retention_for((DISCARD,), PurgeSettings(discard=7 * DAY), None) == {DISCARD: 7 * DAY}
    with pytest.raises(UsageError, match="error/ has no retention"):
        retention_for((ERROR,), PurgeSettings(), None)
    assert retention_for((ERROR,), PurgeSettings(error=30 * DAY), None) == {ERROR: 30 * DAY}
    both = retention_for((SUCCESS, ERROR), PurgeSettings(error=30 * DAY), 60.0)
    assert both == {SUCCESS: 60.0, ERROR: 60.0}


def test_purge_deletes_and_logs_each_item(spool: Spool) -> None:
    make_item(spool, SUCCESS, "s1")
    make_item(spool, DISCARD, "d1", instances=3)
    at = entered(spool, DISCARD, "d1")
    candidates = select_expired(spool, {SUCCESS: 0, DISCARD: 0}, at + 5)
    report = delete_items(spool, candidates, at + 5)
    assert [c.label for c in report.purged] == ["success/s1", "discard/d1"]
    assert report.totals() == {SUCCESS: (1, 2 * 4296), DISCARD: (1, 3 * 4296)}
    assert spool.items(SUCCESS) == spool.items(DISCARD) == []
    events = [e for e in spool.events.read() if e["event"] == "purged"]
    success_age = round(at + 5 - candidates[0].entered)
    assert [(e["state"], e["item"], e["bytes"], e["age"]) for e in events] == [
        (SUCCESS, "s1", 2 * 4296, success_age),
        (DISCARD, "d1", 3 * 4296, 5),
    ]
    assert list(spool.claims.iterdir()) == [] and list(spool.tmp.iterdir()) == []


def test_an_old_study_job_goes_whole_and_a_young_one_stays(spool: Spool) -> None:
    old = make_study_item(spool, SUCCESS, "study-old")
    while time.time() <= entered(spool, SUCCESS, "study-old") + 0.05:  # ctimes apart
        time.sleep(0.01)
    young = make_study_item(spool, SUCCESS, "study-young", instances=3)
    born, young_born = entered(spool, SUCCESS, "study-old"), entered(spool, SUCCESS, "study-young")
    assert young_born > born
    kept = listing(young)
    now = born + DAY + (young_born - born) / 2  # the old one just past a day, the young not
    candidates = select_expired(spool, {SUCCESS: DAY}, now)
    assert [c.label for c in candidates] == ["success/study-old"]
    assert candidates[0].size == 2 * 2 * 4296 + (old / JOB_FILE).stat().st_size  # sub-folders
    report = delete_items(spool, candidates, now)
    assert [c.label for c in report.purged] == ["success/study-old"]
    assert not old.exists() and [i.name for i in spool.items(SUCCESS)] == ["study-young"]
    assert not any("study-old" in path for path, _, _ in listing(spool.root))  # nothing left
    assert listing(young) == kept and len(list(young.rglob("*.dcm"))) == 6
    (event,) = [e for e in spool.events.read() if e["event"] == "purged"]
    assert (event["item"], event["bytes"]) == ("study-old", candidates[0].size)
    assert list(spool.claims.iterdir()) == [] and list(spool.tmp.iterdir()) == []


def test_error_only_when_named(tmp_path: Path, spool: Spool) -> None:
    for state in (SUCCESS, DISCARD, ERROR):
        make_item(spool, state, f"{state}-1")
    code, out, _ = purge(spool, "--older-than", "0")
    assert (code, out.split()) == (0, ["success/success-1", "discard/discard-1"])
    assert [i.name for i in spool.items(ERROR)] == ["error-1"]
    code, _, err = purge(spool, "--state", "error")
    assert code == 2 and "error/ has no retention: give --older-than" in err
    rules = tmp_path / "rules.toml"
    rules.write_text('[purge]\nerror = "0s"\n[[rules]]\nname = "r"\naction = "discard"\n')
    code, out, _ = purge(spool, "--state", "error", "--rules", str(rules))
    assert (code, out.split()) == (0, ["error/error-1"])


def test_configured_retention_keeps_young_items(tmp_path: Path, spool: Spool) -> None:
    make_item(spool, SUCCESS, "young")
    rules = tmp_path / "rules.toml"
    rules.write_text('[purge]\nsuccess = "1h"\n[[rules]]\nname = "r"\naction = "discard"\n')
    assert purge(spool, "--rules", str(rules))[:2] == (0, "")
    assert purge(spool)[:2] == (0, "")  # default 3d
    assert [i.name for i in spool.items(SUCCESS)] == ["young"]


def test_dry_run_changes_nothing(spool: Spool) -> None:
    for state in (SUCCESS, DISCARD, ERROR):
        make_item(spool, state, f"{state}-1", instances=3)
    before = listing(spool.root)
    code, out, err = purge(
        spool, "--older-than", "0", "--state", "success,discard,error", "--dry-run"
    )
    assert code == 0
    assert out.split() == ["success/success-1", "discard/discard-1", "error/error-1"]
    assert "would purge 3 item(s)" in err and "success 1 (12.6 KB)" in err
    assert listing(spool.root) == before
    code, out, err = purge(spool, "--keep-free", "99%", "--dry-run")
    assert code == 1 and out.split() == ["success/success-1", "discard/discard-1"]
    assert "could not free 99%" in err
    assert listing(spool.root) == before


def test_never_touches_incoming_outgoing_or_claimed(spool: Spool) -> None:
    make_item(spool, OUTGOING, "job-1")
    make_item(spool, SUCCESS, "held")
    make_item(spool, SUCCESS, "free")
    with Worker(spool, "receive") as worker:
        receive_instance(worker, "1.2.77", "1.2.77.1")
    with Worker(spool, "dispatch") as holder:
        claim = holder.claim(SUCCESS, "held")
        assert claim is not None
        code, out, _ = purge(spool, "--older-than", "0", "--state", "success,discard,error")
        assert (code, out.split()) == (0, ["success/free"])
        assert_whole_instances(claim.path)
        claim.release()
    assert [i.name for i in spool.items(INCOMING)] == ["1.2.77"]
    assert [i.name for i in spool.items(OUTGOING)] == ["job-1"]
    assert [i.name for i in spool.items(SUCCESS)] == ["held"]


def test_usage_config_and_spool_errors(tmp_path: Path, spool: Spool) -> None:
    assert purge(spool, "--state", "outgoing")[0] == 2
    assert purge(spool, "--state", "incoming,success")[0] == 2
    assert purge(spool, "--older-than", "soon")[0] == 2
    assert purge(spool, "--keep-free", "lots")[0] == 2
    assert purge(spool, "--keep-free", "150%")[0] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[purge]\nsucess = 1\n")
    code, _, err = purge(spool, "--rules", str(bad))
    assert code == 3 and f'{bad}:2: [purge]: unknown key "sucess"' in err
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, ["purge", "--spool", str(tmp_path / "file")])
    assert result.exit_code == 4


def test_keep_free_parsing() -> None:
    assert KeepFree.parse("10%").threshold(1000) == 100
    assert KeepFree.parse("50G").threshold(1) == 50 * 1024**3
    assert KeepFree.parse("1.5M").threshold(1) == int(1.5 * 1024**2)
    assert KeepFree.parse("2048").threshold(1) == 2048
    assert KeepFree.parse("3GiB").threshold(1) == 3 * 1024**3
    for text in ("0%", "100%", "ten", "-5G"):
        with pytest.raises(ValueError):
            KeepFree.parse(text)


def test_keep_free_with_room_does_nothing(spool: Spool) -> None:
    make_item(spool, SUCCESS, "s1")
    code, out, err = purge(spool, "--keep-free", "1")
    assert (code, out) == (0, "")
    assert "nothing to do" in err
    assert [i.name for i in spool.items(SUCCESS)] == ["s1"]


# -- disk pressure on a real small filesystem ----------------------------------------------------

PRESSURE = """
import json, os, subprocess, sys
from pathlib import Path
from mercli.spool import Spool, Worker
from mercli.purge import disk_space
from tests.spoolkit import receive_instance
root = Path(sys.argv[1]) / "spool"
spool = Spool.open(root)
with Worker(spool, "test") as worker:
    for n, state in enumerate(["success"] * 5 + ["discard"] * 2 + ["error"]):
        receive_instance(worker, f"1.2.{n}", f"1.2.{n}.1", size=300 * 1024)
        worker.claim("incoming", f"1.2.{n}").move_to(state, f"{n:02d}")
free = disk_space(root)[1]
threshold = {"some": str(free + 750 * 1024), "all": "95%"}[sys.argv[2]]
command = [sys.executable, "-m", "mercli", "purge", "--keep-free", threshold, "--spool", str(root)]
done = subprocess.run(command, capture_output=True, text=True)
left = {s: sorted(os.listdir(root / s)) for s in ("success", "discard", "error")}
print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr, "left": left}))
"""


def _pressure(tmp_path: Path, mode: str) -> dict[str, object]:
    mount = tmp_path / "small"
    mount.mkdir()
    script = f'mount -t tmpfs -o size=4m none {mount} && exec "$0" -c "$1" {mount} {mode}'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, sys.executable, PRESSURE],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_keep_free_deletes_oldest_success_first_until_reached(tmp_path: Path) -> None:
    result = _pressure(tmp_path, "some")
    assert result["rc"] == 0, result["err"]
    assert result["out"] == "success/00\nsuccess/01\nsuccess/02\n"
    assert result["left"] == {"success": ["03", "04"], "discard": ["05", "06"], "error": ["07"]}
    assert "below" in str(result["err"]) and "purged 3 item(s)" in str(result["err"])


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_keep_free_says_when_it_cannot_and_spares_error(tmp_path: Path) -> None:
    result = _pressure(tmp_path, "all")
    assert result["rc"] == 1
    assert str(result["out"]).split() == [f"success/{n:02d}" for n in range(5)] + [
        "discard/05",
        "discard/06",
    ]
    assert result["left"] == {"success": [], "discard": [], "error": ["07"]}
    assert "Error: could not free 95%" in str(result["err"])


# -- crashes --------------------------------------------------------------------------------------


def test_purge_survives_kill_at_every_step(tmp_path: Path) -> None:
    root = tmp_path / "spool"

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        make_item(Spool.open(root), SUCCESS, "old", instances=3)

    def scenario() -> None:
        spool = Spool(root)
        delete_items(spool, select_expired(spool, {SUCCESS: 0}, 1e12), 1e12)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        items = spool.items(SUCCESS)
        assert [i.name for i in items] in ([], ["old"]), step
        for item in items:
            assert len(assert_whole_instances(item.path)) == 3, step
        assert list(spool.claims.iterdir()) == [] and list(spool.tmp.iterdir()) == []

    assert run_until_done(scenario, check, setup=setup) > 10
