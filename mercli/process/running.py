"""`running.json`: which module a processing claim is running right now, and its process group.

While a module runs, the runner keeps `running.json` in the job's claim folder
(`claims/<owner>/processing~<job>/`): module name, attempt, start time, pid, pgid (the same:
the module leads a process group of its own), the leader's start time from
`/proc/<pid>/stat` and the boot id. No patient data. It is replaced whole and removed when
the module ends; a claim of a dead worker may still hold one.

`mercli status` reads it (`running_modules`). `mercli process` uses it to kill what a dead
worker's module left running (`kill_orphans`) before recovery gives the claim back: the module
itself died with its parent (PR_SET_PDEATHSIG), but processes it started live on in its group.
A process group number is only signalled when it is provably the recorded one: same boot, and
either its leader is alive with the recorded start time, or the leader is gone and every
member of the group is in the leader's session and started no earlier than the leader did
(a pid, and so a pgid, is not reused while any process of the group lives).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.spool import PROCESSING, Spool, lease_is_held
from mercli.spool.items import KEY_SEPARATOR, list_subdirs

log = logging.getLogger(__name__)

RUNNING_FILE = "running.json"
_PROC = Path("/proc")


def boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(process group, session, start time in clock ticks) of a live process, or None."""
    try:
        data = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # after "pid (comm) "
    try:
        # fields[0] is the state (field 3): pgrp is field 5, session 6, starttime 22
        return int(fields[2]), int(fields[3]), int(fields[19])
    except (IndexError, ValueError):
        return None


def running_record(module: str, attempt: int, pid: int) -> dict[str, Any]:
    stat = proc_stat(pid)
    return {
        "module": module,
        "attempt": attempt,
        "started": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "pid": pid,
        "pgid": pid,
        "start_ticks": stat[2] if stat else None,
        "boot_id": boot_id(),
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def running_modules(spool: Spool, now: float | None = None) -> list[dict[str, Any]]:
    """Every module running (or left by a dead worker) right now, oldest first. Read-only."""
    now = time.time() if now is None else now
    found = []
    for owner in list_subdirs(spool.claims):
        for key_dir in list_subdirs(owner):
            state, _, job = key_dir.name.partition(KEY_SEPARATOR)
            if state != PROCESSING:
                continue
            record = _read(key_dir / RUNNING_FILE)
            if record is None:
                continue
            try:
                started = datetime.fromisoformat(str(record["started"])).timestamp()
            except (KeyError, ValueError):
                continue
            entry = {
                "job": job,
                "module": str(record.get("module", "?")),
                "started": record["started"],
                "seconds": round(max(0.0, now - started), 3),
            }
            if record.get("runner") == "slurm":  # SPEC §7.1: status shows the Slurm job
                entry["slurm_job"] = str(record.get("slurm_job", ""))
                entry["slurm_state"] = str(record.get("slurm_state", ""))
            found.append(entry)
    return sorted(found, key=lambda r: (r["started"], r["job"]))


def _group_is_recorded(record: dict[str, Any]) -> bool:
    """The process group still exists and is provably the one `record` describes."""
    try:
        pgid, ticks = int(record["pgid"]), int(record["start_ticks"])
    except (KeyError, TypeError, ValueError):
        return False
    if pgid <= 1 or record.get("boot_id") != boot_id():
        return False
    leader = proc_stat(pgid)
    if leader is not None:
        return leader[0] == pgid and leader[2] == ticks
    members = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[0] == pgid:
            members.append(stat)
    return bool(members) and all(sid == pgid and start >= ticks for _, sid, start in members)


def kill_orphans(spool: Spool) -> int:
    """SIGKILL the process groups that dead workers' modules left; how many were killed."""
    killed = 0
    for owner in list_subdirs(spool.claims):
        if lease_is_held(spool.leases / owner.name):
            continue
        for key_dir in list_subdirs(owner):
            record = _read(key_dir / RUNNING_FILE)
            if record is None or not _group_is_recorded(record):
                continue
            try:
                os.killpg(int(record["pgid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            killed += 1
            log.warning(
                "killed process group %s left by module %s of dead worker %s",
                record["pgid"],
                record.get("module"),
                owner.name,
            )
    return killed
