"""Recovery: a dead owner's claims finished or given back, and tmp/ reaped.

Protocol steps 4 and 5 of `mercli.spool`. A lease is a file its owner holds an exclusive
`flock` on for as long as it lives, so whether an owner is dead is a non-blocking lock attempt
away, and whoever wins that lock recovers the owner's claims. This module is also where a
claim is settled, because a worker stopping cleanly settles its own claims the same way.

A lease whose lock cannot be had is alive, whoever holds the lock: recovery never waits for
it and never takes claims from under it. `lease_state` gives `mercli status` the same answer
(`live` or `dead`), and says `stuck` for a live lease whose owner process is gone from this
host: another process holds its lock (a recovery at work, or a user with read access to the
spool blocking it), and its claims wait until that lock is dropped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mercli.fsutil import fsync_dir, open_new, remove_tree, unlink_quietly
from mercli.spool.items import (
    ITEM,
    KEY_SEPARATOR,
    LEASE_BIRTH_PREFIX,
    OUT,
    OUT_TMP,
    TMP_GRACE_SECONDS,
    Item,
    LockTimeout,
    list_entries,
    list_subdirs,
)
from mercli.spool.journal import JOURNAL_DIR, SPARE_DIR, replay
from mercli.spool.journal import owner_folder as journal_folder
from mercli.spool.notices import resolve_dead_owner
from mercli.spool.store import Spool

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What one recovery pass did."""

    owners: list[str] = field(default_factory=list)
    replayed: int = 0  # instances published from dead receivers' journals
    released: list[tuple[str, str]] = field(default_factory=list)
    rolled_forward: list[tuple[str, str]] = field(default_factory=list)
    reaped_tmp: int = 0


def recover(spool: Spool, *, tmp_grace: float = TMP_GRACE_SECONDS) -> RecoveryReport:
    """Recover the claims of every dead owner and reap tmp/ (protocol steps 4 and 5).

    Safe to call from any process at any time, concurrently with everything: a live owner's
    lease lock makes it skip that owner; two recoverers serialise on the dead owner's lock.
    """
    report = RecoveryReport()
    leased = {p.name for p in list_entries(spool.leases)}
    owners = leased | {p.name for p in list_subdirs(spool.claims)}
    owners |= {p.name for p in list_subdirs(spool.root / JOURNAL_DIR) if p.name != SPARE_DIR}
    for owner in sorted(owners):
        with _dead_owner_lock(spool, owner) as dead:
            if dead:
                _recover_owner(spool, owner, report)
            elif lease_state(spool.leases / owner) == STUCK:
                log.warning(
                    "worker %s is gone but another process holds its lease's lock; "
                    "its claims are recovered once that lock is released",
                    owner,
                )
    _reap_tmp(spool, tmp_grace, report)
    return report


@contextmanager
def _dead_owner_lock(spool: Spool, owner: str) -> Iterator[bool]:
    """Yields True while holding the lease lock of an owner that is dead, else False."""
    lease = spool.leases / owner
    try:
        fd = os.open(lease, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not (spool.claims / owner).is_dir() and not journal_folder(spool.root, owner).is_dir():
            yield False
            return
        # Claims or a journal but no lease: left by an interrupted recovery, or a receiver
        # that stopped with instances it could not publish. Adopt them with a new lease.
        try:
            fd = open_new(lease, os.O_RDWR)
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
    try:
        report.replayed += replay(spool, owner)  # what a dead receiver acknowledged
    except OSError as exc:  # the journal stays: the next recovery tries again
        log.error("journal of dead receiver %s cannot be published yet: %s", owner, exc)
        return
    claims_dir = spool.claims / owner
    try:  # before any claim is settled: the claims still tell what happened
        resolve_dead_owner(spool.root, owner, claims_dir)
    except OSError as exc:
        log.error("notification log of dead worker %s cannot be resolved yet: %s", owner, exc)
        return
    released: list[tuple[str, str]] = []
    rolled_forward: list[tuple[str, str]] = []
    stuck = False
    for key_dir in list_subdirs(claims_dir):
        state, _, name = key_dir.name.partition(KEY_SEPARATOR)
        try:
            (rolled_forward if settle_claim(spool, key_dir) else released).append((state, name))
        except LockTimeout as exc:  # its group is locked: the next pass tries again
            stuck = True
            log.warning("claim %s of dead worker %s waits: %s", key_dir.name, owner, exc)
    if not stuck:
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


def settle_claim(spool: Spool, key_dir: Path) -> bool:
    """Finish a committed transaction or put the item back; True if rolled forward."""
    if (key_dir / OUT).is_dir():
        roll_forward(spool, key_dir)
        return True
    state, _, name = key_dir.name.partition(KEY_SEPARATOR)
    remove_tree(key_dir / OUT_TMP)
    if (key_dir / ITEM).exists():
        spool.place(key_dir / ITEM, state, name)
    remove_tree(key_dir)
    return False


def roll_forward(spool: Spool, key_dir: Path) -> list[Item]:
    """Publish every output still in out/, then delete the consumed item (idempotent)."""
    out = key_dir / OUT
    published = []
    touched = set()
    for state_dir in list_subdirs(out):
        for entry in list_subdirs(state_dir):
            published.append(spool.place(entry, state_dir.name, entry.name, sync=False))
            touched.add(state_dir.name)
    for state in touched:
        fsync_dir(spool.state_dir(state))
    remove_tree(key_dir / ITEM)  # only ever while out/ exists: see protocol step 3
    remove_tree(out)
    remove_tree(key_dir)
    return published


def _reap_tmp(spool: Spool, grace: float, report: RecoveryReport) -> None:
    cutoff = time.time() - grace
    for entry in list_entries(spool.tmp):
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


LIVE, DEAD, STUCK = "live", "dead", "stuck"


def lease_is_held(path: Path) -> bool:
    """True while some process holds the lock on this lease file: recovery leaves it alone."""
    return lease_state(path) != DEAD


def lease_state(path: Path) -> str:
    """`dead` if recovery could take this lease now, else `live`, or `stuck` when the owner
    it names is gone from this host and some other process holds the lock.

    The same test recovery makes (an exclusive, non-blocking lock), so the two always agree;
    the lock is dropped at once. A lease that is gone counts as dead (nothing to wait for).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return DEAD
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return STUCK if _owner_gone(fd) else LIVE
    finally:
        os.close(fd)
    return DEAD


def _owner_gone(fd: int) -> bool:
    """The lease names a process of this host that no longer exists."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        host, pid = record["host"], int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # still being written, or not ours to judge
    if host != os.uname().nodename or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
