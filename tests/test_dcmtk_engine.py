"""`mercli receive --engine dcmtk`: storescp + getdcmtags, against real senders on loopback."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from mercli.dicom.sender import Sender
from mercli.errors import ConfigError
from mercli.names import safe_name
from mercli.receive.dcmtk import engine
from mercli.receive.dcmtk.completeness import check_complete
from mercli.receive.dcmtk.engine import STORESCP_ENV, find_storescp
from mercli.receive.dcmtk.publisher import (
    PIPE_ROOM,
    HintBook,
    Publisher,
    RetryQueue,
    find_getdcmtags,
)
from mercli.receive.dcmtk.staging import StagingTracker, log_config, staged_order
from mercli.receive.handler import ReceiveConfig
from mercli.spool import Spool, Worker
from tests.dicomfiles import CORPUS, dataset_bytes, make_instance
from tests.kit import CT
from tests.netkit import DCMTK_ENV, Receiver, dcmtk, free_port, receiver, storescu, wait_until
from tests.test_receive import associate, stored

DCMTK = ("--engine", "dcmtk")
ROOT = "1.2.276.0.7230010.3.1.4.8323328"


def staged_name(pid: int, counter: int) -> str:
    return f"CT.X.{ROOT}.{pid}.1795835045.{counter}"


def sidecars(spool: Path) -> dict[str, dict[str, object]]:
    found = {}
    for tags in (spool / "incoming").glob("*/*.tags"):
        sidecar = json.loads(tags.read_text())
        sidecar.pop("ReceivedAt")
        found[f"{tags.parent.name}/{tags.name}"] = sidecar
    return found


def count_stored(spool: Path) -> int:
    return len(list((spool / "incoming").glob("*/*.tags")))


# -- the log tracker, on real files ---------------------------------------------------------------


def test_staged_names_carry_pid_and_order() -> None:
    assert staged_order(staged_name(4242, 17)) == (4242, 1795835045, 17)
    assert staged_order(f"UNKNOWN.X.{ROOT}.99.12") == (99, 12, 0)  # counter cut by the 64 limit
    assert staged_order("something-else.dcm") is None


def test_tracker_hands_out_only_what_the_log_proves_finished(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    tracker = StagingTracker(staging, "MERCLI")
    pid = 4_000_001  # above pid_max: never a live storescp
    lines = [
        f"{pid} Association Received: 10.1.2.3",
        f"{pid} Association Received in child process (pid: {pid})",
        f"{pid} Calling Application Name:    CT_SCANNER",
        f"{pid} Called Application Name:     ROUTER",
        f"{pid} Calling Application Name:    IGNORED",  # the A-ASSOCIATE-AC dump repeats it
    ]
    for line in lines:
        assert tracker.feed(line) == []
    assert tracker.feed(f"{pid} Received Store Request") == []
    (staging / staged_name(pid, 10)).write_bytes(b"one")
    assert tracker.feed(f"{pid} Received Store Request") == [
        (staging / staged_name(pid, 10), Sender("CT_SCANNER", "ROUTER", "10.1.2.3"))
    ]
    (staging / staged_name(pid, 11)).write_bytes(b"two, being written")
    assert tracker.feed(f"{pid} Store SCP Failed: disk full") == []
    (staging / staged_name(pid, 11)).unlink()  # storescp deletes what it could not write
    assert tracker.feed(f"{pid} Received Store Request") == []  # 3 stores, 1 failed, 1 handed
    (staging / staged_name(pid, 12)).write_bytes(b"three")
    (staging / staged_name(pid + 1, 1)).write_bytes(b"another child's")
    ready = tracker.feed(f"{pid} Association Release")
    assert [path.name for path, _ in ready] == [staged_name(pid, 12)]
    assert tracker.ended == (pid, "released", Sender("CT_SCANNER", "ROUTER", "10.1.2.3"))


def test_tracker_lists_staging_once_per_read_however_deep_the_backlog(tmp_path: Path) -> None:
    """Lines read together share one listing of staging/: with 600 files waiting, 301 store
    requests of one child cost one listing, not 301 (which grew with the square of a
    backlog), and hand out the child's first 300 files in order, none of the other child's."""
    staging = tmp_path / "staging"
    staging.mkdir()
    tracker = StagingTracker(staging, "MERCLI")
    pid, other = 4_000_003, 4_000_004
    for counter in range(300):
        (staging / staged_name(pid, counter)).write_bytes(b"x")
        (staging / staged_name(other, counter)).write_bytes(b"y")
    listings = 0
    real = tracker._staged

    def counting() -> dict[str, tuple[int, int, int] | None]:
        nonlocal listings
        listings += 1
        return real()

    tracker._staged = counting  # type: ignore[method-assign]
    handed: list[str] = []
    with tracker.one_listing():
        tracker.feed(f"{pid} Association Received: 10.0.0.9")
        for _ in range(301):
            handed += [path.name for path, _ in tracker.feed(f"{pid} Received Store Request")]
    assert listings == 1
    assert handed == [staged_name(pid, counter) for counter in range(300)]
    (staging / staged_name(pid, 300)).write_bytes(b"z")  # a later read lists again
    with tracker.one_listing():
        ready = tracker.feed(f"{pid} Association Release")
    assert listings == 2 and [path.name for path, _ in ready] == [staged_name(pid, 300)]


def test_tracker_sweep_takes_files_of_dead_children_once(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    tracker = StagingTracker(staging, "MERCLI")
    dead = 4_000_002
    (staging / staged_name(dead, 2)).write_bytes(b"b")
    (staging / staged_name(dead, 1)).write_bytes(b"a")
    (staging / "foreign.dcm").write_bytes(b"c")  # young foreign file: left for now
    swept = tracker.sweep()
    assert [path.name for path, _, _ in swept] == [staged_name(dead, 1), staged_name(dead, 2)]
    assert all(sender == Sender(called_aet="MERCLI") for _, sender, _ in swept)
    assert tracker.sweep() == []  # handed out already
    os.utime(staging / "foreign.dcm", (0, 0))
    assert [path.name for path, _, _ in tracker.sweep()] == ["foreign.dcm"]


def test_log_config_keeps_the_lines_the_tracker_reads() -> None:
    config = log_config()
    for text in ("Received Store Request", "Association Release", "Application Name:"):
        assert f"StringToMatch = {text}" in config
    assert "ConversionPattern = %i %p %m%n" in config and "LogLevelMin = WARN" in config


# -- completeness of files nobody saw finish ------------------------------------------------------


def test_whole_corpus_files_are_complete_and_cut_ones_are_not(tmp_path: Path) -> None:
    checked = 0
    for path in CORPUS:
        data = path.read_bytes()
        if data[128:132] != b"DICM" or "truncated" in path.name:
            continue
        assert check_complete(path) is None, path.name
        cut = tmp_path / "cut.dcm"
        deflated = b"1.2.840.10008.1.2.1.99" in data[:1024]  # 8 bytes past the zlib stream
        cut.write_bytes(data[: -64 if deflated else -1])
        assert check_complete(cut) is not None, path.name
        checked += 1
    assert checked > 60
    assert check_complete(CORPUS[0].parent / "rtplan_truncated.dcm") is not None


# -- the engine, end to end ------------------------------------------------------------


def test_storescu_series_land_with_sidecars_and_hints(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    files = [make_instance(source, series="1.2.3.4", number=n) for n in range(20)]
    spool = tmp_path / "spool"
    with receiver(spool, *DCMTK, host=None) as running:
        sent = storescu(running.port, files, "-aet", "CT_SCANNER")
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: Spool(spool).read_hint("1.2.3.4") is not None, what="hint")
        assert count_stored(spool) == 20  # the hint comes after the last instance
    group = spool / "incoming" / "1.2.3.4"
    for path in files:
        assert dataset_bytes(group / path.name) == dataset_bytes(path)
        sidecar = json.loads((group / path.name).with_suffix(".tags").read_text())
        assert sidecar["SenderAET"] == "CT_SCANNER" and sidecar["ReceiverAET"] == "MERCLI"
        assert sidecar["SenderAddress"] == "127.0.0.1"
        for published in (group / path.name, (group / path.name).with_suffix(".tags")):
            assert published.stat().st_mode & 0o777 == 0o640
    assert Spool(spool).read_hint("1.2.3.4")["ended"] == "released"  # type: ignore[index]
    assert list((spool / "staging").iterdir()) == []
    events = (spool / "events").glob("*.ndjson")
    lines = [json.loads(line) for file in events for line in file.read_text().splitlines()]
    assert sum(event["event"] == "received" for event in lines) == 20


@pytest.mark.parametrize(("cpus", "publishers"), [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (96, 4)])
def test_publishers_default_to_a_quarter_of_the_cpus(
    monkeypatch: pytest.MonkeyPatch, cpus: int, publishers: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert ReceiveConfig().publishers == publishers
    assert ReceiveConfig().listeners == min(cpus, 8)  # the default engine's: unchanged
    assert ReceiveConfig(processes=3).publishers == ReceiveConfig(processes=3).listeners == 3


@pytest.mark.parametrize("args", [(), ("--processes", "3")])
def test_engine_runs_as_many_getdcmtags_as_asked(tmp_path: Path, args: tuple[str, ...]) -> None:
    spool = tmp_path / "spool"
    wanted = int(args[1]) if args else ReceiveConfig().publishers

    def publishers() -> int:
        return sum(p.name.startswith("getdcmtags.") for p in (spool / "leases").iterdir())

    with receiver(spool, *DCMTK, *args, host=None):
        wait_until(lambda: publishers() >= wanted, what="getdcmtags leases")
        assert publishers() == wanted


def test_publisher_pipes_hold_thousands_of_lines(tmp_path: Path) -> None:
    """While getdcmtags waits in a long syncfs, the lines for it wait in its stdin pipe, not
    in mercli's loop (which must keep reading storescp's log)."""
    spool = Spool.open(tmp_path / "spool")
    most = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    with Worker(spool, "receive") as worker:
        publisher = Publisher(find_getdcmtags(), spool, 1, RetryQueue(), HintBook(spool, worker))
        try:
            [running] = publisher.workers
            assert running.process.stdin is not None
            size = fcntl.fcntl(running.process.stdin.fileno(), fcntl.F_GETPIPE_SZ)
            assert size >= min(PIPE_ROOM, most) > 64 * 1024
        finally:
            publisher.close()


def test_spool_equals_the_default_engines_for_the_corpus(tmp_path: Path) -> None:
    """The same storescu transmissions into both engines: the same files, bytes and sidecars."""
    spools = {engine: tmp_path / engine for engine in ("pynetdicom", "dcmtk")}
    sent = 0
    with (
        receiver(spools["pynetdicom"], "--processes", "1") as default,
        receiver(spools["dcmtk"], *DCMTK, host=None) as dcmtk_engine,
    ):
        for path in CORPUS:
            results = [storescu(r.port, [path]).returncode for r in (default, dcmtk_engine)]
            assert results[0] == results[1], path.name
            sent += results[0] == 0
        wait_until(
            lambda: count_stored(spools["dcmtk"]) == count_stored(spools["pynetdicom"]),
            what="dcmtk engine to publish",
        )
    assert sent > 30
    ours, theirs = sidecars(spools["pynetdicom"]), sidecars(spools["dcmtk"])
    assert ours.keys() == theirs.keys() and len(ours) > 20  # corpus files share UIDs
    for name, sidecar in ours.items():
        assert theirs[name] == sidecar, name
        a, b = (spools[e] / "incoming" / name for e in spools)
        assert dataset_bytes(a.with_suffix(".dcm")) == dataset_bytes(b.with_suffix(".dcm")), name


@pytest.mark.parametrize("hostile", ["../../../../tmp/escape", "1.2/../../3", ".."])
def test_hostile_uids_never_escape_the_spool(tmp_path: Path, hostile: str) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source, series=hostile, sop="1.2.3.4", study=hostile, filename="h.dcm")
    spool = tmp_path / "spool"
    before = set(tmp_path.parent.rglob("*escape*"))
    with receiver(spool, *DCMTK, host=None) as running:
        assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
        assert assoc.send_c_store(path).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        wait_until(lambda: count_stored(spool) == 1, what="publish")
    (target,) = stored(spool).values()
    assert target.parent == spool / "incoming" / safe_name(hostile)
    assert set(tmp_path.parent.rglob("*escape*")) == before


def test_unreadable_dataset_is_quarantined(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source, series="1.2.9", filename="nouids.dcm")
    ds = dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(path)
    spool = tmp_path / "spool"
    with receiver(spool, *DCMTK, host=None) as running:
        assert storescu(running.port, [path]).returncode == 0  # storescp acks first
        wait_until(lambda: any((spool / "error").iterdir()), what="quarantine")
    (item,) = (spool / "error").iterdir()
    reason = json.loads((item / "error.json").read_text())["reason"]
    assert "SeriesInstanceUID" in reason
    assert dataset_bytes(item / "instance.dcm") == dataset_bytes(path)


def test_staging_leftovers_are_published_or_quarantined_at_start(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    whole, cut = (make_instance(source, series="1.2.7", number=n) for n in (1, 2))
    spool = tmp_path / "spool"
    staging = spool / "staging"
    staging.mkdir(parents=True)
    (staging / staged_name(4_000_003, 1)).write_bytes(whole.read_bytes())
    (staging / staged_name(4_000_003, 2)).write_bytes(cut.read_bytes()[:-100])
    with receiver(spool, *DCMTK, host=None):
        wait_until(lambda: not any(staging.iterdir()), what="leftovers picked up")
    assert dataset_bytes(spool / "incoming" / "1.2.7" / whole.name) == dataset_bytes(whole)
    (item,) = (spool / "error").iterdir()
    assert "incomplete" in json.loads((item / "error.json").read_text())["reason"]


def test_kill_9_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    """mercli dies mid-association: what storescp acknowledged is published on the next start."""
    source = tmp_path / "source"
    source.mkdir()
    files = [
        make_instance(source, series="1.2.10", number=n, rows=64, columns=64) for n in range(150)
    ]
    spool = tmp_path / "spool"
    running = Receiver(spool, *DCMTK, host=None).start()
    assert running.process is not None
    assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
    acknowledged: list[Path] = []
    for n, path in enumerate(files):
        if n == 50:
            running.process.kill()
        status = assoc.send_c_store(dcmread(path))  # type: ignore[attr-defined]
        if status.get("Status") != 0x0000:
            break
        acknowledged.append(path)
    assoc.abort()  # type: ignore[attr-defined]
    running.process.wait(timeout=30)
    running.log_file.close()
    assert len(acknowledged) >= 50
    with receiver(spool, *DCMTK, host=None):
        group = spool / "incoming" / "1.2.10"
        wait_until(
            lambda: all((group / p.name).with_suffix(".tags").exists() for p in acknowledged),
            what="every acknowledged instance",
        )
    for path in acknowledged:
        assert dataset_bytes(group / path.name) == dataset_bytes(path)


def test_sigterm_lets_the_open_association_finish(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    files = [make_instance(source, series="1.2.11", number=n) for n in range(30)]
    spool = tmp_path / "spool"
    running = Receiver(spool, *DCMTK, host=None).start()
    assert running.process is not None
    assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
    for n, path in enumerate(files):
        if n == 10:
            running.process.send_signal(signal.SIGTERM)
        assert assoc.send_c_store(dcmread(path)).Status == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert running.process.wait(timeout=60) == 0
    running.log_file.close()
    assert count_stored(spool) == 30


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--allow-aet", "CT1"), "--allow-aet"),
        (("--host", "127.0.0.1"), "--host"),
        (("--extra-tag", "PatientWeight"), "--extra-tag"),
        (("--max-associations", "4"), "--max-associations"),  # storescp forks for every one
        (("--max-associations", "32"), "--max-associations"),  # the default, said explicitly
    ],
)
def test_what_storescp_cannot_do_is_refused(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mercli", "receive", "--spool", str(tmp_path), *DCMTK, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert needle in result.stderr and "Error:" in result.stderr


def test_port_in_use_exits_3(tmp_path: Path) -> None:
    port = free_port()
    blocker = subprocess.Popen(
        ["storescp", str(port)], env={**os.environ, "TCP_NODELAY": "1"}, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: dcmtk(["echoscu", "127.0.0.1", str(port)]).returncode == 0)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mercli",
                "receive",
                "--spool",
                str(tmp_path / "s"),
                *DCMTK,
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        blocker.terminate()
        blocker.wait()
    assert result.returncode == 3, result.stderr
    assert f"port {port}" in result.stderr


# -- which storescp: DCMTK's, not pynetdicom's app of the same name -------------------------------


def fake_storescp(folder: Path) -> Path:
    """A `storescp` that answers like pynetdicom's app (usage, exit 2) and notes each call."""
    folder.mkdir()
    path = folder / "storescp"
    calls = folder / "calls"
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'echo "usage: storescp [options] port" >&2\n'
        'echo "storescp: error: the following arguments are required: port" >&2\n'
        "exit 2\n"
    )
    path.chmod(0o755)
    return path


