"""When is a file in a drop folder complete? Never read one early.

A file is ready when all of these hold:

1. It has not changed (inode, size, mtime) for `stable` seconds, seen by two listings.
2. No process has it open for writing, as far as /proc shows (local writers: cp, rsync
   --inplace, smbd for an SMB share, an FTP daemon; all of them if we run as root, those of our
   own user otherwise).
3. With inotify (Linux), the last event on it was a close after writing (IN_CLOSE_WRITE) or
   a rename into place (rsync's default) — not a write still unclosed. A file with no event
   seen (there before we started, or events lost) relies on 1 and 2; one whose close we never
   saw is taken after `LOST_CLOSE` of stability with no writer in /proc.
4. A Part 10 file's element lengths all close inside it (`check_complete`): a copy cut
   anywhere but exactly between two top-level elements is still incomplete. One that stays
   incomplete and unchanged for `incomplete_after` is failed with the reason.

Writers on other hosts (an NFS client) are invisible to 2 and 3; 1 and 4 still hold, so pick
`--stable` longer than their longest pause there.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from mercli.receive.dcmtk.completeness import check_complete

LOST_CLOSE = 60.0  # seconds of stability after which a close event we never saw is assumed


@dataclass
class _Seen:
    signature: tuple[int, int, int]
    since: float


class Readiness:
    """Tracks files across listings and events; `check()` says wait, go or fail."""

    def __init__(self, stable: float, incomplete_after: float, *, events: bool) -> None:
        self.stable = stable
        self.incomplete_after = incomplete_after
        self.events = events  # inotify close events are available
        self._seen: dict[str, _Seen] = {}
        self._open: dict[str, bool] = {}  # path -> written and not closed since
        self._lock = threading.Lock()

    def event(self, path: str, kind: str) -> None:
        """From the watchdog thread: `written`, `closed` (after writing) or `moved_in`."""
        with self._lock:
            self._open[path] = kind == "written"

    def forget(self, path: str) -> None:
        with self._lock:
            self._open.pop(path, None)
        self._seen.pop(path, None)

    def check(self, path: str, info: os.stat_result, now: float | None = None) -> str | None:
        """None: not yet; "" ready; any other text: give up, with that reason."""
        now = time.monotonic() if now is None else now
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is None or seen.signature != signature:
            self._seen[path] = _Seen(signature, now)
            return None
        quiet = now - seen.since
        if quiet < self.stable:
            return None
        with self._lock:
            unclosed = self._open.get(path, False)
        if self.events and unclosed and quiet < max(LOST_CLOSE, 10 * self.stable):
            return None
        if open_for_writing(path):
            return None
        problem = _incomplete(path)
        if problem is None:
            return ""
        return problem if quiet >= self.incomplete_after else None

    def next_check(self, now: float) -> float:
        """Seconds until a tracked file may have become stable."""
        waits = [s.since + self.stable - now for s in self._seen.values()]
        return max(min(waits, default=self.stable), 0.05)


def _incomplete(path: str) -> str | None:
    try:
        with open(path, "rb") as fp:
            if fp.read(132)[128:] != b"DICM":
                return None  # not Part 10 (a zip, a bare data set): nothing to walk
    except OSError:
        return None
    problem = check_complete(path)
    return problem if problem and problem.startswith("incomplete") else None


def open_for_writing(path: str) -> bool:
    """Whether any process we can see holds `path` open for writing (/proc/*/fd)."""
    target = os.path.realpath(path)
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as fdinfo:
                    flags = next((ln for ln in fdinfo if ln.startswith("flags:")), "flags: 0")
            except OSError:
                continue
            if int(flags.split()[1], 8) & (os.O_WRONLY | os.O_RDWR):
                return True
    return False
