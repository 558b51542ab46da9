"""Edit helpers (mercli.dispatch.helpers): processes forked at dispatch's start that edit half
of a large series.

Each test routes a real series of COUNT instances into a de-identifying folder target's job.
The helpers are forked from a single-threaded process, so the tests drive them from a fresh
Python process (`DRIVER`, which can make the helper die, hang or go slow), or through
`mercli dispatch --once` itself. With a helper the copy must be the same bytes as without; a
helper that fails, dies, hangs, or outlives its parent must never pass for a finished edit,
nor be left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from mercli.dispatch import helpers
from mercli.jobs import JobInfo
from mercli.spool import ERROR, OUTGOING, SUCCESS, Spool, Worker
from tests.test_deid_dispatch import rules_file
from tests.test_dispatch import dispatch_once
from tests.test_route import receive_file, route_all, series_files

COUNT = 40  # instances in the series: past HELPER_MIN

DRIVER = """
import json, os, signal, sys, time
from pathlib import Path
from mercli.dispatch import edits, helpers
from mercli.jobs import JobInfo

mode, job, out, count = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
parent, real, mine = os.getpid(), edits.edit_paths, []
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a dispatcher finishing its jobs does

def edit_paths(paths, destination, plan):
    if os.getpid() != parent:  # the helper
        (out.parent / "helper.pid").write_text(str(os.getpid()))
        if mode == "die":
            os._exit(9)
        if mode in ("hang", "orphan"):
            time.sleep(120)
        if mode == "slow":
            time.sleep(1.5)
    else:
        mine.extend(p.name for p in paths)
        if mode == "orphan":
            time.sleep(120)  # still editing when it is killed
    return real(paths, destination, plan)

edits.edit_paths = edit_paths
if mode == "rotate":  # the secret file changes once the worker has read it
    plan_of = edits.EditPlan.of.__func__

    def of(cls, target):
        plan = plan_of(cls, target)
        if os.getpid() == parent:
            Path(str(target.pseudonym_secret_file)).write_bytes(b"another-secret-of-16-bytes+")
        return plan

    edits.EditPlan.of = classmethod(of)
if mode == "hang":
    edits.helper_deadline = lambda own: 1.0
pool = helpers.EditHelpers.start(count)
helpers.use(pool)
result = {"helpers": pool.count}
try:
    if mode == "warm":  # what a worker does before it imports pydicom itself
        helpers.warm_up()
        helpers.warm_up()  # once a helper: the second sends nothing
        edits.edited_copy(job, JobInfo.load(job.name, job), out.parent / "first")
    edits.edited_copy(job, JobInfo.load(job.name, job), out)
    result["ok"] = True
except edits.EditFailed as exc:
    result.update(error=str(exc), permanent=exc.permanent)
result.update(left=pool.count, mine=mine)
pool.close()
print(json.dumps(result))
"""


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool.open(tmp_path / "spool")


JPEG_LS_RULES = """
[targets.research]
type = "folder"
path = "research"
transfer_syntax = "jpeg-ls-lossless"

[[rules]]
name = "all"
targets = ["research"]
"""


def research_job(
    tmp_path: Path, spool: Spool, files: list[Path] | None = None, rules: str = ""
) -> Path:
    """A routed series of COUNT 256x256 instances (or `files`): the job of the target
    `research` (de-identifying, or as `rules` say); rules and research/ in `tmp_path`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if files is None:
        files = series_files(tmp_path / "src", "1.2.77", COUNT, rows=256, columns=256)
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    if rules:
        (tmp_path / "rules.toml").write_text(rules)
    route_all(spool, tmp_path / "rules.toml" if rules else rules_file(tmp_path))
    for item in spool.items(OUTGOING):
        if JobInfo.load(item.name, item.path).target.name == "research":
            return item.path
    raise AssertionError("no research job")