def fake_calls(fake: Path) -> list[str]:
    calls = fake.parent / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_a_foreign_storescp_first_on_path_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A venv's bin/ first on PATH holds pynetdicom's `storescp`: DCMTK's is used all the same."""
    fake = fake_storescp(tmp_path / "venv-bin")
    monkeypatch.setitem(DCMTK_ENV, "PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delitem(DCMTK_ENV, STORESCP_ENV, raising=False)
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source, series="1.2.12")
    spool = tmp_path / "spool"
    with receiver(spool, *DCMTK, host=None) as running:
        assert storescu(running.port, [path]).returncode == 0
        wait_until(lambda: count_stored(spool) == 1, what="publish")
    assert fake_calls(fake) == ["--version"]  # asked what it is, never started


def test_only_a_foreign_storescp_is_refused_naming_it_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_storescp(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.delenv(STORESCP_ENV, raising=False)
    monkeypatch.setattr(engine, "DEBIAN_STORESCP", tmp_path / "nowhere" / "storescp")
    with pytest.raises(ConfigError) as caught:
        find_storescp()
    assert caught.value.exit_code == 3
    message = str(caught.value)
    assert message.startswith(f"no DCMTK storescp found, only {fake} (`--version` exited 2 ")
    assert "and printed 'usage: storescp [options] port')" in message
    assert STORESCP_ENV in message and "dcmtk" in message
    monkeypatch.setattr(engine, "DEBIAN_STORESCP", tmp_path / "nowhere" / "either")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"^storescp not found: install DCMTK"):
        find_storescp()


def test_storescp_from_the_environment_is_checked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine.DEBIAN_STORESCP
    monkeypatch.setenv(STORESCP_ENV, str(real))
    path, version = find_storescp()
    assert path == real and version.startswith("3.")
    fake = fake_storescp(tmp_path / "bin")
    result = subprocess.run(
        [sys.executable, "-m", "mercli", "receive", "--spool", str(tmp_path / "s"), *DCMTK],
        capture_output=True,
        text=True,
        timeout=60,
        env={**DCMTK_ENV, STORESCP_ENV: str(fake)},
    )
    assert result.returncode == 3, result.stderr
    assert f"Error: ${STORESCP_ENV}={fake} is not DCMTK's storescp (`--version` exited 2" in (
        result.stderr
    )
    assert fake_calls(fake) == ["--version"]
