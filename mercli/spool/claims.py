"""Ownership that survives `kill -9`: workers, their leases, claims and transactions.

Protocol steps 3 and 4 of `mercli.spool`. A `Worker` is one live process on the spool: it
holds a locked lease and owns a scratch folder in tmp/ and a claims folder. It takes an item
by renaming it into its claims folder (`Claim`), and ends the claim by releasing it, moving it
to another state, or committing a `Transaction` of prepared outputs with one rename. Whatever
a worker leaves behind when it dies is finished or undone by `mercli.spool.recovery`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.fsutil import (
    fsync_dir,
    fsync_file,
    give_file_mode,
    make_dir,
    remove_tree,
    rename_noreplace,
    set_file_mode,
    sync_pool,
    unlink_quietly,
    write_new,
)
from mercli.names import new_id, owner_id
from mercli.spool.items import (
    ERROR,
    ERROR_FILE,
    GROUP_STATES,
    ITEM,
    KEY_SEPARATOR,
    LEASE_BIRTH_PREFIX,
    OUT,
    OUT_TMP,
    Item,
    LockTimeout,
    error_record,
    fsync_tree,
    json_bytes,
    list_subdirs,
    lock,
    lock_deadline,
    locked_dir,
    now_iso,
    replace_file,
)
from mercli.spool.notices import ABORT, COMMIT, NoticeLog
from mercli.spool.recovery import roll_forward, settle_claim
from mercli.spool.store import Spool

log = logging.getLogger(__name__)


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
        self._notices: NoticeLog | None = None
        self._notices_lock = threading.Lock()

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Take a lease (locked before anyone can see it), then make scratch and claims dirs.

        The lease is born 0600, so no one else can open it, let alone lock it, before its
        owner has; only then is it given the spool's FILE_MODE for `status` to look at.
        """
        born = self.spool.tmp / f"{LEASE_BIRTH_PREFIX}{self.id}"
        fd = os.open(born, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            lock(fd, fcntl.LOCK_EX, born, lock_deadline())
            set_file_mode(fd)
            info = {"role": self.role, "host": os.uname().nodename, "pid": os.getpid()}
            os.write(fd, json.dumps({**info, "started": now_iso()}).encode())
            os.fsync(fd)
            rename_noreplace(born, self.spool.leases / self.id)
            fsync_dir(self.spool.leases)
            make_dir(self.scratch)
            make_dir(self.claims_dir)
        except BaseException:
            os.close(fd)
            unlink_quietly(born)
            raise
        self._lease_fd = fd

    def stop(self) -> None:
        """Release what is still claimed, remove scratch and claims dirs, then the lease.

        A claim that cannot be put back now (its group is locked past the deadline) is left
        with the lease, as a crash would leave it: recovery settles it once the lock is gone.
        """
        if self._lease_fd is None:
            return
        stuck = 0
        for key_dir in list_subdirs(self.claims_dir):
            try:
                settle_claim(self.spool, key_dir)
            except LockTimeout as exc:
                stuck += 1
                log.warning("claim %s left for recovery: %s", key_dir.name, exc)
        if self._notices is not None:
            self._notices.close()
            self._notices = None
        remove_tree(self.scratch)
        if not stuck:
            remove_tree(self.claims_dir)
            unlink_quietly(self.spool.leases / self.id)
        os.close(self._lease_fd)
        self._lease_fd = None

    @property
    def notices(self) -> NoticeLog:
        """This worker's notification log (`mercli.spool.notices`), made on first use."""
        with self._notices_lock:
            if self._notices is None:
                self._notices = NoticeLog(self.spool.root, self.id)
            return self._notices

    def tmp_path(self, suffix: str = "") -> Path:
        """A fresh, unused path in this worker's scratch folder."""
        self._tmp_counter += 1
        return self.scratch / f"{self._tmp_counter}.{new_id()}{suffix}"

    def quarantine_files(
        self, files: dict[str, Path], reason: str, origin: str, **detail: Any
    ) -> Item:
        """Keep loose files (not a claimed item) as a new error/<id>/ with an error.json.

        The files are moved (renamed) into a folder built in this worker's scratch, which is
        published whole; if anything fails, the folder and the files in it are removed.
        """
        folder = self.tmp_path()
        make_dir(folder)
        try:
            for name, source in files.items():
                give_file_mode(source)  # made by receive or storescp, with their own mode
                os.rename(source, folder / name)
            record = error_record(reason, origin, detail)
            write_new(folder / ERROR_FILE, json_bytes(record))
            return self.spool.publish_item(folder, ERROR, new_id())
        except BaseException:
            remove_tree(folder)
            raise

    def write_hint(self, series: str, record: dict[str, Any]) -> None:
        """Say that an association carrying `series` has ended (advisory; see `hints/`)."""
        record = {"at": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        try:
            self.replace_file(self.spool.hints / series, json_bytes(record))
        except OSError as exc:  # a lost hint only delays routing until the series timeout
            log.warning("cannot write completion hint for series %s: %s", series, exc)

    def replace_file(self, path: Path, data: bytes) -> None:
        """Write a whole new version of `path` through this worker's scratch, durably."""
        replace_file(self.tmp_path(), path, data)

    def claim(self, state: str, name: str) -> Claim | None:
        """Take `<state>/<name>` for this worker alone; None if someone else has it.

        A group whose lock stays taken past the deadline raises LockTimeout (an OSError):
        nothing is claimed, and the caller tries again later.
        """
        source = self.spool.state_dir(state) / name
        key_dir = self.claims_dir / f"{state}{KEY_SEPARATOR}{name}"
        if self._notices is not None:
            self._notices.before_claim(key_dir.name)
        try:
            make_dir(key_dir)
        except FileExistsError:
            return None  # this worker already holds it
        try:
            if state in GROUP_STATES:
                with locked_dir(source, fcntl.LOCK_EX) as fd:
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

    def release(self) -> Item | None:
        """Give the item back to its state unchanged, for someone to take again.

        Unless a transaction of it has committed (`out/` there: an error came after the
        commit rename): that is finished instead, as recovery would (None then).
        """
        if (self.key_dir / OUT).is_dir():
            roll_forward(self.spool, self.key_dir)
            return None
        item = self.spool.place(self.path, self.state, self.name)
        remove_tree(self.key_dir)
        return item

    def move_to(self, state: str, name: str | None = None) -> Item:
        """End the claim by moving the item, in one rename, to another state."""
        item = self.spool.place(self.path, state, name or self.name)
        remove_tree(self.key_dir)
        return item

    def quarantine(
        self, reason: str, *, name: str | None = None, state: str = ERROR, **detail: Any
    ) -> Item:
        """Move the item to error/ with an error.json that says why, for resend or a human.

        `state` names another end state with the same record: notifications that failed for
        good go to notify_failed/, apart from jobs (SPEC §8).
        """
        record = error_record(reason, self.state, detail)
        self.worker.replace_file(self.path / ERROR_FILE, json_bytes(record))
        return self.move_to(state, name)

    def transaction(self) -> Transaction:
        """Start preparing outputs that will be published together (protocol step 3)."""
        return Transaction(self)


class Transaction:
    """Outputs of a claim, prepared under out.tmp/ and published all together or not at all."""

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.root = claim.key_dir / OUT_TMP
        remove_tree(self.root)  # a previous attempt of this very worker that was abandoned
        make_dir(self.root)
        self._made: list[Path] = []
        self._unsynced: list[Path] = []
        self._states: set[str] = set()  # state folders made in out.tmp/ so far
        self._notifications: list[dict[str, Any]] = []
        self._deferred: list[Callable[[], Iterable[dict[str, Any]]]] = []

    def write_json(self, path: Path, record: dict[str, Any]) -> None:
        """A JSON file of a prepared output (job.json, held.json): written now, fsync'ed
        at commit together with the transaction's other such files. The first of those
        fsyncs commits the journal for all of them; one each as they are written would cost
        a journal commit each (a third of routing a small series into two jobs)."""
        write_new(path, json_bytes(record), sync=False)
        self._unsynced.append(path)

    def new_item(self, state: str, name: str) -> Path:
        """A new, empty item folder that will become `<state>/<name>` on commit."""
        state_dir = self.root / state
        if state not in self._states:
            self.claim.spool.state_dir(state)  # a known state, or ValueError
            make_dir(state_dir, exist_ok=True)
            self._states.add(state)
        path = state_dir / name
        make_dir(path)
        self._made.append(path)
        return path

    def notify(self, notification: dict[str, Any]) -> None:
        """A notification (a notification.json record) that exists iff this commits: one line
        of the worker's notification log, synced before the commit rename (step 5b)."""
        self._notifications.append(notification)

    def notify_later(self, make: Callable[[], Iterable[dict[str, Any]]]) -> None:
        """Notifications as `notify`'s, made by `make` at commit, in the thread that writes
        their line while this thread's fsyncs run: taking an event's variables then costs
        the committing stage no time of its own (`make` must read only what no longer
        changes). If `make` raises, the transaction does not commit."""
        self._deferred.append(make)

    def commit(self) -> list[Item]:
        """Make everything durable, then commit by one rename, then publish each output.

        With notifications, their line in the worker's log is written and synced beside the
        other fsyncs (a thread of the fsync pool: its flush overlaps theirs) and must be
        durable before the rename; the marker after it says how the transaction ended.
        """
        txn = new_id() if self._notifications or self._deferred else ""
        notices = self.claim.worker.notices if txn else None
        logged = None
        if notices is not None:
            logged = sync_pool().submit(self._log_notifications, notices, txn)
        try:
            for path in self._unsynced:
                fsync_file(path)
            for path in self._made:
                fsync_tree(path)
            for state_dir in list_subdirs(self.root):
                fsync_dir(state_dir)
            fsync_dir(self.root)
            if logged is not None:
                logged.result()
            os.rename(self.root, self.claim.key_dir / OUT)
        except BaseException:
            if logged is not None:
                logged.exception()  # finished (written or not) before its marker goes in
                self._mark(txn, ABORT)  # synced before the caller releases the claim
            raise
        try:
            fsync_dir(self.claim.key_dir)  # the commit durable before its marker says so
        finally:
            if logged is not None:
                self._mark(txn, COMMIT)
        return roll_forward(self.claim.spool, self.claim.key_dir)

    def _log_notifications(self, notices: NoticeLog, txn: str) -> None:
        """Make the deferred notifications, then write and sync the transaction's line (none
        if nothing is to be told after all)."""
        for make in self._deferred:
            self._notifications.extend(make())
        if self._notifications:
            notices.open_transaction(txn, self.claim.key_dir.name, self._notifications)

    def _mark(self, txn: str, fate: str) -> None:
        """A marker never fails the transaction: it goes into room its line kept, so only
        an I/O error can stop it; then the line waits for recovery (commit) or, if an abort
        marker is lost, is taken as committed once the worker is gone (at least once)."""
        try:
            self.claim.worker.notices.mark(txn, self.claim.key_dir.name, fate)
        except OSError as exc:
            log.error("cannot mark transaction %s %s in the notification log: %s", txn, fate, exc)

    def abort(self) -> None:
        """Drop everything prepared; the claim stays held."""
        remove_tree(self.root)
