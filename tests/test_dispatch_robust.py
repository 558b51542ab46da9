"""dispatch against a spool that refuses one job's claim or save (a full disk): the other
jobs are delivered, a delivered job is never sent again because its dispatch.json could not
be written, nothing is retried in a tight loop, and `--once` does not report success with a
job left undone. The peer is a real pynetdicom SCP on loopback; the disk's refusals are
injected where they would come from (`Worker.claim`, `Progress.save`)."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mercli.dispatch.dispatcher import Dispatcher
from mercli.dispatch.service import DispatchService
from mercli.jobs import Progress
from mercli.setaside import SetAside
from mercli.spool import OUTGOING, SUCCESS, Spool, Worker
from tests.test_dispatch import Scp, dicom_target, routed, rules_for


def _full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def pacs() -> Iterator[Scp]:
    server = Scp()
    yield server
    server.close()


def _jobs(tmp_path: Path, spool: Spool, port: int, **series: int) -> list[str]:
    rules = rules_for(tmp_path, dicom_target("pacs", port, retry_delay="30s"), '"pacs"')
    routed(tmp_path, spool, rules, {f"1.2.{n}": count for n, count in series.items()})
    return sorted(item.name for item in spool.items(OUTGOING))


def test_a_delivered_job_whose_progress_cannot_be_saved_is_not_sent_again(
    tmp_path: Path, spool: Spool, pacs: Scp, monkeypatch: pytest.MonkeyPatch
) -> None:
    _jobs(tmp_path, spool, pacs.port, **{"701": 3})
    monkeypatch.setattr(Progress, "save", _full)
    summary = DispatchService(spool.root, 1).run(once=True)
    assert (summary.delivered, summary.retried) == (1, 0)
    assert len(spool.items(SUCCESS)) == 1 and spool.items(OUTGOING) == []
    assert len(pacs.received) == 3  # each instance once


def test_a_job_the_spool_cannot_claim_is_set_aside_and_the_others_go(
    tmp_path: Path, spool: Spool, pacs: Scp, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck, other = _jobs(tmp_path, spool, pacs.port, **{"702": 2, "703": 2})
    claim = Worker.claim

    def refuse(self: Worker, state: str, name: str) -> Any:
        if name == stuck:
            _full()
        return claim(self, state, name)

    monkeypatch.setattr(Worker, "claim", refuse)
    summary = DispatchService(spool.root, 2).run(once=True)
    assert (summary.delivered, summary.retried) == (1, 1)  # --once exits 1, not 0
    assert [item.name for item in spool.items(SUCCESS)] == [other]
    assert [item.name for item in spool.items(OUTGOING)] == [stuck]
    assert spool.claimed() == [] and len(pacs.received) == 2


def test_a_retry_whose_progress_cannot_be_saved_waits_its_delay_in_memory(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    refusing = Scp(status=lambda ds: asked.append(ds.SOPInstanceUID) or 0xA700)  # try later
    try:
        (job,) = _jobs(tmp_path, spool, refusing.port, **{"704": 2})
        monkeypatch.setattr(Progress, "save", _full)
        with Worker(spool, "dispatch") as worker:
            dispatcher = Dispatcher(spool, worker)  # as the service runs it: no --once limit
            picked = dispatcher.pick()
            assert picked is not None
            with pytest.raises(OSError):
                dispatcher.attempt(*picked)  # the retry's save fails: the claim is released
            assert [item.name for item in spool.items(OUTGOING)] == [job]
            assert dispatcher.pick() is None  # set aside for its retry delay, not taken again
            assert dispatcher.next_due() is not None
    finally:
        refusing.close()
    assert len(asked) == 2  # one attempt: each instance offered once


def test_set_aside_doubles_with_errors_in_a_row_and_starts_again_once_settled() -> None:
    aside = SetAside()
    assert aside.hold("a") == pytest.approx(5, abs=0.1)
    assert aside.waits("a") and not aside.waits("b")
    aside.until["a"] = 0.0  # its time has come
    assert aside.hold("a") == pytest.approx(10, abs=0.1)
    for _ in range(10):
        aside.until["a"] = 0.0
        seconds = aside.hold("a")
    assert seconds == pytest.approx(300, abs=0.1)
    aside.settled("a")
    aside.until["a"] = 0.0
    assert aside.hold("a") == pytest.approx(5, abs=0.1)
    assert aside.hold("b", 30) == pytest.approx(30, abs=0.1)  # a retry delay, no error
    aside.keep_only(["b"])
    assert not aside.waits("a") and aside.waits("b")


def test_a_job_that_cannot_be_settled_waits_longer_each_time(
    tmp_path: Path, spool: Spool, pacs: Scp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivered, but moving it to success/ fails (a full disk): each failure in a row sets it
    aside twice as long, so a PACS is not sent the same series every few seconds."""
    (job,) = _jobs(tmp_path, spool, pacs.port, **{"705": 2})
    monkeypatch.setattr(Progress, "save", _full)
    monkeypatch.setattr("mercli.spool.claims.Claim.move_to", _full)
    with Worker(spool, "dispatch") as worker:
        dispatcher = Dispatcher(spool, worker)
        waits = []
        for _ in range(3):
            dispatcher.set_aside.until[job] = 0.0  # its time has come
            picked = dispatcher.pick()
            assert picked is not None
            with pytest.raises(OSError):
                dispatcher.attempt(*picked)
            waits.append(round(dispatcher.set_aside.until[job] - time.monotonic()))
    assert waits == [5, 10, 20]
    assert len(pacs.received) == 2 * 3  # sent each time it was let through, never more
