"""Items set aside after an error that is not their peer's, so a worker loop goes on.

dispatch and notify pick the oldest due item again and again. If trying one fails in a way
the item's own retry schedule does not cover (the spool refuses a claim or a save because
the disk is full, a file is not what mercli wrote, a bug), picking it again at once would
retry it in a tight loop, and for a job already sent once, send it again and again. So the
item is set aside in memory: FIRST seconds, doubled with each such error in a row up to
MOST, forgotten when an attempt settles or the item is gone. Memory only, on purpose: what
set it aside may be the disk that would have to record it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

FIRST = 5.0  # seconds an item is set aside after its first error in a row
MOST = 300.0  # the longest it is set aside


class SetAside:
    """Which items wait, until when (monotonic time). Not thread-safe: callers hold their
    own lock."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self.errors: dict[str, int] = {}

    def hold(self, name: str, seconds: float | None = None) -> float:
        """Set `name` aside: for `seconds`, or after an error for FIRST doubling to MOST;
        never shorter than it already waits. Returns the seconds it now waits."""
        if seconds is None:
            errors = self.errors[name] = self.errors.get(name, 0) + 1
            seconds = min(MOST, FIRST * 2 ** (errors - 1))
        now = time.monotonic()
        self.until[name] = max(now + seconds, self.until.get(name, 0.0))
        return self.until[name] - now

    def waits(self, name: str) -> bool:
        return self.until.get(name, 0.0) > time.monotonic()

    def settled(self, name: str) -> None:
        """An attempt of `name` ended as its schedule says: errors in a row start again."""
        self.errors.pop(name, None)

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget items no longer there (moved on, or taken by another worker)."""
        present = set(names)
        for table in (self.until, self.errors):
            for gone in set(table) - present:
                del table[gone]

    def next_wall_time(self) -> float | None:
        """The wall-clock time the first waiting item may be tried, if any waits."""
        now = time.monotonic()
        ahead = [until - now for until in self.until.values() if until > now]
        return time.time() + min(ahead) if ahead else None
