"""Collecting the notification log into `notify/`: one item per notification, in batches.

The stages write notifications as lines of their worker's log (`mercli.spool.notices`); this
turns the lines of committed transactions into notification items (a folder with
notification.json, as `mercli.notify` describes) that `mercli notify` claims and sends.

One collector at a time per log (an exclusive `flock` on the log's folder, never waited
for). The log is read WINDOW lines at a time; the notifications found are published BATCH
at a time: rendered (`mercli.notify.enqueue.rendered`), written in this worker's scratch,
synced together, renamed into `notify/` under each notification's own id (never clobbering),
the folder synced once, and only then the cursor moved past the batch's last line (written
whole, durably). A batch collected again (a crash or an error before its cursor moved)
makes no item that exists already in notify/, in a sender's claim, in notify_sent/ or in
notify_failed/ (looked for in that order, the order an item moves in): nothing is sent twice
without a crash, and a crash can at most repeat a batch whose cursor it kept from moving.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mercli.fsutil import (
    fsync_all,
    fsync_dir,
    make_dir,
    remove_tree,
    rename_noreplace,
    unlink_quietly,
    write_new,
)
from mercli.notify.enqueue import rendered
from mercli.spool import NOTIFICATION_FILE, NOTIFY, NOTIFY_FAILED, NOTIFY_SENT, Spool, Worker
from mercli.spool.items import KEY_SEPARATOR, json_bytes
from mercli.spool.notices import (
    CURSOR_FILE,
    NOTICES_DIR,
    Place,
    pending,
    read_cursor,
    segment_numbers,
    segment_path,
)

log = logging.getLogger(__name__)

BATCH = 1000  # notifications published together, then the cursor moved
WINDOW = 20000  # log lines read at once
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # new_id and <txn>.<n>; else renamed


class Collector:
    """Collects every worker's log into `notify/`. A pass over a log with nothing new
    costs a listing and one read of a block of zeros: cheap enough to poll."""

    def __init__(self, spool: Spool, worker: Worker) -> None:
        self.spool = spool
        self.worker = worker

    def collect(self) -> int:
        """One pass over every log; how many notification items it made."""
        made = 0
        try:
            owners = sorted(os.listdir(self.spool.root / NOTICES_DIR))
        except FileNotFoundError:
            return 0
        for owner in owners:
            folder = self.spool.root / NOTICES_DIR / owner
            try:
                made += self._collect_owner(owner, folder)
            except OSError as exc:  # the next pass tries again; the log keeps everything
                log.error("notification log %s cannot be collected yet: %s", owner, exc)
            except Exception as exc:  # a bug: the other logs are collected all the same
                log.error("notification log %s: unexpected %s", owner, type(exc).__name__)
        return made

    def _owner_exists(self, owner: str) -> bool:
        return (self.spool.leases / owner).exists() or (self.spool.claims / owner).is_dir()

    def _collect_owner(self, owner: str, folder: Path) -> int:
        # Whether the owner exists is asked before its log is read: an owner gone at this
        # moment has written its last line (its lease goes last, after every marker).
        owner_exists = self._owner_exists(owner)
        made = 0
        with _locked(folder) as held:
            if not held:
                return 0  # another collector has it now
            while True:
                cursor = read_cursor(folder)
                found = pending(folder, cursor, owner_exists=owner_exists, window=WINDOW)
                for batch, place in _batches(found.notifications):
                    made += self._publish(owner, batch)
                    cursor = self._move(folder, cursor, place)
                if not owner_exists and not found.waiting and not found.more:
                    remove_tree(folder)  # everything collected, and nobody writes here again
                    return made
                self._move(folder, cursor, found.cursor)
                for number in segment_numbers(folder):
                    if number < found.cursor.segment:  # passed: never read again
                        unlink_quietly(segment_path(folder, number))
                if not found.more:
                    return made

    def _made_before(self, name: str) -> bool:
        """Whether the item `name` exists already: looked for where an item goes next, in
        the order it goes (notify/, a sender's claim, then sent or failed), so an item
        moving meanwhile is seen in one place or the next."""
        if (self.spool.state_dir(NOTIFY) / name).exists():
            return True
        if any(self.spool.claims.glob(f"*/{NOTIFY}{KEY_SEPARATOR}{name}")):
            return True
        return any(
            (self.spool.state_dir(state) / name).exists() for state in (NOTIFY_SENT, NOTIFY_FAILED)
        )

    def _move(self, folder: Path, cursor: Place, place: Place) -> Place:
        """The cursor moved to `place` (written whole and durably), if that is further."""
        if place > cursor:
            self.worker.replace_file(
                folder / CURSOR_FILE, json.dumps([place.segment, place.offset]).encode()
            )
            return place
        return cursor

    def _publish(self, owner: str, notifications: list[tuple[str, int, dict[str, Any]]]) -> int:
        """Items for a batch of notifications, durable before the caller moves the cursor.

        A notification whose item exists already (in notify/, claimed by a sender, sent or
        given up) is not made again: its batch was collected before, and the cursor could not
        be moved then (an error or a crash in between).
        """
        notify = self.spool.state_dir(NOTIFY)
        built: list[tuple[str, Path]] = []
        try:
            for txn, index, record in notifications:
                name = str(record.get("id") or f"{txn}.{index:04d}")  # sorts as the line does
                if name != record.get("id"):
                    record["id"] = name  # the id, given here: the same on every collection
                if not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
                    digest = hashlib.sha256(f"{owner}/{txn}/{index}".encode()).hexdigest()
                    name = record["id"] = f"n{digest[:40]}"  # the same on every collection
                if self._made_before(name):
                    continue
                folder = self.worker.tmp_path()
                make_dir(folder)
                built.append((name, folder))
                data = json_bytes(rendered(record))
                write_new(folder / NOTIFICATION_FILE, data, sync=False)
            fsync_all(
                [folder / NOTIFICATION_FILE for _, folder in built],
                [folder for _, folder in built],
            )
            made = 0
            for name, folder in built:
                try:
                    rename_noreplace(folder, notify / name)
                    made += 1
                except FileExistsError:  # made by a collector that died before its cursor
                    continue
            if made:
                fsync_dir(notify)
            return made
        finally:
            for _, folder in built:
                remove_tree(folder)


def _batches(
    notifications: list[tuple[Place, str, int, dict[str, Any]]],
) -> Iterator[tuple[list[tuple[str, int, dict[str, Any]]], Place]]:
    """BATCH notifications at a time (never splitting a line's), each with the place after
    its last line: the cursor once the batch is published."""
    batch: list[tuple[str, int, dict[str, Any]]] = []
    for number, (place, txn, index, record) in enumerate(notifications):
        batch.append((txn, index, record))
        last = number + 1 == len(notifications)
        if last or (len(batch) >= BATCH and notifications[number + 1][0] != place):
            yield batch, place
            batch = []


@contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """An exclusive, non-blocking flock on a log's folder: True if this process has it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield os.fstat(fd).st_nlink > 0
    finally:
        os.close(fd)


def collect(spool: Spool, worker: Worker) -> int:
    """Collect every log once (`mercli notify --once`, tests)."""
    return Collector(spool, worker).collect()
