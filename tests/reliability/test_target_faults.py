"""Target faults: refusing, aborting, failing, hung, and vanishing targets, all at once,
against one `mercli dispatch` service. Each job retries with backoff, gives up into error/
with the reason, or gets through; the healthy targets are never held up by the sick ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dicomfiles import make_instance
from tests.netkit import free_port, receiver, storescu, wait_until
from tests.reliability.kit import (
    Scp,
    Service,
    claimed,
    dicom_target,
    events,
    items,
    mercli,
    sop_uids,
    storescp,
    write_rules,
)

SERIES = "1.2.826.0.1.3680043.9.20"
RETRY = {"retry_delay": "0.2s", "retry_backoff": 2.0, "retry_max_delay": "1s"}


@pytest.fixture
def scps() -> Iterator[list[Scp]]:
    started: list[Scp] = []
    yield started
    for server in started:
        server.close()


def jobs_by_target(spool: Path, state: str) -> dict[str, Path]:
    found = {}
    for item in items(spool, state):
        record = json.loads((item / "job.json").read_text())
        found[record["target"]["name"]] = item
    return found


def back_in_outgoing(spool: Path, target: str) -> bool:
    """True once the target's job waits in outgoing/ (not claimed for an attempt right now)."""
    try:
        return target in jobs_by_target(spool, "outgoing")
    except FileNotFoundError:  # claimed between listing and reading
        return False


def assert_still_retrying(spool: Path, target: str) -> None:
    """The job of an unreachable target is neither delivered nor given up: it waits, or is
    being tried right now (claimed), so allow it to come back to outgoing/."""
    wait_until(lambda: back_in_outgoing(spool, target), timeout=5, what=f"{target} retrying")
    assert target not in jobs_by_target(spool, "success")
    assert target not in jobs_by_target(spool, "error")


def error_record(spool: Path, target: str) -> dict[str, Any]:
    return dict(json.loads((jobs_by_target(spool, "error")[target] / "error.json").read_text()))


def check_given_up(spool: Path) -> None:
    """Each sick target's job is in error/ with its reason and attempts, whole."""
    refused = error_record(spool, "refuser")
    assert refused["attempts"] == 3 and "reject" in refused["reason"].lower()
    failed = error_record(spool, "failing")
    assert failed["attempts"] == 3 and "0xC000" in failed["reason"]
    timed_out = error_record(spool, "hung")
    assert timed_out["attempts"] == 2 and "did not answer within 1s" in timed_out["reason"]
    for target in ("refuser", "failing", "hung"):  # resendable: the job is whole
        job = jobs_by_target(spool, "error")[target]
        assert len(list(job.glob("*.dcm"))) == 6 and (job / "job.json").is_file()


def test_sick_targets_retry_give_up_or_recover_and_never_hold_up_the_others(
    tmp_path: Path, scps: list[Scp]
) -> None:
    spool, source, archive = tmp_path / "spool", tmp_path / "src", tmp_path / "archive"
    source.mkdir()
    files = [make_instance(source, series=SERIES, number=n, sop=f"{SERIES}.{n}") for n in range(6)]
    sent = {f"{SERIES}.{n}" for n in range(6)}
    good = Scp()
    refuser = Scp(refuse=True)
    failing = Scp(lambda ds: 0xC000)
    flaky = Scp(abort_at=3)
    hung = Scp(delay=3.0)
    scps += [good, refuser, failing, flaky, hung]
    bouncing_port = free_port()  # nothing listens here until the others are settled
    targets = {
        "good": dicom_target(good.port, **RETRY),
        "refuser": dicom_target(refuser.port, max_attempts=3, **RETRY),
        "failing": dicom_target(failing.port, max_attempts=3, **RETRY),
        "flaky": dicom_target(flaky.port, max_attempts=5, **RETRY),
        "hung": dicom_target(hung.port, timeout="1s", max_attempts=2, **RETRY),
        "bouncing": dicom_target(bouncing_port, max_attempts=0, **RETRY),
        "archive": {"type": "folder", "path": str(archive)},
    }
    rules = write_rules(tmp_path / "rules.toml", targets)
    with receiver(spool, "--processes", "1") as running:
        assert storescu(running.port, files).returncode == 0
    routed = mercli("route", "--once", "--all", "--rules", rules, "--spool", spool)
    assert routed.returncode == 0, routed.stderr
    assert len(items(spool, "outgoing")) == len(targets)

    dispatch = Service(tmp_path / "dispatch.log", "dispatch", "--workers", "3", "--spool", spool)
    dispatch.start()
    try:
        # The healthy targets get their series while the bouncing one is still down.
        wait_until(
            lambda: {"good", "archive", "flaky"} <= set(jobs_by_target(spool, "success")),
            timeout=30,
            what="healthy targets delivered",
        )
        assert_still_retrying(spool, "bouncing")
        # The sick ones give up, each with its reason, after its own number of attempts.
        wait_until(
            lambda: {"refuser", "failing", "hung"} <= set(jobs_by_target(spool, "error")),
            timeout=60,
            what="sick targets given up",
        )
        assert_still_retrying(spool, "bouncing")
        check_given_up(spool)
        with storescp(tmp_path / "bounced", port=bouncing_port):  # the target comes back
            wait_until(
                lambda: "bouncing" in jobs_by_target(spool, "success"),
                timeout=30,
                what="the returning target to get its job",
            )
            # The job is published into success/ a moment before its claim is deleted.
            wait_until(
                lambda: items(spool, "outgoing") == [] and claimed(spool) == [],
                timeout=5,
                what="the delivered job's claim to end",
            )
        assert set(sop_uids(tmp_path / "bounced")) == sent
        # The admin mends two targets and resends their failed jobs (not the hung one's).
        failing.status = lambda ds: 0
        refuser.server.ae.require_called_aet = False
        given_up = jobs_by_target(spool, "error")
        resent = mercli(
            "resend",
            "--from",
            "error",
            "--spool",
            spool,
            given_up["failing"].name,
            given_up["refuser"].name,
        )
        assert resent.returncode == 0, resent.stderr
        assert len(resent.stdout.split()) == 2 and "outgoing/" in resent.stdout
        wait_until(
            lambda: len(items(spool, "success")) == 6 and not items(spool, "outgoing"),
            timeout=30,
            what="the resent jobs to be delivered",
        )
        assert set(jobs_by_target(spool, "error")) == {"hung"}
        assert sorted(failing.received) == sorted(refuser.received) == sorted(sent)
    finally:
        stopped = dispatch.stop()
    assert stopped == 0  # a service stopped by SIGTERM exits 0 whatever its targets did

    assert sorted(good.received) == sorted(sent)
    # An abort mid-job: only what the target did not have is sent again; nothing twice.
    assert sorted(flaky.received) == sorted(sent)
    assert set(sop_uids(archive)) == sent

    # Backoff: retry_delay * retry_backoff^(n-1), capped at retry_max_delay.
    log = events(spool)
    delays = [e["delay"] for e in log if e["event"] == "retry" and e["target"] == "failing"]
    assert delays == [0.2, 0.4]
    bounced = [e["delay"] for e in log if e["event"] == "retry" and e["target"] == "bouncing"]
    assert len(bounced) >= 2 and bounced == [min(0.2 * 2**n, 1.0) for n in range(len(bounced))]
    failed_events = {e["target"]: e["reason"] for e in log if e["event"] == "failed"}
    assert set(failed_events) == {"refuser", "failing", "hung"}
    origins = [e["from"] for e in log if e["event"] == "resent"]
    assert len(origins) == 2 and all(o.startswith("error/") for o in origins), origins
    assert "gave up" in dispatch.output()
