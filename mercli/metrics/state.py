"""The counts and the event-log cursor they reach, in memory and in `<spool>/metrics/state.json`.

Why a state file: `mercli metrics` and `--textfile` run from cron many times a day. Counting
the whole event log each time would grow with the history; with the counts and the cursor
saved, a run reads only what was logged since the last one.

Why it cannot be corrupted by two runs at once: the file is replaced whole (written in `tmp/`,
fsync'ed, renamed over, folder fsync'ed), so a reader sees the old or the new version, each a
consistent pair of counts and cursor. Runs also take an exclusive `flock` on the `metrics/`
folder (the kernel drops it when a process dies), waited for at most `LOCK_DEADLINE`, so they
advance one after the other and the file never moves backwards. A run that cannot have the lock
in time (or cannot write the spool) still counts, from the file as it is, and does not save:
the worst case is counting the same new lines again next time, never counting them twice.

The folder is the spool's own (SPEC §3 allows internal folders): recovery, purge and status
look only at the folders they know, so they leave it alone. It holds no patient data.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mercli.fsutil import fsync_dir, make_dir, unlink_quietly, write_new
from mercli.metrics.counters import EventCounts
from mercli.names import new_id
from mercli.spool import LOCK_DEADLINE, Spool
from mercli.spool.events import Cursor

log = logging.getLogger(__name__)

STATE_DIR = "metrics"
STATE_FILE = "state.json"
VERSION = 1
_LOCK_POLL = 0.02


class CounterStore:
    """Counts of the event log up to `cursor`, advanced on demand (thread-safe).

    `persist`: load the state file when it is ahead of memory and save after advancing. A
    listener and one-shot runs both use it, so they can share one spool's state file.
    """

    def __init__(self, spool: Spool, *, persist: bool = True) -> None:
        self.spool = spool
        self.persist = persist
        self.counts = EventCounts()
        self.cursor = Cursor()
        self.folder = spool.root / STATE_DIR
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def advance(self) -> int:
        """Count the events logged since the cursor; the number of events read."""
        with self._lock:
            if not self.persist:
                return self._read_new()
            with _exclusive(self.folder) as locked:
                self._adopt_saved()
                read = self._read_new()
                if locked and read:
                    self._save()
                return read

    def _read_new(self) -> int:
        read = 0
        for event, cursor in self.spool.events.read_after(self.cursor):
            self.counts.count(event)
            self.cursor = cursor
            read += 1
        return read

    def _adopt_saved(self) -> None:
        """Take the saved counts if they reach further than ours (another run advanced them)."""
        try:
            document = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("metrics state unreadable, counting from memory (%s): %s", self.path, exc)
            return
        if not isinstance(document, dict) or document.get("version") != VERSION:
            return
        cursor = Cursor.from_json(document.get("cursor"))
        if cursor > self.cursor:
            self.counts = EventCounts.from_json(document.get("counts"))
            self.cursor = cursor

    def _save(self) -> None:
        """Replace the state file whole; a failure costs only recounting next time."""
        document = {"version": VERSION, "cursor": self.cursor.to_json()}
        data = json.dumps({**document, "counts": self.counts.to_json()}).encode()
        temp = self.spool.tmp / f"metrics.{new_id()}.json"  # a loose tmp/ file: reaped if left
        try:
            write_new(temp, data)
            os.replace(temp, self.path)
            fsync_dir(self.folder)
        except OSError as exc:
            unlink_quietly(temp)
            log.warning("cannot save metrics state (%s): %s", self.path, exc.strerror or exc)


@contextmanager
def _exclusive(folder: Path) -> Iterator[bool]:
    """Hold an exclusive flock on the state folder (made if missing); False if not had in time.

    False too where the folder cannot be made or opened (a read-only spool): then nobody
    saves, and the run only reads.
    """
    try:
        make_dir(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("metrics state folder unusable (%s): %s", folder, exc)
        yield False
        return
    try:
        yield _lock_by(fd, time.monotonic() + LOCK_DEADLINE)
    finally:
        os.close(fd)  # drops the lock


def _lock_by(fd: int, deadline: float) -> bool:
    while True:
        with suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        if time.monotonic() >= deadline:
            log.warning("metrics state locked by another process: counting without saving")
            return False
        time.sleep(_LOCK_POLL)
