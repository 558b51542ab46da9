"""Collecting the notification log into `notify/`: one item per notification, in batches.

The stages write notifications as lines of their worker's log (`mercli.spool.notices`); this
turns the lines of committed transactions into notification items (a folder with
notification.json, as `mercli.notify` describes) that `mercli notify` claims and sends.

One collector at a time per log (an exclusive `flock` on the log's folder, never waited
for). A batch is written in this worker's scratch, synced together, renamed into `notify/`
under each notification's own id (never clobbering: a batch re-collected after a crash
finds its items there already), the folder synced once, and only then the cursor moved
(written whole, durably). A crash anywhere in between collects the batch again and sends
nothing twice that had not already been sent (an item already sent is the at-least-once
that a crash allows).
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
from mercli.spool.items import json_bytes
from mercli.spool.notices import (
    CURSOR_FILE,
    NOTICES_DIR,
    pending,
    read_cursor,
    segment_numbers,
    segment_path,
)

log = logging.getLogger(__name__)

BATCH = 1000  # notifications collected at most in one pass over one log
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # what new_id makes; anything else is renamed


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
                found = pending(folder, cursor, owner_exists=owner_exists, limit=BATCH)
                if found.notifications:
                    made += self._publish(owner, found.notifications)
                if not owner_exists and not found.waiting and not found.more:
                    remove_tree(folder)  # everything collected, and nobody writes here again
                    return made
                if found.cursor != cursor:
                    place = [found.cursor.segment, found.cursor.offset]
                    self.worker.replace_file(folder / CURSOR_FILE, json.dumps(place).encode())
                for number in segment_numbers(folder):
                    if number < found.cursor.segment:  # passed: never read again
                        unlink_quietly(segment_path(folder, number))
                if not found.more:
                    return made

    def _publish(self, owner: str, notifications: list[tuple[str, int, dict[str, Any]]]) -> int:
        """Items for a batch of notifications, durable before the caller moves the cursor.

        A notification whose item exists already (in notify/, claimed by a sender, sent or
        given up) is not made again: its batch was collected before, and the cursor could not
        be moved then (an error or a crash in between).
        """
        notify = self.spool.state_dir(NOTIFY)
        known = {item.name for item in self.spool.claimed(NOTIFY)}
        built: list[tuple[str, Path]] = []
        try:
            for txn, index, record in notifications:
                name = str(record.get("id") or "")
                if not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
                    digest = hashlib.sha256(f"{owner}/{txn}/{index}".encode()).hexdigest()
                    name = record["id"] = f"n{digest[:40]}"  # the same on every collection
                if name in known or any(
                    (self.spool.state_dir(state) / name).exists()
                    for state in (NOTIFY, NOTIFY_SENT, NOTIFY_FAILED)
                ):
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
