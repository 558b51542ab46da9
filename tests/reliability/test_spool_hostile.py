"""Another local user against the spool: what they may read, and what their locks may cost.

The spool holds patient data, so its files are 0640 and its folders 0750 (SPEC §9): other users
cannot open anything, and only a group given the spool (setgid root, `--group`) can read it.
A member of that group can still take a `flock` on what it can open; a lock held forever must
cost a C-STORE, a routing pass or recovery a bounded delay, never a hang. These tests run the
other user as `nobody` (setpriv), with the real `mercli receive`, `route`, `dispatch`, `status`.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from mercli.spool import INCOMING, LOCK_DEADLINE, Spool, Worker, lease_state, recover
from tests.dicomfiles import make_instance
from tests.kit import CT, EXPLICIT
from tests.netkit import Receiver, storescu, wait_until
from tests.reliability.kit import claimed, items, mercli, write_rules
from tests.spoolkit import receive_instance

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="acting as another user needs root and setpriv",
)

NOBODY = pwd.getpwnam("nobody")
SERIES = "1.2.826.0.1.3680043.9.81"


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder every user can pass through (tmp_path is 0700 under /tmp/pytest-of-root)."""
    path = Path(tempfile.mkdtemp(prefix="mercli-hostile-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*command: str | Path) -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY.pw_uid}",
        f"--regid={NOBODY.pw_gid}",
        "--clear-groups",
        *map(str, command),
    ]


def locked_by_another(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextmanager
def nobody_holds_lock(path: Path, mode: str = "--exclusive") -> Iterator[None]:
    """`nobody` opens `path` and holds a flock on it until the block ends."""
    process = subprocess.Popen(
        as_nobody("flock", mode, path, "cat"),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: locked_by_another(path) or process.poll() is not None,
            what="nobody's lock",
        )
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        yield
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


def store(port: int, path: Path) -> tuple[int, float]:
    """One C-STORE over its own association: the status and the seconds it took."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CT, EXPLICIT)
    ae.dimse_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="MERCLI")
    assert assoc.is_established
    started = time.monotonic()
    status = assoc.send_c_store(dcmread(path))
    elapsed = time.monotonic() - started
    assoc.release()
    return int(status.Status) if "Status" in status else -1, elapsed


def loose_modes(root: Path) -> list[str]:
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        want = 0o750 if stat.S_ISDIR(mode) else 0o640
        if stat.S_IMODE(mode) & 0o777 != want:
            found.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(root)}")
    return found


# -- modes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("setgid", [False, True], ids=["plain", "setgid"])
def test_a_received_routed_dispatched_series_is_readable_by_no_other_user(
    base: Path, tmp_path: Path, setgid: bool
) -> None:
    spool, archive = base / "spool", base / "archive"
    if setgid:  # the admin gives the spool to a group: its members read, nobody else
        spool.mkdir()
        os.chown(spool, -1, NOBODY.pw_gid)
        spool.chmod(0o2750)
    files = [make_instance(tmp_path, series=SERIES, number=n) for n in range(3)]
    running = Receiver(spool, "--processes", "1").start()
    try:
        assert storescu(running.port, files).returncode == 0
    finally:
        assert running.stop() == 0, running.output()
    rules = write_rules(base / "rules.toml", {"archive": {"type": "folder", "path": str(archive)}})
    assert mercli("route", "--once", "--all", "--rules", rules, "--spool", spool).returncode == 0
    assert mercli("dispatch", "--once", "--spool", spool).returncode == 0
    assert len(items(spool, "success")) == 1 and (spool / "hints").iterdir()
    assert loose_modes(spool) == []
    (job,) = archive.iterdir()
    assert loose_modes(job) == []
    instance = next((spool / "success").glob("*/*.dcm"))
    read = subprocess.run(as_nobody("cat", instance), capture_output=True, check=False)
    if setgid:
        for path in [spool, *spool.rglob("*")]:
            info = path.lstat()
            assert info.st_gid == NOBODY.pw_gid, path
            assert not stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_ISGID, path
        assert read.returncode == 0 and read.stdout == instance.read_bytes()
    else:
        assert read.returncode != 0 and b"Permission denied" in read.stderr
        # ...not even to take a lock on a series folder or a lease
        denied = subprocess.run(
            as_nobody("flock", "--nonblock", spool / "incoming", "true"),
            capture_output=True,
            check=False,
        )
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr


# -- locks with deadlines ------------------------------------------------------------------------


def test_a_series_locked_by_a_group_member_fails_one_cstore_in_time_and_loses_nothing(
    base: Path, tmp_path: Path
) -> None:
    """Without the journal (--no-journal), receive publishes before it answers: a series
    locked past the deadline fails that C-STORE in time (0xA700) and the sender retries."""
    spool, archive = base / "spool", base / "archive"
    Spool.open(spool, group=NOBODY.pw_gid)  # nobody is in the spool's group: it can open it
    first, second = (make_instance(tmp_path, series=SERIES, number=n) for n in (1, 2))
    rules = write_rules(base / "rules.toml", {"archive": {"type": "folder", "path": str(archive)}})
    running = Receiver(spool, "--processes", "1", "--no-journal").start()
    try:
        assert store(running.port, first)[0] == 0
        (series,) = items(spool, INCOMING)
        with nobody_holds_lock(series):
            status, seconds = store(running.port, second)
            assert status == 0xA700, f"status 0x{status:04X} after {seconds:.1f} s"
            assert LOCK_DEADLINE - 0.5 < seconds < LOCK_DEADLINE + 3
            assert sorted(p.name for p in series.iterdir()) == sorted(
                [f"{first.stem}.dcm", f"{first.stem}.tags"]
            )  # nothing half-published
            started = time.monotonic()
            route = mercli("route", "--once", "--all", "--rules", rules, "--spool", spool)
            assert time.monotonic() - started < LOCK_DEADLINE + 30, "route --once hung"
            assert route.returncode == 1 and "retrying later" in route.stderr, route.stderr
            assert items(spool, INCOMING) == [series] and claimed(spool) == []
        assert store(running.port, second)[0] == 0  # the sender retries: now it goes in
    finally:
        assert running.stop() == 0, running.output()
    routed = mercli("route", "--once", "--all", "--rules", rules, "--spool", spool)
    assert routed.returncode == 0, routed.stderr
    assert mercli("dispatch", "--once", "--spool", spool).returncode == 0
    (job,) = archive.iterdir()
    assert sorted(p.name for p in job.glob("*.dcm")) == sorted(
        f"{p.stem}.dcm" for p in (first, second)
    )


def test_a_series_locked_by_a_group_member_delays_only_its_publishing(
    base: Path, tmp_path: Path
) -> None:
    """With the journal (the default), the instance is durable before the group is touched:
    the C-STORE succeeds at once, other series are published meanwhile, and the locked one
    is published once the lock is gone. Nothing is lost, nothing waits on the sender."""
    spool, archive = base / "spool", base / "archive"
    Spool.open(spool, group=NOBODY.pw_gid)
    first, second = (make_instance(tmp_path, series=SERIES, number=n) for n in (1, 2))
    other = make_instance(tmp_path, series=f"{SERIES}.9", number=1)
    rules = write_rules(base / "rules.toml", {"archive": {"type": "folder", "path": str(archive)}})
    running = Receiver(spool, "--processes", "1").start()
    try:
        assert store(running.port, first)[0] == 0
        wait_until(lambda: len(items(spool, INCOMING)) == 1, what="the first instance")
        (series,) = items(spool, INCOMING)
        wait_until(lambda: (series / f"{first.stem}.tags").exists(), what="its sidecar")
        with nobody_holds_lock(series):
            status, seconds = store(running.port, second)
            assert status == 0x0000 and seconds < LOCK_DEADLINE, (hex(status), seconds)
            assert store(running.port, other)[0] == 0
            wait_until(lambda: len(items(spool, INCOMING)) == 2, what="the other series")
            time.sleep(1.5)  # the locked series' instance waits, in the journal
            assert sorted(p.name for p in series.iterdir()) == sorted(
                [f"{first.stem}.dcm", f"{first.stem}.tags"]
            )
        wait_until(
            lambda: (series / f"{second.stem}.tags").exists(),
            timeout=15,
            what="the locked series' instance, once the lock is gone",
        )
    finally:
        assert running.stop() == 0, running.output()
    routed = mercli("route", "--once", "--all", "--rules", rules, "--spool", spool)
    assert routed.returncode == 0, routed.stderr
    assert mercli("dispatch", "--once", "--spool", spool).returncode == 0
    delivered = sorted(p.name for p in archive.rglob("*.dcm"))
    assert delivered == sorted(f"{p.stem}.dcm" for p in (first, second, other))


def _claim_and_die(root: str) -> None:
    worker = Worker(Spool(root), "doomed")
    worker.start()
    assert worker.claim(INCOMING, "1.2") is not None
    os._exit(0)  # like kill -9: the lease stays, unlocked


@pytest.mark.parametrize("mode", ["--shared", "--exclusive"])
def test_a_lease_locked_by_a_group_member_is_alive_for_recovery_and_status_alike(
    base: Path, mode: str
) -> None:
    spool = Spool.open(base / "spool", group=NOBODY.pw_gid)
    with Worker(spool, "receive") as receiver:
        receive_instance(receiver, "1.2", "1.2.1")
    process = multiprocessing.get_context("fork").Process(
        target=_claim_and_die, args=(str(spool.root),)
    )
    process.start()
    process.join()
    (lease,) = spool.leases.iterdir()
    with nobody_holds_lock(lease, mode):
        assert recover(spool).released == []  # it cannot be locked: alive, left alone
        status = mercli("status", "--json", "--spool", spool.root)
        workers = json.loads(status.stdout)["workers"]
        assert workers == {"live": 1, "dead": 0, "stuck": 1}, workers
        assert lease_state(lease) == "stuck"
    status = mercli("status", "--json", "--spool", spool.root)
    assert json.loads(status.stdout)["workers"] == {"live": 0, "dead": 1}
    assert recover(spool).released == [(INCOMING, "1.2")]
    assert (spool.root / INCOMING / "1.2" / "1.2.1.dcm").is_file()


def test_group_option_gives_the_spool_to_a_group(base: Path) -> None:
    spool = base / "spool"
    result = mercli("dispatch", "--once", "--group", "nogroup", "--spool", spool)
    assert result.returncode == 0, result.stderr
    for folder in [spool, *(p for p in spool.iterdir() if p.is_dir())]:
        info = folder.stat()
        assert info.st_gid == NOBODY.pw_gid and info.st_mode & stat.S_ISGID, folder
        assert stat.S_IMODE(info.st_mode) & 0o777 == 0o750, folder
    unknown = mercli("dispatch", "--once", "--group", "no-such-group-mercli", "--spool", spool)
    assert unknown.returncode == 2 and "no such group 'no-such-group-mercli'" in unknown.stderr
