"""The spool: one directory tree that is the whole state of a mercli installation.

Every command reads and writes only the spool, and only through this module. The protocol
below is what makes any number of `receive`, `route`, `dispatch`, `purge` and `resend`
processes safe on one spool, across `kill -9` and power cuts.

Layout::

    spool/
      tmp/                       partial writes; nothing but this module reads it
        <owner>/                   scratch of one live process
        lease.<owner>              a lease being born (see 4)
      incoming/<series>/         received instances of one series, open for more:
                                   NAME.dcm + NAME.tags, NAME = safe_name(SOPInstanceUID)
      outgoing/<job>/            jobs waiting for dispatch (job.json + instances)
      success/<job>/             delivered jobs
      discard/<id>/              series no rule wanted
      error/<id>/                failed jobs and unreadable instances, each with error.json
      leases/<owner>             one per live process: JSON (role, host, pid, start) + flock
      claims/<owner>/<state>~<name>/
        item                       the claimed item, renamed here from <state>/<name>
        out.tmp/<state>/<name>     a transaction being prepared
        out/<state>/<name>         a committed transaction being applied
      hints/<series>             "the association that sent this series has ended" (receive
                                   writes, route reads: advisory, replaced whole, aged out)
      events/YYYY-MM-DD.ndjson   audit trail (mercli.events)
      staging/                   what storescp is writing (`receive --engine dcmtk` only;
                                   mercli.dcmtk_engine hands finished files to getdcmtags)

Protocol:

1. **Publish.** A file is written under a unique name in `tmp/<owner>/`, fsync'ed, renamed
   into its state folder, and that folder is fsync'ed. Readers never look in `tmp/`, so they
   see a file whole or not at all. Items (jobs, batches) are directories prepared the same way
   and renamed into place whole, with `renameat2(RENAME_NOREPLACE)` so nothing is clobbered.
2. **Groups.** `incoming/<series>/` is the one folder that grows after it is published: each
   received instance is renamed into it, `.dcm` first, then `.tags` (a `.dcm` without a sidecar
   is complete data whose sidecar can be rebuilt; never the reverse). Publishers hold a shared
   `flock` on the group directory while they rename; a claimer holds an exclusive one while it
   renames the group away. After locking, both check the directory is still at its path (same
   inode), else retry. So an instance lands wholly in the claimed batch or wholly in a new
   group that the next routing pass takes: it is never split from its sidecar, never lost.
3. **Claim.** A worker owns an item by renaming it to `claims/<owner>/<state>~<name>/item`.
   rename(2) is atomic: of several workers exactly one succeeds, the rest get ENOENT. The
   claim then ends in one of three ways, each safe at every instant:
   - *release*: renamed back to `<state>/<name>` (merged into a newer group of that name);
   - *move*: renamed to another state (one rename: e.g. a delivered job into `success/`);
   - *transaction*: outputs are prepared under `out.tmp/` (hard links, never copies of pixel
     data), fsync'ed, and committed by renaming `out.tmp` to `out`. From that instant the
     outputs are decided: each `out/<state>/<name>` is renamed into place, then the item is
     deleted. An entry is either still in `out/` or already published, never both.
4. **Leases.** Each process creates `leases/<owner>` (born in `tmp/`, renamed in) and holds an
   exclusive `flock` on it for its lifetime. The kernel drops the lock when the process dies,
   however it dies, so "is the owner alive?" is a non-blocking lock attempt, with no clocks and
   no marker files. Whoever takes a dead owner's lock recovers its claims: a claim with `out/`
   is rolled forward, any other is rolled back (its `out.tmp/` dropped, its item released).
   Then the owner's scratch, claims folder and lease are deleted, the lease last.
5. **Reaping.** `tmp/<owner>` of a dead owner is deleted by recovery; loose files in `tmp/`
   older than a grace period (a foreign tool's leftovers) are deleted too.

The spool must live on one local filesystem (or NFSv4 with working flock): renames are only
atomic within one filesystem, which `Spool.open` checks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.errors import SpoolError
from mercli.events import EVENTS_DIR, EventLog
from mercli.fsutil import (
    fsync_dir,
    remove_tree,
    rename_noreplace,
    unlink_quietly,
    write_new,
)
from mercli.names import new_id, owner_id

log = logging.getLogger(__name__)

INCOMING, OUTGOING, SUCCESS, DISCARD, ERROR = "incoming", "outgoing", "success", "discard", "error"
STATES: tuple[str, ...] = (INCOMING, OUTGOING, SUCCESS, DISCARD, ERROR)
GROUP_STATES = frozenset({INCOMING})  # states whose items keep growing after publish
TMP, LEASES, CLAIMS, HINTS = "tmp", "leases", "claims", "hints"
JOB_FILE = "job.json"
ERROR_FILE = "error.json"
INSTANCE_SUFFIX, SIDECAR_SUFFIX = ".dcm", ".tags"
KEY_SEPARATOR = "~"
ITEM, OUT_TMP, OUT = "item", "out.tmp", "out"
LEASE_BIRTH_PREFIX = "lease."
TMP_GRACE_SECONDS = 24 * 3600


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Item:
    """A published item: a series batch, a job, or a discarded/failed item."""

    state: str
    name: str
    path: Path
    claimed_by: str | None = None


@dataclass
class RecoveryReport:
    """What one recovery pass did."""

    owners: list[str] = field(default_factory=list)
    released: list[tuple[str, str]] = field(default_factory=list)
    rolled_forward: list[tuple[str, str]] = field(default_factory=list)
    reaped_tmp: int = 0


class Spool:
    """A spool directory: its layout, its items, and its event log."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        self.tmp = self.root / TMP
        self.leases = self.root / LEASES
        self.claims = self.root / CLAIMS
        self.hints = self.root / HINTS
        self.events = EventLog(self.root / EVENTS_DIR)

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Spool:
        """Open a spool, creating its layout if missing; SpoolError if it is unusable."""
        spool = cls(root)
        spool.ensure_layout()
        return spool

    def ensure_layout(self) -> None:
        """Create every folder, then prove the spool writable and on one filesystem."""
        folders = [self.tmp, *(self.root / s for s in STATES), self.leases, self.claims, self.hints]
        folders.append(self.events.directory)
        try:
            if self.root.exists() and not self.root.is_dir():
                raise SpoolError(f"spool path is not a directory ({self.root})")
            for folder in folders:
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)
                    fsync_dir(folder.parent)
            probe = self.tmp / f"probe.{os.getpid()}.{new_id()}"
            write_new(probe, b"mercli")
            unlink_quietly(probe)
        except OSError as exc:
            where = exc.filename or self.root
            raise SpoolError(f"spool unusable: {exc.strerror or exc} ({where})") from exc
        devices = {folder.stat().st_dev for folder in folders}
        if len(devices) > 1:
            raise SpoolError(
                f"spool folders span several filesystems; renames would not be atomic ({self.root})"
            )

    @classmethod
    def open_for_reading(cls, root: str | os.PathLike[str]) -> Spool:
        """Open an existing spool without writing to it (status on a read-only mount)."""
        spool = cls(root)
        if not spool.root.is_dir() or not (spool.root / INCOMING).is_dir():
            raise SpoolError(f"not a spool (no incoming/ folder) ({spool.root})")
        if not os.access(spool.root, os.R_OK | os.X_OK):
            raise SpoolError(f"spool unusable: permission denied ({spool.root})")
        return spool

    def state_dir(self, state: str) -> Path:
        """The folder of a state; ValueError for a name that is not one of STATES."""
        if state not in STATES:
            raise ValueError(f"unknown spool state {state!r}")
        return self.root / state

    def log(self, event: str, **fields: Any) -> None:
        """Append to the audit trail; a full disk must not stop the work it describes."""
        try:
            self.events.append(event, **fields)
        except OSError as exc:
            log.warning("event log unwritable (%s): %s %s", exc.strerror, event, fields)

    # -- reading -----------------------------------------------------------------------------

    def items(self, state: str) -> list[Item]:
        """Published, unclaimed items of a state, sorted by name."""
        directory = self.state_dir(state)
        try:
            with os.scandir(directory) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        return [Item(state, name, directory / name) for name in names]

    def claimed(self, state: str | None = None) -> list[Item]:
        """Items currently claimed by some worker (live or not yet recovered)."""
        found = []
        for owner_dir in _subdirs(self.claims):
            for key_dir in _subdirs(owner_dir):
                key_state, _, name = key_dir.name.partition(KEY_SEPARATOR)
                item = key_dir / ITEM
                if (state is None or key_state == state) and item.exists():
                    found.append(Item(key_state, name, item, claimed_by=owner_dir.name))
        return found

    # -- publishing into groups ----------------------------------------------------------------

    def publish_to_group(self, state: str, group: str, files: Sequence[tuple[Path, str]]) -> bool:
        """Rename prepared files (tmp path, final name) into `<state>/<group>/`, durably.

        Follows protocol step 2. Files with an existing name replace it atomically (a resent
        instance replaces the earlier copy). Returns True if any name was replaced.
        """
        directory = self.state_dir(state) / group
        while True:
            created = _mkdir(directory)
            if created:
                fsync_dir(directory.parent)
            with _locked_dir(directory, fcntl.LOCK_SH) as fd:
                if fd is None:
                    continue  # claimed away between mkdir and lock: make a new group
                replaced = False
                for source, name in files:
                    with suppress(FileNotFoundError):
                        os.stat(name, dir_fd=fd, follow_symlinks=False)
                        replaced = True
                    os.rename(source, name, dst_dir_fd=fd)
                os.fsync(fd)
                return replaced

    def publish_item(self, prepared: Path, state: str, name: str) -> Item:
        """Publish a folder built in tmp/ as the new item `<state>/<name>` (never clobbers)."""
        _fsync_tree(prepared)
        target = self.state_dir(state) / name
        rename_noreplace(prepared, target)
        fsync_dir(target.parent)
        return Item(state, name, target)

    def quarantine_files(
        self, worker: Worker, files: dict[str, Path], reason: str, origin: str, **detail: Any
    ) -> Item:
        """Keep loose files (not a claimed item) as a new error/<id>/ with an error.json.

        The files are moved (renamed) into a folder built in the worker's scratch, which is
        published whole; if anything fails, the folder and the files in it are removed.
        """
        folder = worker.tmp_path()
        folder.mkdir()
        try:
            for name, source in files.items():
                os.rename(source, folder / name)
            record = _error_record(reason, origin, detail)
            write_new(folder / ERROR_FILE, _json_bytes(record))
            return self.publish_item(folder, ERROR, new_id())
        except BaseException:
            remove_tree(folder)
            raise

    def write_hint(self, worker: Worker, series: str, record: dict[str, Any]) -> None:
        """Say that an association carrying `series` has ended (advisory; see `hints/`)."""
        record = {"at": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        try:
            replace_file(worker, self.hints / series, _json_bytes(record))
        except OSError as exc:  # a lost hint only delays routing until the series timeout
            log.warning("cannot write completion hint for series %s: %s", series, exc)

    def read_hint(self, series: str) -> dict[str, Any] | None:
        """The last hint written for a series, or None."""
        try:
            value = json.loads((self.hints / series).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


# -- workers, claims, transactions ---------------------------------------------------------------


class Worker:
    """One live process on the spool: its lease, its scratch folder in tmp/, its claims.

    Use as a context manager. Create it after any fork: a forked child shares its parent's
    lock, so it must have its own Worker.
    """

    def __init__(self, spool: Spool, role: str) -> None:
        self.spool = spool
        self.id = owner_id(role)
        self.role = role
        self.scratch = spool.tmp / self.id
        self.claims_dir = spool.claims / self.id
        self._lease_fd: int | None = None
        self._tmp_counter = 0

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Take a lease (locked before anyone can see it), then make scratch and claims dirs."""
        born = self.spool.tmp / f"{LEASE_BIRTH_PREFIX}{self.id}"
        fd = os.open(born, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = {"role": self.role, "host": os.uname().nodename, "pid": os.getpid()}
            os.write(fd, json.dumps({**info, "started": _now()}).encode())
            os.fsync(fd)
            rename_noreplace(born, self.spool.leases / self.id)
            fsync_dir(self.spool.leases)
            self.scratch.mkdir()
            self.claims_dir.mkdir()
        except BaseException:
            os.close(fd)
            unlink_quietly(born)
            raise
        self._lease_fd = fd

    def stop(self) -> None:
        """Release what is still claimed, remove scratch and claims dirs, then the lease."""
        if self._lease_fd is None:
            return
        for key_dir in _subdirs(self.claims_dir):
            _settle_claim(self.spool, key_dir)
        remove_tree(self.scratch)
        remove_tree(self.claims_dir)
        unlink_quietly(self.spool.leases / self.id)
        os.close(self._lease_fd)
        self._lease_fd = None

    def tmp_path(self, suffix: str = "") -> Path:
        """A fresh, unused path in this worker's scratch folder."""
        self._tmp_counter += 1
        return self.scratch / f"{self._tmp_counter}.{new_id()}{suffix}"

    def claim(self, state: str, name: str) -> Claim | None:
        """Take `<state>/<name>` for this worker alone; None if someone else has it."""
        source = self.spool.state_dir(state) / name
        key_dir = self.claims_dir / f"{state}{KEY_SEPARATOR}{name}"
        try:
            key_dir.mkdir()
        except FileExistsError:
            return None  # this worker already holds it
        try:
            if state in GROUP_STATES:
                with _locked_dir(source, fcntl.LOCK_EX) as fd:
                    if fd is None:
                        key_dir.rmdir()
                        return None
                    rename_noreplace(source, key_dir / ITEM)
            else:
                rename_noreplace(source, key_dir / ITEM)
        except FileNotFoundError:
            key_dir.rmdir()
            return None
        except BaseException:
            if not (key_dir / ITEM).exists():
                remove_tree(key_dir)
            raise
        return Claim(self, state, name, key_dir)


class Claim:
    """An item one worker owns; end it with release(), move_to() or a Transaction."""

    def __init__(self, worker: Worker, state: str, name: str, key_dir: Path) -> None:
        self.worker = worker
        self.spool = worker.spool
        self.state = state
        self.name = name
        self.key_dir = key_dir
        self.path = key_dir / ITEM

    def __repr__(self) -> str:
        return f"Claim({self.state}/{self.name} by {self.worker.id})"

    def release(self) -> Item:
        """Give the item back to its state unchanged, for someone to take again."""
        item = _place(self.spool, self.path, self.state, self.name)
        remove_tree(self.key_dir)
        return item

    def move_to(self, state: str, name: str | None = None) -> Item:
        """End the claim by moving the item, in one rename, to another state."""
        item = _place(self.spool, self.path, state, name or self.name)
        remove_tree(self.key_dir)
        return item

    def quarantine(self, reason: str, *, name: str | None = None, **detail: Any) -> Item:
        """Move the item to error/ with an error.json that says why, for resend or a human."""
        record = _error_record(reason, self.state, detail)
        replace_file(self.worker, self.path / ERROR_FILE, _json_bytes(record))
        return self.move_to(ERROR, name)

    def transaction(self) -> Transaction:
        """Start preparing outputs that will be published together (protocol step 3)."""
        return Transaction(self)


class Transaction:
    """Outputs of a claim, prepared under out.tmp/ and published all together or not at all."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.root = claim.key_dir / OUT_TMP
        remove_tree(self.root)  # a previous attempt of this very worker that was abandoned
        self.root.mkdir()
        self._made: list[Path] = []

    def new_item(self, state: str, name: str) -> Path:
        """A new, empty item folder that will become `<state>/<name>` on commit."""
        self.claim.spool.state_dir(state)
        state_dir = self.root / state
        state_dir.mkdir(exist_ok=True)
        path = state_dir / name
        path.mkdir()
        self._made.append(path)
        return path

    def commit(self) -> list[Item]:
        """Make everything durable, then commit by one rename, then publish each output."""
        for path in self._made:
            _fsync_tree(path)
        for state_dir in _subdirs(self.root):
            fsync_dir(state_dir)
        fsync_dir(self.root)
        os.rename(self.root, self.claim.key_dir / OUT)
        fsync_dir(self.claim.key_dir)
        return _roll_forward(self.claim.spool, self.claim.key_dir)

    def abort(self) -> None:
        """Drop everything prepared; the claim stays held."""
        remove_tree(self.root)


# -- single files -------------------------------------------------------------------------------


def replace_file(worker: Worker, path: Path, data: bytes) -> None:
    """Write a whole new version of `path` and rename it over the old one, durably."""
    tmp = worker.tmp_path()
    write_new(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def _json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=1).encode()  # ASCII-escaped, as getdcmtags writes it


def _error_record(reason: str, origin: str, detail: dict[str, Any]) -> dict[str, Any]:
    """The one shape of error.json: why, when, from which stage, then the details."""
    return {"reason": reason, "at": _now(), "from": origin, **detail}


# -- recovery ------------------------------------------------------------------------------------


def recover(spool: Spool, *, tmp_grace: float = TMP_GRACE_SECONDS) -> RecoveryReport:
    """Recover the claims of every dead owner and reap tmp/ (protocol steps 4 and 5).

    Safe to call from any process at any time, concurrently with everything: a live owner's
    lease lock makes it skip that owner; two recoverers serialise on the dead owner's lock.
    """
    report = RecoveryReport()
    owners = {p.name for p in _entries(spool.leases)} | {p.name for p in _subdirs(spool.claims)}
    for owner in sorted(owners):
        with _dead_owner_lock(spool, owner) as dead:
            if dead:
                _recover_owner(spool, owner, report)
    _reap_tmp(spool, tmp_grace, report)
    return report


@contextmanager
def _dead_owner_lock(spool: Spool, owner: str) -> Iterator[bool]:
    """Yields True while holding the lease lock of an owner that is dead, else False."""
    lease = spool.leases / owner
    try:
        fd = os.open(lease, os.O_RDWR)
    except FileNotFoundError:
        if not (spool.claims / owner).is_dir():
            yield False
            return
        # Claims but no lease: left by an interrupted recovery. Adopt it with a new lease.
        try:
            fd = os.open(lease, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            yield False
            return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # alive, or being recovered by someone else right now
            return
        if os.fstat(fd).st_nlink == 0:
            yield False  # recovered and deleted by someone else since we opened it
            return
        yield True
    finally:
        os.close(fd)


def _recover_owner(spool: Spool, owner: str, report: RecoveryReport) -> None:
    claims_dir = spool.claims / owner
    released: list[tuple[str, str]] = []
    rolled_forward: list[tuple[str, str]] = []
    for key_dir in _subdirs(claims_dir):
        state, _, name = key_dir.name.partition(KEY_SEPARATOR)
        (rolled_forward if _settle_claim(spool, key_dir) else released).append((state, name))
    remove_tree(spool.tmp / owner)
    remove_tree(claims_dir)
    unlink_quietly(spool.leases / owner)  # last: until here, claims without lease get adopted
    report.owners.append(owner)
    report.released += released
    report.rolled_forward += rolled_forward
    if released or rolled_forward:
        spool.log(
            "recovered",
            owner=owner,
            released=[f"{s}/{n}" for s, n in released],
            rolled_forward=[f"{s}/{n}" for s, n in rolled_forward],
        )
        log.info(
            "recovered %d claim(s) of dead worker %s", len(released) + len(rolled_forward), owner
        )


def _settle_claim(spool: Spool, key_dir: Path) -> bool:
    """Finish a committed transaction or put the item back; True if rolled forward."""
    if (key_dir / OUT).is_dir():
        _roll_forward(spool, key_dir)
        return True
    state, _, name = key_dir.name.partition(KEY_SEPARATOR)
    remove_tree(key_dir / OUT_TMP)
    if (key_dir / ITEM).exists():
        _place(spool, key_dir / ITEM, state, name)
    remove_tree(key_dir)
    return False


def _roll_forward(spool: Spool, key_dir: Path) -> list[Item]:
    """Publish every output still in out/, then delete the consumed item (idempotent)."""
    out = key_dir / OUT
    published = []
    touched = set()
    for state_dir in _subdirs(out):
        for entry in _subdirs(state_dir):
            published.append(_place(spool, entry, state_dir.name, entry.name, sync=False))
            touched.add(state_dir.name)
    for state in touched:
        fsync_dir(spool.state_dir(state))
    remove_tree(key_dir / ITEM)  # only ever while out/ exists: see protocol step 3
    remove_tree(out)
    remove_tree(key_dir)
    return published


def _reap_tmp(spool: Spool, grace: float, report: RecoveryReport) -> None:
    cutoff = time.time() - grace
    for entry in _entries(spool.tmp):
        name = entry.name
        try:
            if name.startswith(LEASE_BIRTH_PREFIX):
                # Unlocked only in the instant between its O_EXCL create and its flock.
                born_before = time.time() - min(grace, 60)
                if not lease_is_held(entry) and entry.stat().st_mtime <= born_before:
                    unlink_quietly(entry)
                    report.reaped_tmp += 1
            elif entry.is_dir() and not entry.is_symlink():
                if (
                    not (spool.leases / name).exists()
                    and not (spool.tmp / f"{LEASE_BIRTH_PREFIX}{name}").exists()
                ):
                    remove_tree(entry)
                    report.reaped_tmp += 1
            elif entry.lstat().st_mtime < cutoff:
                unlink_quietly(entry)
                report.reaped_tmp += 1
        except FileNotFoundError:
            continue


def lease_is_held(path: Path) -> bool:
    """True while some live process holds the lock on this lease file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# -- helpers -------------------------------------------------------------------------------------


def _place(spool: Spool, source: Path, state: str, name: str, *, sync: bool = True) -> Item:
    """Rename an item into `<state>/<name>`; groups merge into a newer group of that name."""
    target = spool.state_dir(state) / name
    while True:
        try:
            rename_noreplace(source, target)
            break
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if state not in GROUP_STATES:
                raise SpoolError(f"refusing to overwrite an existing item ({target})") from exc
            if _merge_into_group(spool, source, target):
                break
    if sync:
        fsync_dir(target.parent)
    return Item(state, name, target)


def _merge_into_group(spool: Spool, source: Path, target: Path) -> bool:
    """Move a released batch's files into a newer group of the same series.

    Where the newer group already has an instance of the same name, that copy arrived later and
    wins (as a resent instance would). False if the group vanished meanwhile (retry the rename).
    """
    with _locked_dir(target, fcntl.LOCK_SH) as fd:
        if fd is None:
            return False
        stems: dict[str, list[str]] = {}
        for entry in os.listdir(source):
            stems.setdefault(entry.rsplit(".", 1)[0], []).append(entry)
        for stem, names in sorted(stems.items()):
            if any(_exists_at(fd, n) for n in names):
                spool.log("duplicate_dropped", group=target.name, instance=stem)
                for n in names:
                    remove_tree(source / n)
                continue
            for n in sorted(names, key=lambda n: n.endswith(SIDECAR_SUFFIX)):  # .dcm first
                os.rename(source / n, n, dst_dir_fd=fd)
        os.fsync(fd)
    remove_tree(source)
    return True


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


@contextmanager
def _locked_dir(path: Path, operation: int) -> Iterator[int | None]:
    """flock a directory; yields its fd, or None if it vanished or was replaced meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        yield None
        return
    try:
        fcntl.flock(fd, operation)
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            yield None
            return
        mine = os.fstat(fd)
        if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # drops the lock


def _mkdir(path: Path) -> bool:
    try:
        path.mkdir()
        return True
    except FileExistsError:
        return False


def _fsync_tree(path: Path) -> None:
    """fsync every directory of a freshly built item (file data was fsync'ed when written)."""
    for directory, _dirs, _files in os.walk(path, topdown=False):
        fsync_dir(directory)


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _entries(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return sorted(Path(e.path) for e in entries)
    except FileNotFoundError:
        return []


def link_instances(source: Path, destination: Path) -> int:
    """Hard-link every instance and sidecar of one item into another: fan-out without copies."""
    count = 0
    with os.scandir(source) as entries:
        for entry in entries:
            if entry.name.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX)) and entry.is_file():
                os.link(entry.path, destination / entry.name)
                count += entry.name.endswith(INSTANCE_SUFFIX)
    return count


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write a new JSON file (inside an item being prepared), fsync'ed."""
    write_new(path, _json_bytes(record))
