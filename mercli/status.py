"""What is in the spool right now: counts per state, ages, per-target backlog, recent errors.

`priorities` counts the jobs of outgoing/ (the backlog) and error/ per priority (urgent,
normal, offpeak; a job.json without one is normal); each target's backlog is split the same
way (`targets.<name>.priorities`). `running` lists the processing modules running right now
(job, module, started, seconds), from the claims' `running.json`. `notify` has the
notification outbox per channel (`channels.<name>`: waiting, failed) and the latest
notifications given up (`recent_failures`, from notify_failed/).

Read-only: it looks at leases without recovering them, so `mercli status` is safe to run
anywhere, any time, as often as a monitoring system likes.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercli.jobs import PRIORITIES, job_priority, read_json_object
from mercli.process.running import running_modules
from mercli.spool import (
    ERROR,
    ERROR_FILE,
    INSTANCE_SUFFIX,
    JOB_FILE,
    NOTIFICATION_FILE,
    NOTIFY,
    NOTIFY_FAILED,
    OUTGOING,
    STATES,
    Item,
    Spool,
    lease_state,
)
from mercli.spool.notices import uncollected

RECENT_ERRORS = 5
PRIORITY_STATES = (OUTGOING, ERROR)  # states whose jobs are counted per priority


@dataclass
class StateCounts:
    """Totals for one state folder (claimed items included: they are in flight)."""

    items: int = 0
    instances: int = 0
    bytes: int = 0
    claimed: int = 0
    oldest: float | None = None  # epoch seconds when the oldest item entered the state

    def as_json(self, now: float) -> dict[str, Any]:
        age = None if self.oldest is None else round(max(0.0, now - self.oldest), 3)
        return {
            "items": self.items,
            "instances": self.instances,
            "bytes": self.bytes,
            "claimed": self.claimed,
            "oldest_age_s": age,
        }


def collect_status(spool: Spool) -> dict[str, Any]:
    """The `mercli status --json` document (SPEC §2; extra keys allowed)."""
    now = time.time()
    states: dict[str, StateCounts] = {}
    priorities = {state: _no_jobs() for state in PRIORITY_STATES}
    targets: dict[str, dict[str, int]] = {}
    for state in STATES:
        counts = states[state] = StateCounts()
        for item in spool.items(state) + spool.claimed(state):
            _add_item(counts, item)
            if state not in PRIORITY_STATES:
                continue
            record = read_json_object(item.path / JOB_FILE)
            if state == OUTGOING:
                by_target = targets.setdefault(_job_target(record), _no_jobs())
                by_target[job_priority(record)] += 1
            if "target" in record:  # a job (error/ also holds instances receive refused)
                priorities[state][job_priority(record)] += 1
    return {
        "spool": str(spool.root),
        "states": {state: counts.as_json(now) for state, counts in states.items()},
        "targets": {
            name: {"jobs": sum(counts.values()), "priorities": counts}
            for name, counts in sorted(targets.items())
        },
        "priorities": priorities,
        "recent_errors": _recent_errors(spool),
        "workers": _workers(spool),
        "running": running_modules(spool, now),
        "notify": _notify(spool),
    }


def _no_jobs() -> dict[str, int]:
    return dict.fromkeys(PRIORITIES, 0)


def _add_item(counts: StateCounts, item: Item) -> None:
    counts.items += 1
    counts.claimed += item.claimed_by is not None
    try:
        entered = item.path.stat().st_ctime
    except FileNotFoundError:
        return  # moved on while we looked
    counts.oldest = entered if counts.oldest is None else min(counts.oldest, entered)
    instances, size = _measure(item.path)
    counts.instances += instances
    counts.bytes += size


def _measure(path: Path) -> tuple[int, int]:
    """DICOM files and bytes under an item (hard links to shared pixel data count each time)."""
    instances = size = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    sub_instances, sub_size = _measure(Path(entry.path))
                    instances += sub_instances
                    size += sub_size
                elif entry.is_file(follow_symlinks=False):
                    instances += entry.name.endswith(INSTANCE_SUFFIX)
                    size += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    return instances, size


def _job_target(record: dict[str, Any]) -> str:
    target = record.get("target", {})
    name = target.get("name") if isinstance(target, dict) else target
    return str(name) if name else "?"


def _recent_errors(spool: Spool) -> list[dict[str, Any]]:
    recent = []
    for item in sorted(spool.items(ERROR), key=lambda i: i.name, reverse=True)[:RECENT_ERRORS]:
        record = read_json_object(item.path / ERROR_FILE)
        recent.append(
            {"id": item.name, "reason": record.get("reason", "?"), "at": record.get("at")}
        )
    return recent


def _notify(spool: Spool) -> dict[str, Any]:
    """The notification outbox per channel (waiting: in notify/, claimed, or still in a
    worker's notification log; and failed for good) and the latest failures with their
    reasons (SPEC §8)."""
    channels: dict[str, dict[str, int]] = {}
    for key, state in (("waiting", NOTIFY), ("failed", NOTIFY_FAILED)):
        for item in spool.items(state) + spool.claimed(state):
            record = read_json_object(item.path / NOTIFICATION_FILE)
            channel = record.get("channel")
            name = str(channel.get("name") or "?") if isinstance(channel, dict) else "?"
            counts = channels.setdefault(name, {"waiting": 0, "failed": 0})
            counts[key] += 1
    for record in uncollected(spool.root):  # in the workers' logs, not yet in notify/
        channel = record.get("channel")
        name = str(channel.get("name") or "?") if isinstance(channel, dict) else "?"
        channels.setdefault(name, {"waiting": 0, "failed": 0})["waiting"] += 1
    failed = sorted(spool.items(NOTIFY_FAILED), key=lambda i: i.name, reverse=True)
    recent = []
    for item in failed[:RECENT_ERRORS]:
        record = read_json_object(item.path / ERROR_FILE)
        recent.append(
            {"id": item.name, "reason": record.get("reason", "?"), "at": record.get("at")}
        )
    return {"channels": dict(sorted(channels.items())), "recent_failures": recent}


def _workers(spool: Spool) -> dict[str, int]:
    """Live and dead (not yet recovered) workers, by the lock test recovery itself makes.

    `live` counts every lease recovery would leave alone. `stuck`, present only when there
    are any, counts those of them whose owner is gone from this host while another process
    holds the lock: their claims wait until it is dropped (see `mercli.spool.recovery`).
    """
    states = Counter(lease_state(lease) for lease in spool.leases.glob("*"))
    workers = {"live": states["live"] + states["stuck"], "dead": states["dead"]}
    if states["stuck"]:
        workers["stuck"] = states["stuck"]
    return workers
