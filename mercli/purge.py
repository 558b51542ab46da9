"""Purge: delete finished items past their retention, or the oldest when the disk runs short.

**Age.** An item's age counts from when it entered its state: the st_ctime of its folder.
Entering success/, discard/ or error/ is one rename, which sets the ctime, and nothing in those
states changes an item afterwards. (A purge or resend that claims an item and then gives it
back, e.g. after a crash, renames it again: its age restarts. That errs on keeping images.)
Functions take `now` so that callers and tests can set the boundary exactly.

**Deleting through the protocol.** A published item is never removed in place: a concurrent
`resend` may be claiming it right now. Purge claims the item (one rename into its own claims
folder) and then commits an empty transaction, which deletes it (`mercli.spool` protocol
step 3): killed before the commit, recovery puts the item back; killed after, recovery
finishes the deletion. Nobody ever sees half an item. An item someone else claimed first is
skipped, and so is anything in incoming/, outgoing/ or claims/.

**Disk pressure** (`keep_free`): while free space on the spool's filesystem is below the
threshold, delete oldest-first from success/, then discard/, then error/ (only when asked for).
Free space is measured again after every deletion, because an instance hard-linked into a job
still waiting frees nothing when a finished copy goes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mercli.errors import UsageError
from mercli.rules.config import PURGE_STATES, PurgeSettings
from mercli.spool import Spool, Worker

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

OnItem = Callable[["Candidate"], None]


@dataclass(frozen=True)
class Candidate:
    """A published item that may be purged, as seen when the state was listed."""

    state: str
    name: str
    entered: float  # st_ctime of its folder: when it entered the state
    inode: int  # to notice an item replaced under the same name between listing and claim
    size: int  # bytes of its files (shared hard links counted in full)

    @property
    def label(self) -> str:
        """`state/name`, as purge and resend print and accept ids."""
        return f"{self.state}/{self.name}"

    def age(self, now: float) -> float:
        return now - self.entered


@dataclass(frozen=True)
class KeepFree:
    """A free-space threshold: a percentage of the filesystem, or a number of bytes."""

    percent: float | None = None
    size: int | None = None

    @classmethod
    def parse(cls, text: str) -> KeepFree:
        """`10%`, `50G`, `500M`, `1T`, `2048` (bytes; K/M/G/T are powers of 1024)."""
        if match := _PERCENT.fullmatch(text):
            percent = float(match.group(1))
            if not 0 < percent < 100:
                raise ValueError(f"a percentage must be between 0 and 100, not {text!r}")
            return cls(percent=percent)
        if match := _SIZE.fullmatch(text):
            return cls(size=int(float(match.group(1)) * _UNITS[match.group(2).lower()]))
        raise ValueError(f"not a percentage or size: {text!r} (use e.g. 10% or 50G)")

    def threshold(self, total: int) -> int:
        """Bytes that must be free on a filesystem of `total` bytes."""
        return int(total * self.percent / 100) if self.percent is not None else self.size or 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else format_size(self.size or 0)


@dataclass
class FreeSpace:
    """Free space on the spool's filesystem before and after a disk-pressure purge."""

    total: int
    threshold: int
    before: int
    after: int

    @property
    def reached(self) -> bool:
        return self.after >= self.threshold


@dataclass
class PurgeReport:
    """What a purge did (or, with dry_run, would do)."""

    dry_run: bool = False
    purged: list[Candidate] = field(default_factory=list)
    failed: list[tuple[Candidate, str]] = field(default_factory=list)
    vanished: int = 0  # claimed by someone else (a resend, another purge) first
    space: FreeSpace | None = None

    def totals(self) -> dict[str, tuple[int, int]]:
        """(items, bytes) per state purged, in PURGE_STATES order."""
        totals: dict[str, tuple[int, int]] = {}
        for state in PURGE_STATES:
            sizes = [c.size for c in self.purged if c.state == state]
            if sizes:
                totals[state] = (len(sizes), sum(sizes))
        return totals


def retention_for(
    states: Sequence[str], settings: PurgeSettings, older_than: float | None
) -> dict[str, float]:
    """The retention of each state to purge; `older_than` overrides the configured ones.

    error/ has no retention unless configured or given: failed items are evidence.
    """
    retention: dict[str, float] = {}
    for state in states:
        value = older_than if older_than is not None else settings.retention(state)
        if value is None:
            raise UsageError(
                f'{state}/ has no retention: give --older-than, or `{state} = "30d"` '
                "in the [purge] table of --rules"
            )
        retention[state] = value
    return retention