def drive(
    tmp_path: Path, job: Path, mode: str = "plain", count: int = 1, name: str = "copy"
) -> dict[str, Any]:
    """Edit `job` into tmp_path/`name` in a fresh process with `count` helpers (`DRIVER`)."""
    command = [sys.executable, "-c", DRIVER, mode, str(job), str(tmp_path / name), str(count)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_helper_edits_half_and_the_copy_is_the_same_bytes(tmp_path: Path, spool: Spool) -> None:
    job = research_job(tmp_path, spool)
    alone = drive(tmp_path, job, count=0, name="alone")
    helped = drive(tmp_path, job, count=1, name="helped")
    assert alone["ok"] and helped["ok"]
    assert (alone["helpers"], len(alone["mine"])) == (0, COUNT)
    assert (helped["helpers"], len(helped["mine"]), helped["left"]) == (1, COUNT // 2, 1)
    made = contents(tmp_path / "helped")
    assert len(made) == 2 * COUNT  # instances and sidecars
    assert made == contents(tmp_path / "alone")


def test_a_warmed_up_helper_answers_each_series_once(tmp_path: Path, spool: Spool) -> None:
    """A warm-up gets no answer: the answers that follow stay those of their requests."""
    job = research_job(tmp_path, spool)
    alone = drive(tmp_path, job, count=0, name="alone")
    warmed = drive(tmp_path, job, "warm", count=1, name="warmed")
    assert alone["ok"] and warmed["ok"] and warmed["left"] == 1
    assert len(warmed["mine"]) == COUNT  # half of each of the two copies
    assert (
        contents(tmp_path / "first")
        == contents(tmp_path / "warmed")
        == contents(tmp_path / "alone")
    )


def test_a_helper_converts_half_and_the_copy_is_the_same_bytes(
    tmp_path: Path, spool: Spool
) -> None:
    job = research_job(tmp_path, spool, rules=JPEG_LS_RULES)
    alone = drive(tmp_path, job, count=0, name="alone")
    helped = drive(tmp_path, job, count=1, name="helped")
    assert alone["ok"] and helped["ok"] and len(helped["mine"]) == COUNT // 2
    made = contents(tmp_path / "helped")
    assert len(made) == 2 * COUNT
    assert made == contents(tmp_path / "alone")
    last = dcmread(tmp_path / "helped" / sorted(n for n in made if n.endswith(".dcm"))[-1])
    assert last.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless


def test_a_refused_instance_in_the_helpers_half_fails_the_job_naming_it(
    tmp_path: Path, spool: Spool
) -> None:
    job = research_job(tmp_path, spool)
    last = sorted(job.glob("*.dcm"))[-1]  # in the helper's half
    ds = dcmread(last)
    ds.BurnedInAnnotation = "YES"
    os.unlink(last)  # a hard link to the receipt: the received file stays as it was
    ds.save_as(last, enforce_file_format=True)
    result = drive(tmp_path, job)
    assert result["permanent"] is True
    assert last.name in result["error"] and "burned-in" in result["error"]
    assert last.name not in result["mine"] and len(result["mine"]) == COUNT // 2
    assert result["left"] == 1  # a helper that failed an instance is fine: kept


def test_a_secret_rotated_mid_attempt_never_splits_a_series_between_two_keys(
    tmp_path: Path, spool: Spool
) -> None:
    result = drive(tmp_path, research_job(tmp_path, spool), "rotate")
    assert result["permanent"] is False and "secret changed" in result["error"]
    assert result["left"] == 1


def test_a_helper_that_dies_fails_the_attempt_to_be_retried(tmp_path: Path, spool: Spool) -> None:
    result = drive(tmp_path, research_job(tmp_path, spool), "die")
    assert result["permanent"] is False and "died" in result["error"]
    assert result["left"] == 0  # dropped, not replaced


def test_a_helper_that_hangs_is_killed_at_its_deadline(tmp_path: Path, spool: Spool) -> None:
    started = time.monotonic()
    result = drive(tmp_path, research_job(tmp_path, spool), "hang")
    assert time.monotonic() - started < 60
    assert result["permanent"] is False and "no answer" in result["error"]
    assert result["left"] == 0
    assert not running(int((tmp_path / "helper.pid").read_text()))


def test_a_helper_ignores_sigterm_to_the_group_and_finishes(tmp_path: Path, spool: Spool) -> None:
    """systemd stops a unit with SIGTERM to every process in it: the dispatcher finishes the
    jobs in hand, so its helpers must finish theirs."""
    job = research_job(tmp_path, spool)
    command = [sys.executable, "-c", DRIVER, "slow", str(job), str(tmp_path / "copy"), "1"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    pid_file = tmp_path / "helper.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGTERM)
    out, _ = driver.communicate(timeout=60)
    result = json.loads(out)
    assert result.get("ok") is True, result
    assert len(contents(tmp_path / "copy")) == 2 * COUNT


def test_a_helper_dies_with_a_dispatcher_killed_mid_edit(tmp_path: Path, spool: Spool) -> None:
    """kill -9 of the dispatching process: its helper must not live on (PR_SET_PDEATHSIG)."""
    job = research_job(tmp_path, spool)
    command = [sys.executable, "-c", DRIVER, "orphan", str(job), str(tmp_path / "copy"), "1"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    pid_file = tmp_path / "helper.pid"
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.02)
        helper = int(pid_file.read_text())
        assert running(helper)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 10
    while running(helper):
        assert time.monotonic() < deadline, "the helper outlived its dispatcher"
        time.sleep(0.05)


def test_helpers_are_forked_only_from_a_single_threaded_process() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        pool = helpers.EditHelpers.start(1)
        assert pool.count == 0 and pool.take() is None
    finally:
        release.set()
        thread.join()


def test_dispatch_once_with_and_without_helpers_delivers_the_same_copy(
    tmp_path: Path, spool: Spool
) -> None:
    """The wiring: `mercli dispatch --edit-helpers 1` uses one (its debug log says so), and
    the research target gets what `--edit-helpers 0` gives it."""
    research_job(tmp_path, spool)
    second = Spool.open(tmp_path / "spool2")
    files = sorted((tmp_path / "src").glob("*.dcm"))
    research_job(tmp_path / "again", second, files)  # the same series, routed again
    alone = dispatch_once(spool, "--edit-helpers", "0", "-v")
    helped = dispatch_once(second, "--edit-helpers", "1", "-v")
    assert alone.returncode == 0 and helped.returncode == 0, alone.stderr + helped.stderr
    assert "edited by helper" not in alone.stderr
    assert f"{COUNT // 2} of {COUNT} instances edited by helper" in helped.stderr
    assert len(second.items(SUCCESS)) == 2 and not second.items(ERROR)
    research = sorted((tmp_path / "research").rglob("*.dcm"))
    again = sorted((tmp_path / "again" / "research").rglob("*.dcm"))
    assert len(research) == len(again) == COUNT
    assert [p.read_bytes() for p in research] == [p.read_bytes() for p in again]
