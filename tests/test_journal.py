"""The receive journal (mercli.spool.journal, mercli.receive.journaled): records, torn records,
generations, checkpoints, replay, and `kill -9` at every step of appending and publishing:
every acknowledged instance ends up whole in incoming/ after recovery, nothing else does."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mercli import fsutil
from mercli.receive import journaled
from mercli.receive.journaled import Appender, Journal
from mercli.spool import Spool, Worker, recover
from mercli.spool.journal import (
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    SEGMENT_SIZE,
    RecordWriter,
    Segment,
    ensure_folder,
    replay,
    segment_files,
)
from mercli.tags import read_tags
from tests.dicomfiles import make_instance

SERIES = "1.2.77"


def instances(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_instance(folder, series=SERIES, number=n) for n in range(count)]


def append(segment: Segment, offset: int, path: Path) -> tuple[int, str]:
    """Journal one instance file; (the next record's offset, its name)."""
    writer = RecordWriter(segment, offset)
    data = path.read_bytes()
    writer.write(data[: len(data) // 2])
    writer.write(data[len(data) // 2 :])
    sidecar = read_tags(path)
    record = writer.commit(SERIES, path.stem, sidecar)
    return record.end, path.stem


def incoming(spool: Spool) -> dict[str, bytes]:
    group = spool.state_dir("incoming") / SERIES
    return {p.stem: p.read_bytes() for p in group.glob("*.dcm")} if group.is_dir() else {}


def journal_of(spool: Spool, owner: str) -> Segment:
    folder = ensure_folder(spool.root, owner)
    return Segment.create(folder / "000001.seg")


def test_records_replay_into_incoming_whole(tmp_path: Path, spool: Spool) -> None:
    files = instances(tmp_path / "src", 5)
    segment = journal_of(spool, "dead-receiver")
    assert segment.size == SEGMENT_SIZE
    offset = HEADER_SIZE
    for path in files:
        offset, _ = append(segment, offset, path)
    assert [r.name for r in segment.records()] == [p.stem for p in files]
    segment.close()
    assert replay(spool, "dead-receiver") == 5
    assert incoming(spool) == {p.stem: p.read_bytes() for p in files}
    group = spool.state_dir("incoming") / SERIES
    for path in files:
        sidecar = json.loads((group / f"{path.stem}.tags").read_text())
        assert sidecar == read_tags(path)
    assert not (spool.root / "journal" / "dead-receiver").exists()


@pytest.mark.parametrize("renamed", ["nothing", "the .dcm", "both"])
def test_a_large_instance_killed_between_its_two_renames_gets_its_sidecar(
    tmp_path: Path, spool: Spool, renamed: str
) -> None:
    """An instance past 256 KiB is a file of its own, named in its record; publishing renames
    it into its group, then its sidecar. A kill between the two left a `.dcm` without its
    `.tags` (seen once in CI): replay must publish the sidecar, not take the instance as done."""
    (tmp_path / "src").mkdir()
    path = make_instance(tmp_path / "src", series=SERIES, number=1, rows=512, columns=512)
    own = tmp_path / "own.dcm"  # the receiver's own file for it (written and synced)
    own.write_bytes(path.read_bytes())
    segment = journal_of(spool, "dead-receiver")
    record = RecordWriter(segment, HEADER_SIZE).commit(
        SERIES, path.stem, read_tags(path), file=str(own)
    )
    assert record.file == str(own)
    segment.close()
    group = spool.state_dir("incoming") / SERIES
    if renamed != "nothing":
        group.mkdir(parents=True)
        own.rename(group / f"{path.stem}.dcm")
    if renamed == "both":
        (group / f"{path.stem}.tags").write_text(json.dumps(read_tags(path)))
    replay(spool, "dead-receiver")
    assert incoming(spool) == {path.stem: path.read_bytes()}
    assert json.loads((group / f"{path.stem}.tags").read_text()) == read_tags(path)
    assert not own.exists()


@pytest.mark.parametrize("damage", ["flip a data byte", "no header", "short data", "meta"])
def test_a_torn_record_ends_the_valid_prefix(tmp_path: Path, spool: Spool, damage: str) -> None:
    files = instances(tmp_path / "src", 4)
    segment = journal_of(spool, "dead")
    offsets = [HEADER_SIZE]
    for path in files:
        offsets.append(append(segment, offsets[-1], path)[0])
    torn = offsets[2]  # the third record
    data_start = torn + RECORD_HEADER_SIZE
    if damage == "flip a data byte":
        byte = os.pread(segment.fd, 1, data_start + 200)
        os.pwrite(segment.fd, bytes([byte[0] ^ 0xFF]), data_start + 200)
    elif damage == "no header":
        os.pwrite(segment.fd, bytes(RECORD_HEADER_SIZE), torn)
    elif damage == "short data":
        os.pwrite(segment.fd, bytes(100), data_start + 300)
    else:
        os.pwrite(segment.fd, b"}", offsets[3] - 9)  # inside the meta JSON
    assert [r.name for r in segment.records()] == [p.stem for p in files[:2]]
    segment.close()
    assert replay(spool, "dead") == 2
    assert sorted(incoming(spool)) == sorted(p.stem for p in files[:2])


def test_an_earlier_generation_and_the_checkpoint_are_not_replayed(
    tmp_path: Path, spool: Spool
) -> None:
    files = instances(tmp_path / "src", 4)
    segment = journal_of(spool, "dead")
    offset, _ = append(segment, HEADER_SIZE, files[0])
    segment.reset()  # reused: the old record must not come back
    assert list(segment.records()) == []
    offset = HEADER_SIZE
    for path in files[1:]:
        offset, _ = append(segment, offset, path)
    first = next(segment.records())
    segment.set_checkpoint(first.end)  # the first of them is published already
    segment.close()
    assert replay(spool, "dead") == 2
    assert sorted(incoming(spool)) == sorted(p.stem for p in files[2:])


def test_recovery_replays_the_journal_of_a_dead_receiver(tmp_path: Path, spool: Spool) -> None:
    files = instances(tmp_path / "src", 3)
    script = f"""
import os, sys
from pathlib import Path
from mercli.spool import Spool, Worker
from mercli.spool.journal import HEADER_SIZE, RecordWriter, Segment, ensure_folder
from mercli.tags import read_tags
spool = Spool({str(spool.root)!r})
worker = Worker(spool, "receive").__enter__()
segment = Segment.create(ensure_folder(spool.root, worker.id) / "000001.seg")
offset = HEADER_SIZE
for name in sys.argv[1:]:
    writer = RecordWriter(segment, offset)
    writer.write(Path(name).read_bytes())
    offset = writer.commit({SERIES!r}, Path(name).stem, read_tags(name)).end
os.kill(os.getpid(), 9)
"""
    child = subprocess.run([sys.executable, "-c", script, *map(str, files)], check=False)
    assert child.returncode == -9
    assert incoming(spool) == {}
    report = recover(spool)
    assert report.replayed == 3 and len(report.owners) == 1
    assert incoming(spool) == {p.stem: p.read_bytes() for p in files}
    assert segment_files(spool.root / "journal" / report.owners[0]) == []


# -- kill -9 at every step ------------------------------------------------------------------------

CHILD = """
import os, sys, threading, time
from pathlib import Path
from mercli.receive.journaled import Appender, Journal
from mercli.spool import Spool, Worker
from mercli.tags import read_tags

import mercli.fsutil

target, after, thread = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = {"n": 0}
owner = mercli.fsutil if target == "_syncfs" else os  # syncfs is called through ctypes
real = getattr(owner, target)

def dying(*args, **kwargs):
    if threading.current_thread().name.startswith(thread):  # receiving, publishing, syncing
        calls["n"] += 1
        if calls["n"] == after:
            os._exit(9)  # as kill -9: no clean-up of any kind
    return real(*args, **kwargs)

setattr(owner, target, dying)
spool = Spool(sys.argv[4])
worker = Worker(spool, "receive").__enter__()
journal = Journal(spool, worker)
while journal._spares.qsize() < 1:  # a segment made ahead, as in a running receiver
    time.sleep(0.01)
appender = Appender()
for name in sys.argv[5:]:
    writer = journal.writer(appender)
    writer.write(Path(name).read_bytes())
    record = writer.commit("SERIES_UID", Path(name).stem, read_tags(name))
    journal.committed(appender, record)
    print("acked", Path(name).stem, "whole", flush=True)
journal.ended(appender, lambda: None)
journal.close()
worker.__exit__(None, None, None)
print("done", flush=True)
""".replace("SERIES_UID", SERIES)


RECEIVING, PUBLISHING = "MainThread", "journal-publish"
NEEDS_SYNCFS = pytest.mark.skipif(
    fsutil._syncfs is None or not fsutil._kernel_at_least(5, 8),
    reason="the publisher fsyncs each file where syncfs does not report errors (Linux < 5.8)",
)


@pytest.mark.parametrize(
    ("target", "after", "thread", "acked"),
    [
        # appending: 3 writes a record (data, meta, header), then its fdatasync
        ("pwrite", 1, RECEIVING, 0),  # the first data write
        ("pwrite", 3, RECEIVING, 0),  # the first header: written, not yet durable
        ("pwrite", 4, RECEIVING, 1),
        ("pwrite", 9, RECEIVING, 2),
        ("fdatasync", 1, RECEIVING, 0),  # a commit: written, not durable, not acknowledged
        ("fdatasync", 3, RECEIVING, 2),
        # publishing, behind the acknowledgements
        ("copy_file_range", 1, PUBLISHING, None),  # the first instance file being written
        ("copy_file_range", 4, PUBLISHING, None),
        ("rename", 1, PUBLISHING, None),  # a .dcm renamed into its group, its .tags not yet
        ("rename", 4, PUBLISHING, None),
        pytest.param("_syncfs", 1, PUBLISHING, None, marks=NEEDS_SYNCFS),  # the batch's files
        pytest.param("fsync", 1, PUBLISHING, None, marks=NEEDS_SYNCFS),  # the flush after it
        pytest.param("fsync", 2, PUBLISHING, None, marks=NEEDS_SYNCFS),  # incoming/, new folder
        pytest.param("_syncfs", 2, PUBLISHING, None, marks=NEEDS_SYNCFS),  # renamed: folders
        pytest.param("fsync", 3, PUBLISHING, None, marks=NEEDS_SYNCFS),  # the flush after that
        ("pwrite", 1, PUBLISHING, None),  # a checkpoint
        ("fdatasync", 1, PUBLISHING, None),  # a segment's reset
    ],
)
def test_kill_9_at_every_step_loses_no_acknowledged_instance(
    tmp_path: Path, spool: Spool, target: str, after: int, thread: str, acked: int | None
) -> None:
    files = instances(tmp_path / "src", 6)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, target, str(after), thread, str(spool.root)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # a line cut short by the kill is no acknowledgement of its name (printed after it)
    lines = [line.split() for line in child.stdout.splitlines()]
    names = [words[1] for words in lines if words[:1] == ["acked"] and words[2:] == ["whole"]]
    assert child.returncode == 9, (child.returncode, child.stderr)  # killed where it should be
    if acked is not None:
        assert len(names) == acked, names
    recover(spool)
    stored = incoming(spool)
    sources = {p.stem: p.read_bytes() for p in files}
    for name in names:  # every acknowledged instance, whole
        assert stored.get(name) == sources[name], name
    for name, data in stored.items():  # and nothing torn
        assert data == sources[name]
    group = spool.state_dir("incoming") / SERIES
    for name in stored:
        assert json.loads((group / f"{name}.tags").read_text())["SOPInstanceUID"]
    assert not [p for p in (spool.root / "journal").glob("*/*.seg")]  # replayed and gone
    assert [p for p in spool.tmp.rglob("*") if p.is_file()] == []


def test_a_receiver_stopping_cleanly_publishes_everything_and_keeps_spares(
    tmp_path: Path, spool: Spool
) -> None:
    files = instances(tmp_path / "src", 3)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, "getpid", "1000", RECEIVING, str(spool.root)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0 and child.stdout.count("acked") == 3, child.stderr
    assert incoming(spool) == {p.stem: p.read_bytes() for p in files}
    spares = list((spool.root / "journal" / "spare").glob("*.seg"))
    assert spares and [p.name for p in (spool.root / "journal").iterdir()] == ["spare"]
    with Worker(spool, "receive") as worker:  # the next receiver takes them
        from mercli.receive.journaled import Journal

        journal = Journal(spool, worker)
        journal.close()
    assert len(list((spool.root / "journal" / "spare").glob("*.seg"))) == len(spares)


# -- when the publisher publishes -----------------------------------------------------------------


@contextlib.contextmanager
def _running_journal(spool: Spool) -> Iterator[tuple[Journal, Appender]]:
    """A receiver's journal in this process, closed (publishing what it holds) on leaving."""
    with Worker(spool, "receive") as worker:
        journal = Journal(spool, worker)
        try:
            yield journal, Appender()
        finally:
            journal.close()


def _ack(journal: Journal, appender: Appender, path: Path) -> None:
    writer = journal.writer(appender)
    writer.write(path.read_bytes())
    record = writer.commit(SERIES, path.stem, read_tags(path))
    journal.committed(appender, record)


def _wait_for(predicate: Callable[[], bool], seconds: float) -> float:
    """Seconds until predicate() held; AssertionError after `seconds`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - start


Policy = Callable[..., None]


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Policy:
    """The publishing policy's thresholds, set per test."""

    def set_policy(quiet: float, lag: float, backlog: int) -> None:
        monkeypatch.setattr(journaled, "QUIET", quiet)
        monkeypatch.setattr(journaled, "MAX_LAG", lag)
        monkeypatch.setattr(journaled, "MAX_BACKLOG", backlog)

    return set_policy


def test_a_burst_is_published_once_its_association_pauses(
    tmp_path: Path, spool: Spool, held: Policy
) -> None:
    """Publishing waits while instances keep coming (its writes would queue ahead of each
    acknowledgement's fdatasync), then publishes all of them."""
    held(quiet=3.0, lag=60.0, backlog=1000)
    files = instances(tmp_path / "src", 5)
    with _running_journal(spool) as (journal, appender):
        for path in files:
            _ack(journal, appender, path)
        assert incoming(spool) == {}  # held: the last record came a moment ago
        waited = _wait_for(lambda: len(incoming(spool)) == 5, 30)
        assert waited > 0.5  # not before the pause
        assert incoming(spool) == {p.stem: p.read_bytes() for p in files}


def test_a_steady_stream_is_published_no_later_than_max_lag(
    tmp_path: Path, spool: Spool, held: Policy
) -> None:
    """An association that never pauses still sees its instances published: the oldest held
    record waits MAX_LAG at most."""
    held(quiet=30.0, lag=0.3, backlog=1000)
    files = instances(tmp_path / "src", 40)
    with _running_journal(spool) as (journal, appender):
        published_while_streaming = 0
        for path in files:  # one every 50 ms: never quiet for 30 s
            _ack(journal, appender, path)
            time.sleep(0.05)
            published_while_streaming = len(incoming(spool))
        assert published_while_streaming >= 1, published_while_streaming
    assert len(incoming(spool)) == 40


def test_a_large_backlog_is_published_without_waiting(
    tmp_path: Path, spool: Spool, held: Policy
) -> None:
    held(quiet=30.0, lag=30.0, backlog=4)
    files = instances(tmp_path / "src", 6)
    with _running_journal(spool) as (journal, appender):
        for path in files:
            _ack(journal, appender, path)
        _wait_for(lambda: len(incoming(spool)) >= 4, 10)


def test_stopping_publishes_what_is_held_at_once(
    tmp_path: Path, spool: Spool, held: Policy
) -> None:
    held(quiet=30.0, lag=30.0, backlog=1000)
    files = instances(tmp_path / "src", 3)
    with _running_journal(spool) as (journal, appender):
        for path in files:
            _ack(journal, appender, path)
        start = time.monotonic()
    assert time.monotonic() - start < 10  # leaving closes the journal
    assert incoming(spool) == {p.stem: p.read_bytes() for p in files}


def test_a_full_segment_waiting_to_be_published_counts_as_a_spare(
    tmp_path: Path, spool: Spool, held: Policy
) -> None:
    """While its records are held, a sealed segment will be a spare again: no new segment is
    made for it (each costs 16 MiB of zeros written while instances arrive)."""
    held(quiet=30.0, lag=30.0, backlog=1000)
    files = instances(tmp_path / "src", 2)
    with _running_journal(spool) as (journal, appender):
        folder = spool.root / "journal" / journal.worker.id
        _wait_for(lambda: journal._spares.qsize() == 2, 30)
        _ack(journal, appender, files[0])
        journal.roll(appender)  # full: sealed, its record held
        _ack(journal, appender, files[1])  # the second spare
        _wait_for(lambda: len(list(folder.glob("*.seg"))) >= 3, 30)  # made for the first take
        time.sleep(1.0)  # the maker looks every 50 ms
        # one spare ready, and the sealed one coming back stands in for the second
        assert len(list(folder.glob("*.seg"))) == 3
        assert incoming(spool) == {}  # one full segment held: not yet published
    assert len(incoming(spool)) == 2


def test_the_hold_ends_when_full_segments_wait(tmp_path: Path, spool: Spool, held: Policy) -> None:
    """Instances of 100-256 KB fill a segment in a fraction of a second: once SPARES full
    segments wait, they are published (and come back) without waiting for a pause."""
    held(quiet=30.0, lag=30.0, backlog=1000)
    files = instances(tmp_path / "src", 2)
    with _running_journal(spool) as (journal, appender):
        for path in files:
            _ack(journal, appender, path)
            journal.roll(appender)  # full
        _wait_for(lambda: len(incoming(spool)) == 2, 30)


@NEEDS_SYNCFS
def test_a_failed_syncfs_moves_no_checkpoint_and_is_retried(
    tmp_path: Path, spool: Spool, held: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """syncfs reporting a write error fails the round: no checkpoint moves (the records stay
    acknowledged in the journal), the round is tried again, the instances arrive whole. And a
    checkpoint only ever follows both rounds of syncs."""
    import ctypes
    import errno

    from mercli.spool import journal as journal_module

    held(quiet=0.01, lag=30.0, backlog=1000)
    steps: list[str] = []
    real_syncfs = fsutil._syncfs

    def syncfs(fd: int) -> int:
        if not steps:
            steps.append("syncfs failed")
            ctypes.set_errno(errno.EIO)
            return -1
        steps.append("syncfs")
        return int(real_syncfs(fd))

    real_checkpoint = journal_module.Segment.set_checkpoint

    def set_checkpoint(segment: Segment, offset: int) -> None:
        steps.append("checkpoint")
        real_checkpoint(segment, offset)

    monkeypatch.setattr(fsutil, "_syncfs", syncfs)
    monkeypatch.setattr(journal_module.Segment, "set_checkpoint", set_checkpoint)
    files = instances(tmp_path / "src", 3)
    with _running_journal(spool) as (journal, appender):
        for path in files:
            _ack(journal, appender, path)
        _wait_for(lambda: "checkpoint" in steps, 20)
    assert steps[0] == "syncfs failed"
    assert steps[1:4] == ["syncfs", "syncfs", "checkpoint"], steps
    assert incoming(spool) == {p.stem: p.read_bytes() for p in files}


def test_a_locked_series_is_tried_once_a_round(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series locked by another process (SPEC §3 step 6) defers all its records of the round
    after one try of its lock: trying it for each record stalled the publisher LOCK_WAIT per
    record, and every other series behind it."""
    import fcntl

    from mercli.spool.journal import publish

    files = instances(tmp_path / "src", 5)
    (tmp_path / "other").mkdir()
    other = make_instance(tmp_path / "other", series="1.2.78", number=1)
    segment = journal_of(spool, "receiver")
    offset, records = HEADER_SIZE, []
    for path in [*files, other]:
        writer = RecordWriter(segment, offset)
        writer.write(path.read_bytes())
        sidecar = read_tags(path)
        record = writer.commit(str(sidecar["SeriesInstanceUID"]), path.stem, sidecar)
        records.append(record)
        offset = record.end
    group = spool.state_dir("incoming") / SERIES
    group.mkdir(parents=True)
    tries: list[str] = []
    real = Spool.publish_to_group

    def counting(self: Spool, state: str, name: str, *args: object, **kwargs: object) -> bool:
        tries.append(name)
        return real(self, state, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Spool, "publish_to_group", counting)
    blocker = os.open(group, os.O_RDONLY)
    fcntl.flock(blocker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    scratch = spool.tmp / "receiver"
    scratch.mkdir(parents=True)
    try:
        deferred = publish(spool, records, scratch, wait=0.2)
    finally:
        os.close(blocker)
    assert [r.name for r in deferred] == [p.stem for p in files]
    assert tries.count(SERIES) == 1 and tries.count("1.2.78") == 1
    assert incoming(spool) == {}
    assert (spool.state_dir("incoming") / "1.2.78" / f"{other.stem}.dcm").exists()
    assert publish(spool, deferred, scratch, wait=0.2) == []  # the lock is gone
    assert incoming(spool) == {p.stem: p.read_bytes() for p in files}
    segment.close()
