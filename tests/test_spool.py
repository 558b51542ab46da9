"""The spool primitives on real files: publish, claim, release, move, transaction, recovery."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mercli.errors import SpoolError
from mercli.fsutil import rename_noreplace, write_new
from mercli.spool import (
    DISCARD,
    ERROR,
    INCOMING,
    OUTGOING,
    STATES,
    LockTimeout,
    NotRegularFile,
    Spool,
    Worker,
    lease_is_held,
    lease_state,
    link_instances,
    recover,
    write_json,
)
from mercli.spool import items as spool_items
from mercli.status import collect_status
from tests.spoolkit import assert_whole_instances, payload, receive_instance


def test_open_creates_layout(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "new" / "spool")
    for name in (*STATES, "tmp", "leases", "claims", "events"):
        assert (spool.root / name).is_dir()
    Spool.open(spool.root)  # idempotent


def test_open_rejects_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpoolError, match="not a directory"):
        Spool.open(tmp_path / "f")


def test_open_rejects_spool_spanning_filesystems(tmp_path: Path) -> None:
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("this test needs /dev/shm on another filesystem than tmp_path")
    elsewhere = Path("/dev/shm") / f"mercli-test-{os.getpid()}"
    elsewhere.mkdir()
    try:
        (tmp_path / "spool").mkdir()
        (tmp_path / "spool" / "tmp").symlink_to(elsewhere)
        with pytest.raises(SpoolError, match="several filesystems"):
            Spool.open(tmp_path / "spool")
    finally:
        os.rmdir(elsewhere)


def test_rename_noreplace_never_clobbers(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()  # plain rename(2) would replace an empty directory
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "d1", tmp_path / "d2")
    assert (tmp_path / "b").read_text() == "b"


def test_publish_to_group_and_duplicate_replaces(spool: Spool) -> None:
    with Worker(spool, "receive") as worker:
        receive_instance(worker, "1.2.3", "1.2.3.1")
        receive_instance(worker, "1.2.3", "1.2.3.2")
        dcm = worker.tmp_path()
        write_new(dcm, b"newer copy")
        replaced = spool.publish_to_group(INCOMING, "1.2.3", [(dcm, "1.2.3.1.dcm")])
        assert list(worker.scratch.iterdir()) == []
    assert replaced
    group = spool.root / INCOMING / "1.2.3"
    assert (group / "1.2.3.1.dcm").read_bytes() == b"newer copy"
    assert sorted(p.name for p in group.iterdir()) == [
        "1.2.3.1.dcm",
        "1.2.3.1.tags",
        "1.2.3.2.dcm",
        "1.2.3.2.tags",
    ]


def test_claim_is_exclusive(spool: Spool) -> None:
    with Worker(spool, "a") as a, Worker(spool, "b") as b:
        receive_instance(a, "1.2", "1.2.1")
        first = a.claim(INCOMING, "1.2")
        assert first is not None
        assert b.claim(INCOMING, "1.2") is None
        assert a.claim(INCOMING, "1.2") is None
        assert spool.items(INCOMING) == []
        assert [i.name for i in spool.claimed(INCOMING)] == ["1.2"]
        first.release()
        assert [i.name for i in spool.items(INCOMING)] == ["1.2"]
        assert spool.claimed() == []


def test_move_to_another_state(spool: Spool) -> None:
    with Worker(spool, "route") as worker:
        receive_instance(worker, "1.2", "1.2.1")
        claim = worker.claim(INCOMING, "1.2")
        assert claim is not None
        item = claim.move_to(DISCARD, "d1")
    assert item.path == spool.root / DISCARD / "d1"
    assert assert_whole_instances(item.path) == {"1.2.1"}
    assert spool.claimed() == [] and spool.items(INCOMING) == []


def test_transaction_fans_out_with_hard_links(spool: Spool) -> None:
    with Worker(spool, "route") as worker:
        for n in range(3):
            receive_instance(worker, "1.2", f"1.2.{n}")
        claim = worker.claim(INCOMING, "1.2")
        assert claim is not None
        tx = claim.transaction()
        for job in ("job-a", "job-b"):
            path = tx.new_item(OUTGOING, job)
            assert link_instances(claim.path, path) == 3
            write_json(path / "job.json", {"target": {"name": job}})
        published = tx.commit()
    assert sorted(i.name for i in published) == ["job-a", "job-b"]
    a, b = (spool.root / OUTGOING / j / "1.2.0.dcm" for j in ("job-a", "job-b"))
    assert a.stat().st_ino == b.stat().st_ino  # one copy of the pixel data
    assert a.stat().st_nlink == 2  # the claimed batch is gone
    assert spool.items(INCOMING) == [] and spool.claimed() == []


def test_quarantine_records_the_reason(spool: Spool) -> None:
    with Worker(spool, "dispatch") as worker:
        (spool.root / OUTGOING / "j1").mkdir()
        claim = worker.claim(OUTGOING, "j1")
        assert claim is not None
        item = claim.quarantine("association rejected by PACS", attempts=5)
    record = json.loads((item.path / "error.json").read_text())
    assert item.state == ERROR
    assert record["reason"] == "association rejected by PACS"
    assert record["from"] == OUTGOING and record["attempts"] == 5


def test_release_merges_into_a_newer_group(spool: Spool) -> None:
    """An instance received while its series was claimed is kept; a later duplicate wins."""
    with Worker(spool, "route") as router, Worker(spool, "receive") as receiver:
        receive_instance(receiver, "1.2", "1.2.1")
        receive_instance(receiver, "1.2", "1.2.2")
        claim = router.claim(INCOMING, "1.2")
        assert claim is not None
        receive_instance(receiver, "1.2", "1.2.3")  # arrives during routing: a new group
        dcm = receiver.tmp_path()
        write_new(dcm, payload("1.2.2"))
        tags = receiver.tmp_path()
        write_new(tags, payload("1.2.2.tags", 200))
        spool.publish_to_group(INCOMING, "1.2", [(dcm, "1.2.2.dcm"), (tags, "1.2.2.tags")])
        claim.release()
    group = spool.root / INCOMING / "1.2"
    assert assert_whole_instances(group) == {"1.2.1", "1.2.2", "1.2.3"}
    assert len(list(group.iterdir())) == 6
    events = [e["event"] for e in spool.events.read()]
    assert "duplicate_dropped" in events


def _claim_and_die(root: str, state: str, name: str) -> None:
    worker = Worker(Spool(root), "doomed")
    worker.start()
    claim = worker.claim(state, name)
    assert claim is not None
    os._exit(0)  # dies holding the claim, like kill -9: no cleanup runs


def test_dead_workers_claims_are_recovered(spool: Spool) -> None:
    with Worker(spool, "receive") as receiver:
        receive_instance(receiver, "1.2", "1.2.1")
    process = multiprocessing.get_context("fork").Process(
        target=_claim_and_die, args=(str(spool.root), INCOMING, "1.2")
    )
    process.start()
    process.join()
    assert spool.items(INCOMING) == [] and len(spool.claimed()) == 1
    report = recover(spool)
    assert report.released == [(INCOMING, "1.2")]
    assert assert_whole_instances(spool.root / INCOMING / "1.2") == {"1.2.1"}
    assert list(spool.leases.iterdir()) == [] and list(spool.claims.iterdir()) == []
    assert list(spool.tmp.iterdir()) == []
    assert recover(spool).owners == []  # nothing left to do


def test_recovery_leaves_live_workers_alone(spool: Spool) -> None:
    with Worker(spool, "busy") as worker:
        receive_instance(worker, "1.2", "1.2.1")
        claim = worker.claim(INCOMING, "1.2")
        report = recover(spool)
        assert report.owners == [] and report.released == []
        assert claim is not None and claim.path.is_dir()
        assert worker.scratch.is_dir()


def test_reaper_removes_stale_tmp_but_not_live_scratch(spool: Spool) -> None:
    stale = spool.tmp / "foreign-partial-write"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = spool.tmp / "fresh-partial-write"
    fresh.write_bytes(b"x")
    orphan_scratch = spool.tmp / "receive.host.1.dead"
    orphan_scratch.mkdir()
    (orphan_scratch / "half.dcm").write_bytes(b"half")
    with Worker(spool, "live") as worker:
        (worker.scratch / "in-progress").write_bytes(b"x")
        report = recover(spool, tmp_grace=3600)
        assert (worker.scratch / "in-progress").exists()
    assert report.reaped_tmp == 2
    assert not stale.exists() and not orphan_scratch.exists() and fresh.exists()


def _claim_many(root: str, names: list[str], queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    spool = Spool(root)
    got = []
    with Worker(spool, "racer") as worker:
        for name in names:
            claim = worker.claim(OUTGOING, name)
            if claim is not None:
                claim.move_to("success")
                got.append(name)
    queue.put(got)


def test_concurrent_claimers_take_each_item_once(spool: Spool) -> None:
    names = [f"job-{n:04d}" for n in range(300)]
    for name in names:
        (spool.root / OUTGOING / name).mkdir()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    racers = [
        context.Process(target=_claim_many, args=(str(spool.root), names, queue)) for _ in range(4)
    ]
    for racer in racers:
        racer.start()
    results = [queue.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join()
    claimed = [name for result in results for name in result]
    assert sorted(claimed) == names  # every job exactly once
    assert sorted(i.name for i in spool.items("success")) == names


def _publish_series(root: str, prefix: str, count: int) -> None:
    with Worker(Spool(root), "receive") as worker:
        for n in range(count):
            receive_instance(worker, "1.9", f"{prefix}.{n}", size=512)


def test_instances_arriving_during_claims_are_never_split_or_lost(spool: Spool) -> None:
    context = multiprocessing.get_context("fork")
    senders = [
        context.Process(target=_publish_series, args=(str(spool.root), f"1.9.{s}", 400))
        for s in range(2)
    ]
    for sender in senders:
        sender.start()
    batches = 0
    with Worker(spool, "route") as router:
        while any(s.is_alive() for s in senders) or spool.items(INCOMING):
            claim = router.claim(INCOMING, "1.9")
            if claim is not None:
                claim.move_to(DISCARD, f"batch-{batches:05d}")
                batches += 1
    for sender in senders:
        sender.join()
        assert sender.exitcode == 0
    seen: list[str] = []
    for batch in spool.items(DISCARD):
        files = sorted(p.name for p in batch.path.iterdir())
        stems = assert_whole_instances(batch.path, size=512)
        assert files == sorted([f"{s}.dcm" for s in stems] + [f"{s}.tags" for s in stems])
        seen += stems
    assert sorted(seen) == sorted(f"1.9.{s}.{n}" for s in range(2) for n in range(400))
    assert batches > 1, "the test should exercise claims racing with publishers"


# -- who may read the spool (SPEC §9) -------------------------------------------------------------


def loose_modes(root: Path) -> list[str]:
    """Everything under (and including) root that is not exactly 0640 (files) or 0750 (folders)."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        want = 0o750 if stat.S_ISDIR(mode) else 0o640
        if stat.S_IMODE(mode) & 0o777 != want:
            found.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(root)}")
    return found