def list_state(spool: Spool, state: str) -> list[Candidate]:
    """The unclaimed items of a state, oldest first (claimed and vanishing ones left out)."""
    found = []
    for item in spool.items(state):
        try:
            info = os.stat(item.path, follow_symlinks=False)
            size = _tree_size(item.path)
        except FileNotFoundError:
            continue  # claimed or purged meanwhile
        found.append(Candidate(state, item.name, info.st_ctime, info.st_ino, size))
    found.sort(key=lambda c: (c.entered, c.name))
    return found


def select_expired(spool: Spool, retention: Mapping[str, float], now: float) -> list[Candidate]:
    """Items older than their state's retention, state by state, oldest first."""
    return [
        candidate
        for state in PURGE_STATES
        if state in retention
        for candidate in list_state(spool, state)
        if candidate.age(now) >= retention[state]
    ]


def select_for_space(
    spool: Spool, states: Iterable[str], min_age: float, now: float
) -> list[Candidate]:
    """Deletion order under disk pressure: all of success/ oldest first, then discard/, ..."""
    wanted = set(states)
    return [
        candidate
        for state in PURGE_STATES
        if state in wanted
        for candidate in list_state(spool, state)
        if candidate.age(now) >= min_age
    ]


def delete_items(
    spool: Spool,
    candidates: Sequence[Candidate],
    now: float,
    *,
    dry_run: bool = False,
    on_item: OnItem | None = None,
) -> PurgeReport:
    """Delete every candidate through the spool protocol (see module docstring)."""
    report = PurgeReport(dry_run=dry_run)
    if dry_run:
        report.purged = list(candidates)
        return report
    with Worker(spool, "purge") as worker:
        for candidate in candidates:
            _delete_one(worker, candidate, now, report)
            if on_item is not None:
                on_item(candidate)
    return report


def purge_for_space(
    spool: Spool,
    candidates: Sequence[Candidate],
    keep_free: KeepFree,
    now: float,
    *,
    dry_run: bool = False,
    on_item: OnItem | None = None,
) -> PurgeReport:
    """Delete candidates in order until `keep_free` bytes are free (or none is left).

    A dry run estimates what each deletion would free: the blocks of the files whose every
    link would be gone.
    """
    report = PurgeReport(dry_run=dry_run)
    total, free = disk_space(spool.root)
    space = report.space = FreeSpace(total, keep_free.threshold(total), free, free)
    if space.reached:
        return report
    if dry_run:
        links: dict[tuple[int, int], int] = {}
        for candidate in candidates:
            if space.after >= space.threshold:
                break
            space.after += _freed_bytes(spool.state_dir(candidate.state) / candidate.name, links)
            report.purged.append(candidate)
        return report
    with Worker(spool, "purge") as worker:
        for candidate in candidates:
            if space.after >= space.threshold:
                break
            _delete_one(worker, candidate, now, report)
            space.after = disk_space(spool.root)[1]
            if on_item is not None:
                on_item(candidate)
    return report


def disk_space(path: Path) -> tuple[int, int]:
    """(total, available) bytes of the filesystem at `path`, as an unprivileged writer sees it."""
    stats = os.statvfs(path)
    return stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize


def format_size(size: float) -> str:
    """`512 B`, `3.4 MB`, `1.2 GB` (powers of 1024, as `df -h`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _delete_one(worker: Worker, candidate: Candidate, now: float, report: PurgeReport) -> None:
    """Claim, check it is the item that was listed, delete by an empty transaction, log."""
    spool = worker.spool
    try:
        claim = worker.claim(candidate.state, candidate.name)
        if claim is None:
            report.vanished += 1
            return
        if os.stat(claim.path).st_ino != candidate.inode:
            claim.release()  # a different item now has that name: not the one selected
            report.vanished += 1
            return
        claim.transaction().commit()
    except OSError as exc:
        report.failed.append((candidate, exc.strerror or str(exc)))
        return
    report.purged.append(candidate)
    age = round(candidate.age(now))
    spool.log("purged", state=candidate.state, item=candidate.name, bytes=candidate.size, age=age)


def _tree_size(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


def _freed_bytes(path: Path, links: dict[tuple[int, int], int]) -> int:
    """Blocks freed by deleting `path`, given the links already counted as deleted."""
    freed = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            try:
                info = os.stat(os.path.join(directory, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            key = (info.st_dev, info.st_ino)
            links[key] = links.get(key, 0) + 1
            if links[key] >= info.st_nlink:
                freed += info.st_blocks * 512
    return freed
