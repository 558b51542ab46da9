"""The forked helper that edits half of a large series (mercli.dispatch.edits._Helper).

Each test routes a real series into a de-identifying folder target's job and edits it the
way the dispatcher does (`edited_copy`), in this process: with the helper, the copy must be
the same bytes as without; a helper that fails, dies, hangs, or outlives its parent must
never pass for a finished edit, nor be left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mercli.dispatch import edits
from mercli.dispatch.edits import EditFailed, edited_copy
from mercli.jobs import JobInfo
from mercli.spool import OUTGOING, Spool, Worker
from tests.test_deid_dispatch import rules_file
from tests.test_route import receive_file, route_all, series_files

COUNT = 40  # instances in the series: past HELPER_MIN


def research_job(tmp_path: Path, spool: Spool, **attrs: Any) -> tuple[Path, JobInfo]:
    """A routed series of COUNT 256x256 instances: the de-identifying target's job."""
    files = series_files(tmp_path / "src", "1.2.77", COUNT, rows=256, columns=256, **attrs)
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    route_all(spool, rules_file(tmp_path))
    for item in spool.items(OUTGOING):
        info = JobInfo.load(item.name, item.path)
        if info.target.name == "research":
            return item.path, info
    raise AssertionError("no research job")


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def in_child(parent: int, action: Callable[[], None]) -> Callable[..., str]:
    """`_edit_paths` as it is, except that in a forked helper `action` runs first."""
    real = edits._edit_paths

    def edit_paths(*args: Any) -> str:
        if os.getpid() != parent:
            action()
        return real(*args)

    return edit_paths


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool.open(tmp_path / "spool")


def test_a_helper_edits_half_and_the_copy_is_the_same_bytes(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, info = research_job(tmp_path, spool)
    forked = []
    real_fork = os.fork

    def counting_fork() -> int:
        forked.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", counting_fork)
    monkeypatch.setattr(edits, "HELPER_MIN", 10**9)
    alone, _ = edited_copy(job, info, tmp_path / "alone")
    assert not forked
    monkeypatch.setattr(edits, "HELPER_MIN", 2)
    helped, _ = edited_copy(job, info, tmp_path / "helped")
    assert forked == [1]
    made = contents(helped)
    assert len(made) == 2 * COUNT  # instances and sidecars
    assert made == contents(alone)


def test_a_refused_instance_in_the_helpers_half_fails_the_job_naming_it(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, info = research_job(tmp_path, spool)
    parent = os.getpid()
    edited_here: list[str] = []
    real = edits._edit_paths

    def edit_paths(paths: list[Path], *args: Any) -> str:
        if os.getpid() == parent:
            edited_here.extend(p.name for p in paths)
        return real(paths, *args)

    monkeypatch.setattr(edits, "_edit_paths", edit_paths)
    last = sorted(job.glob("*.dcm"))[-1]  # the helper edits the second half
    from pydicom import dcmread

    ds = dcmread(last)
    ds.BurnedInAnnotation = "YES"
    os.unlink(last)  # a hard link to the receipt: the received file stays as it was
    ds.save_as(last, enforce_file_format=True)
    with pytest.raises(EditFailed) as failed:
        edited_copy(job, info, tmp_path / "copy")
    assert failed.value.permanent
    assert last.name in str(failed.value) and "burned-in" in str(failed.value)
    assert len(edited_here) == COUNT // 2 and last.name not in edited_here  # the helper's


def test_a_helper_that_dies_fails_the_attempt_to_be_retried(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, info = research_job(tmp_path, spool)
    monkeypatch.setattr(edits, "_edit_paths", in_child(os.getpid(), lambda: os._exit(9)))
    with pytest.raises(EditFailed) as failed:
        edited_copy(job, info, tmp_path / "copy")
    assert not failed.value.permanent
    assert "died" in str(failed.value)
    assert edits._helpers.acquire(blocking=False)  # its place was given back
    edits._helpers.release()


def test_a_helper_that_hangs_is_killed_at_its_deadline(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, info = research_job(tmp_path, spool)
    pids = tmp_path / "pids"

    def hang() -> None:
        pids.write_text(str(os.getpid()))
        time.sleep(120)

    monkeypatch.setattr(edits, "_edit_paths", in_child(os.getpid(), hang))
    monkeypatch.setattr(edits, "helper_deadline", lambda own: 1.0)
    started = time.monotonic()
    with pytest.raises(EditFailed) as failed:
        edited_copy(job, info, tmp_path / "copy")
    assert time.monotonic() - started < 30
    assert not failed.value.permanent and "no answer" in str(failed.value)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pids.read_text()), 0)


def test_a_helper_dies_with_a_parent_killed_mid_edit(tmp_path: Path, spool: Spool) -> None:
    """kill -9 of the dispatching process: its helper must not live on (PR_SET_PDEATHSIG)."""
    job, _ = research_job(tmp_path, spool)
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from mercli.dispatch import edits
        from mercli.jobs import JobInfo
        parent, real = os.getpid(), edits._edit_paths
        def edit_paths(*args):
            if os.getpid() != parent:
                Path({str(pids)!r}).write_text(str(os.getpid()))
                time.sleep(120)
            else:
                time.sleep(120)  # the parent's half: still editing when it is killed
            return real(*args)
        edits._edit_paths = edit_paths
        job = Path({str(job)!r})
        edits.edited_copy(job, JobInfo.load(job.name, job), Path({str(tmp_path / "copy")!r}))
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline, "no helper started"
            assert parent.poll() is None, "the parent ended early"
            time.sleep(0.05)
        helper = int(pids.read_text())
        os.kill(helper, 0)  # alive
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(helper):
        assert time.monotonic() < deadline, "the helper outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, reaped by init soon, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_without_a_free_place_a_worker_edits_alone(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    job, info = research_job(tmp_path, spool)
    monkeypatch.setattr(edits, "_helpers", edits.threading.BoundedSemaphore(1))
    assert edits._helpers.acquire(blocking=False)  # another worker's helper holds it
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked without a place"))
    copy, _ = edited_copy(job, info, tmp_path / "copy")
    assert len(contents(copy)) == 2 * COUNT