def exercise(spool: Spool) -> None:
    """Every kind of write the spool makes: publish (as receive, and as receive's own 0644
    dataset file), hints, events, claims and transactions, quarantine, dispatch.json."""
    with Worker(spool, "receive") as receiver:
        receive_instance(receiver, "1.2", "1.2.1")
        dcm = receiver.tmp_path()
        os.close(os.open(dcm, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # as receive does
        tags = receiver.tmp_path()
        write_new(tags, payload("1.2.2.tags", 200))
        spool.publish_to_group(INCOMING, "1.2", [(dcm, "1.2.2.dcm"), (tags, "1.2.2.tags")])
        receiver.write_hint("1.2", {"sender": "CT"})
        bad = receiver.tmp_path()
        os.close(os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        receiver.quarantine_files({"instance.dcm": bad}, "unreadable", "receive")
    with Worker(spool, "route") as router:
        assert loose_modes(spool.root) == []  # the live lease, scratch and claims folders too
        claim = router.claim(INCOMING, "1.2")
        assert claim is not None
        transaction = claim.transaction()
        job = transaction.new_item(OUTGOING, "job-1")
        link_instances(claim.path, job)
        write_json(job / "job.json", {"id": "job-1"})
        transaction.commit()
        job_claim = router.claim(OUTGOING, "job-1")
        assert job_claim is not None
        router.replace_file(job_claim.path / "dispatch.json", b"{}")
        job_claim.quarantine("refused", target="pacs")


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize(
    "umask", [0o022, 0o077, 0o000, 0o002], ids=["022", "077", "000", "002"], indirect=True
)
def test_files_are_0640_and_folders_0750_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    spool = Spool.open(tmp_path / "spool")
    exercise(spool)
    assert len(spool.items(ERROR)) == 2 and spool.events.read()
    assert loose_modes(spool.root) == []


def test_a_setgid_spool_gives_its_group_to_everything(tmp_path: Path) -> None:
    group = _foreign_group()
    root = tmp_path / "spool"
    root.mkdir()
    os.chown(root, -1, group)
    os.chmod(root, 0o2750)
    spool = Spool.open(root)
    exercise(spool)
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        assert info.st_gid == group, path
        if stat.S_ISDIR(info.st_mode):
            assert info.st_mode & stat.S_ISGID, f"{path} lost the setgid bit"
    assert loose_modes(root) == []


def test_open_with_group_makes_an_existing_spool_setgid(tmp_path: Path) -> None:
    group = _foreign_group()
    Spool.open(tmp_path / "spool")  # made before, without a group
    spool = Spool.open(tmp_path / "spool", group=group)
    for folder in spool.layout():
        assert folder.stat().st_gid == group and folder.stat().st_mode & stat.S_ISGID, folder
    with Worker(spool, "receive") as worker:
        receive_instance(worker, "1.2", "1.2.1")
    assert {p.stat().st_gid for p in (spool.root / INCOMING).rglob("*")} == {group}
    with pytest.raises(SpoolError, match="no such group"):
        Spool.open(spool.root, group="no-such-group-mercli")


def test_open_takes_others_access_from_an_older_spools_folders(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    Spool.open(root)
    for name in ("incoming", "events"):
        os.chmod(root / name, 0o755)  # as an older mercli made them
    Spool.open(root)
    assert loose_modes(root) == []


def _foreign_group() -> int:
    """A group other than ours, that we may give files to."""
    if os.geteuid() == 0:
        return 65534
    others = [g for g in os.getgroups() if g != os.getegid()]
    if not others:
        pytest.skip("needs root or a supplementary group")
    return others[0]


# -- locks have deadlines (SPEC §9) ---------------------------------------------------------------


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(spool_items, "LOCK_DEADLINE", 0.5)
    return 0.5


def hold_lock(path: Path, operation: int = fcntl.LOCK_EX) -> int:
    """Another open file description holding a flock, as another process would."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, operation | fcntl.LOCK_NB)
    return fd


def test_a_series_locked_past_the_deadline_fails_publish_and_claim_in_time(
    spool: Spool, short_deadline: float
) -> None:
    with Worker(spool, "receive") as receiver, Worker(spool, "route") as router:
        receive_instance(receiver, "1.2", "1.2.1")
        blocker = hold_lock(spool.root / INCOMING / "1.2")
        try:
            started = time.monotonic()
            with pytest.raises(LockTimeout) as info:
                receive_instance(receiver, "1.2", "1.2.2")
            assert short_deadline <= time.monotonic() - started < short_deadline + 1
            assert isinstance(info.value, OSError)  # receive answers 0xA700 for any OSError
            started = time.monotonic()
            with pytest.raises(LockTimeout):
                router.claim(INCOMING, "1.2")
            assert time.monotonic() - started < short_deadline + 1
            assert spool.claimed() == [] and list(router.claims_dir.iterdir()) == []
        finally:
            os.close(blocker)
        receive_instance(receiver, "1.2", "1.2.2")  # the lock is gone: all is well again
        assert router.claim(INCOMING, "1.2") is not None
    assert assert_whole_instances(spool.root / INCOMING / "1.2") == {"1.2.1", "1.2.2"}


def test_a_release_blocked_past_the_deadline_is_left_to_recovery(
    spool: Spool, short_deadline: float
) -> None:
    with Worker(spool, "receive") as receiver:
        receive_instance(receiver, "1.2", "1.2.1")
        router = Worker(spool, "route")
        router.start()
        claim = router.claim(INCOMING, "1.2")
        assert claim is not None
        receive_instance(receiver, "1.2", "1.2.2")  # a newer group the claim must merge into
    blocker = hold_lock(spool.root / INCOMING / "1.2")
    try:
        with pytest.raises(LockTimeout):
            claim.release()
        router.stop()  # does not hang, does not raise: the claim waits for recovery
        assert recover(spool).released == []  # still locked: tried again next pass
        assert len(spool.claimed()) == 1
    finally:
        os.close(blocker)
    assert recover(spool).released == [(INCOMING, "1.2")]
    assert assert_whole_instances(spool.root / INCOMING / "1.2") == {"1.2.1", "1.2.2"}
    assert list(spool.leases.iterdir()) == [] and list(spool.claims.iterdir()) == []


@pytest.mark.parametrize("operation", [fcntl.LOCK_SH, fcntl.LOCK_EX], ids=["shared", "exclusive"])
def test_a_dead_workers_lease_locked_by_someone_else_is_live_for_recovery_and_status(
    spool: Spool, operation: int
) -> None:
    with Worker(spool, "receive") as receiver:
        receive_instance(receiver, "1.2", "1.2.1")
    process = multiprocessing.get_context("fork").Process(
        target=_claim_and_die, args=(str(spool.root), INCOMING, "1.2")
    )
    process.start()
    process.join()
    (lease,) = spool.leases.iterdir()
    blocker = hold_lock(lease, operation)
    try:
        assert recover(spool).released == []  # recovery cannot lock it: alive
        assert lease_is_held(lease) and lease_state(lease) == "stuck"
        assert collect_status(spool)["workers"] == {"live": 1, "dead": 0, "stuck": 1}
    finally:
        os.close(blocker)
    assert not lease_is_held(lease) and lease_state(lease) == "dead"
    assert collect_status(spool)["workers"] == {"live": 0, "dead": 1}
    assert recover(spool).released == [(INCOMING, "1.2")]
    with Worker(spool, "live") as worker:
        assert lease_state(spool.leases / worker.id) == "live"
        assert collect_status(spool)["workers"] == {"live": 1, "dead": 0}


# -- item files are plain files -------------------------------------------------------------------


def test_link_instances_refuses_symlinks(spool: Spool, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    source, destination = tmp_path / "item", tmp_path / "copy"
    source.mkdir()
    destination.mkdir()
    (source / "a.dcm").write_bytes(b"dicom")
    (source / "b.dcm").symlink_to(secret)
    with pytest.raises(NotRegularFile, match="symlink"):
        link_instances(source, destination)
    assert not (destination / "b.dcm").exists() and not (destination / "b.dcm").is_symlink()


def test_fsync_all_syncs_everything_and_reports_the_first_error(tmp_path: Path) -> None:
    from mercli.fsutil import fsync_all

    files = [tmp_path / f"{n}.json" for n in range(5)]
    for path in files:
        write_new(path, b"{}", sync=False)
    fsync_all(files, [tmp_path])  # several at once, from the pool
    fsync_all(files[:1])  # one: in this thread
    fsync_all(())
    with pytest.raises(FileNotFoundError):
        fsync_all([*files, tmp_path / "gone.json"], [tmp_path])
