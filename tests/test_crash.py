"""kill -9 at every filesystem step of publish, claim, move and transaction.

Each test runs one spool operation in a child that SIGKILLs itself at its N-th system call,
for every N until the operation completes. After each death it checks what a consumer could
see (no torn file in any state folder, no item in two places), runs recovery as the next
process would, and checks that nothing was lost.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mercli.spool import (
    DISCARD,
    INCOMING,
    OUTGOING,
    STATES,
    Spool,
    Worker,
    link_instances,
    recover,
    write_json,
)
from tests.crashkit import run_until_done
from tests.spoolkit import assert_whole_instances, receive_instance

SERIES = "1.2.840.1"
INSTANCES = {f"{SERIES}.{n}" for n in range(3)}


def _fresh_spool(root: Path, *, with_series: bool) -> Spool:
    shutil.rmtree(root, ignore_errors=True)
    spool = Spool.open(root)
    if with_series:
        with Worker(spool, "receive") as worker:
            for sop in sorted(INSTANCES):
                receive_instance(worker, SERIES, sop)
    return spool


def _assert_nothing_left_behind(spool: Spool) -> None:
    assert list(spool.claims.iterdir()) == []
    assert list(spool.leases.iterdir()) == []
    leftovers = [p.name for p in spool.tmp.iterdir()]
    assert leftovers == [], leftovers


def _visible_instances(spool: Spool) -> dict[str, list[str]]:
    """Instance names per item as a consumer sees them; asserts every visible file is whole."""
    seen: dict[str, list[str]] = {}
    for state in STATES:
        for item in spool.items(state):
            seen[f"{state}/{item.name}"] = sorted(assert_whole_instances(item.path))
    return seen


def test_publish_survives_kill_at_every_step(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    sop = f"{SERIES}.7"

    def scenario() -> None:
        with Worker(Spool(root), "receive") as worker:
            receive_instance(worker, SERIES, sop)

    def check(step: int) -> None:
        spool = Spool(root)
        group = root / INCOMING / SERIES
        # Torn files never show; a .dcm may be published before its .tags, never the reverse.
        present = sorted(p.name for p in group.iterdir()) if group.exists() else []
        assert present in ([], [f"{sop}.dcm"], [f"{sop}.dcm", f"{sop}.tags"]), (step, present)
        if group.exists():
            assert_whole_instances(group)
        recover(spool, tmp_grace=0)
        _assert_nothing_left_behind(spool)

    steps = run_until_done(scenario, check, setup=lambda: _fresh_spool(root, with_series=False))
    assert steps > 10


def test_claim_and_move_survive_kill_at_every_step(tmp_path: Path) -> None:
    root = tmp_path / "spool"

    def scenario() -> None:
        with Worker(Spool(root), "route") as worker:
            claim = worker.claim(INCOMING, SERIES)
            assert claim is not None
            claim.move_to(DISCARD, "batch-1")

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        seen = _visible_instances(spool)
        assert seen in (
            {f"incoming/{SERIES}": sorted(INSTANCES)},
            {"discard/batch-1": sorted(INSTANCES)},
        ), (step, seen)
        _assert_nothing_left_behind(spool)

    run_until_done(scenario, check, setup=lambda: _fresh_spool(root, with_series=True))


def test_transaction_is_all_or_nothing_at_every_step(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    jobs = ("job-pacs", "job-ai")

    def scenario() -> None:
        with Worker(Spool(root), "route") as worker:
            claim = worker.claim(INCOMING, SERIES)
            assert claim is not None
            tx = claim.transaction()
            for job in jobs:
                path = tx.new_item(OUTGOING, job)
                link_instances(claim.path, path)
                write_json(path / "job.json", {"target": {"name": job}})
            tx.commit()

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        seen = _visible_instances(spool)
        routed = {f"outgoing/{job}": sorted(INSTANCES) for job in jobs}
        assert seen in ({f"incoming/{SERIES}": sorted(INSTANCES)}, routed), (step, seen)
        for item in spool.items(OUTGOING):
            assert json.loads((item.path / "job.json").read_text())["target"]["name"] == item.name
        _assert_nothing_left_behind(spool)

    steps = run_until_done(scenario, check, setup=lambda: _fresh_spool(root, with_series=True))
    assert steps > 30


def test_recovery_itself_survives_kill_at_every_step(tmp_path: Path) -> None:
    """A recoverer killed mid-recovery leaves work the next recoverer finishes."""
    root = tmp_path / "spool"

    def setup() -> None:
        spool = _fresh_spool(root, with_series=True)
        # A dead router that had committed half of its transaction.
        worker = Worker(spool, "route")
        worker.start()
        claim = worker.claim(INCOMING, SERIES)
        assert claim is not None
        tx = claim.transaction()
        path = tx.new_item(OUTGOING, "job-1")
        link_instances(claim.path, path)
        tx.commit()
        # Simulate the owner's death after commit: put the committed work back as it was
        # right after `out.tmp` -> `out`, then drop the lease lock without cleaning up.
        shutil.copytree(root / OUTGOING / "job-1", claim.key_dir / "out" / OUTGOING / "job-1")
        shutil.rmtree(root / OUTGOING / "job-1")
        shutil.copytree(claim.key_dir / "out" / OUTGOING / "job-1", claim.key_dir / "item")
        assert worker._lease_fd is not None
        import os

        os.close(worker._lease_fd)

    def scenario() -> None:
        recover(Spool(root), tmp_grace=0)

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        assert _visible_instances(spool) == {"outgoing/job-1": sorted(INSTANCES)}, step
        _assert_nothing_left_behind(spool)

    run_until_done(scenario, check, setup=setup)
