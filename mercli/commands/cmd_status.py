"""`mercli status`: what is waiting where, for people (a table) and for scripts (--json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mercli.commands.options import common_options
from mercli.durations import format_duration
from mercli.errors import SpoolError
from mercli.names import printable
from mercli.spool import INCOMING, NOTIFY, OUTGOING, Spool
from mercli.status import collect_status


@click.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def status(spool: Path, as_json: bool) -> None:
    """Counts per state, oldest item age, per-target backlog and recent errors.

    \b
    States: incoming (series waiting for routing), outgoing (jobs waiting for or in
    dispatch), success, discard and error (kept for retention; resendable).
    Items are series batches in incoming and jobs elsewhere; instances are DICOM files.
    Claimed items are being worked on right now and are counted in their state.
    Outgoing jobs are also counted per priority (urgent, normal, offpeak), in total and
    per target; --json has them under "priorities" and "targets.NAME.priorities".
    Processing modules running right now get a line each ("running" in --json), with the
    Slurm job id and state for modules run by Slurm. Notifications are counted per channel
    under the notify row ("~> NAME": waiting to be sent, also those still in the stages'
    notification logs; how many were given up), with the latest given up and why.

    \b
    Examples:
      mercli status --spool /var/spool/mercli
      mercli status --json | jq '.states.outgoing.items'
    """
    try:
        opened = Spool.open(spool)
    except SpoolError:
        if not (spool / INCOMING).is_dir():
            raise
        opened = Spool.open_for_reading(spool)  # an existing read-only spool can be looked at
    document = collect_status(opened)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    # markup off and every value escaped: target names, ids and error reasons can carry text
    # from the network (a UID in a reason), which must never act on the terminal
    console = Console(file=sys.stdout if sys.stdout.isatty() else sys.stderr, markup=False)
    console.print(_table(document))
    if document["recent_errors"]:
        console.print(Text("Recent errors", style="bold"))
        for error in document["recent_errors"]:
            console.print(Text(f"  {printable(error['id'])}: {printable(error['reason'], 300)}"))
    if document["notify"]["recent_failures"]:
        console.print(Text("Recent notifications given up", style="bold"))
        for failure in document["notify"]["recent_failures"]:
            reason = printable(str(failure["reason"]), 300)
            console.print(Text(f"  {printable(failure['id'])}: {reason}"))


def _table(document: dict[str, Any]) -> Table:
    table = Table(title=Text(f"spool {printable(document['spool'], 0)}"))
    for column in ("state", "items", "instances", "size", "claimed", "oldest"):
        table.add_column(column, justify="left" if column == "state" else "right")
    for state, counts in document["states"].items():
        table.add_row(
            state,
            str(counts["items"]),
            str(counts["instances"]),
            _size(counts["bytes"]),
            str(counts["claimed"]),
            format_duration(counts["oldest_age_s"]),
        )
        if state == NOTIFY:  # per channel: waiting (collected or not yet) and given up
            for channel, counts in document["notify"]["channels"].items():
                failed = f" ({counts['failed']} failed)" if counts["failed"] else ""
                name = Text(f"  ~> {printable(channel)}{failed}")
                table.add_row(name, str(counts["waiting"]), "", "", "", "", style="dim")
        if state == OUTGOING:  # the backlog per priority, when there is one
            for priority, jobs in document["priorities"][OUTGOING].items():
                if jobs:
                    table.add_row(Text(f"  {priority}"), str(jobs), "", "", "", "", style="dim")
    for target, backlog in document["targets"].items():
        split = _priorities(backlog["priorities"])
        name = Text(f"  -> {printable(target)}{split}")
        table.add_row(name, str(backlog["jobs"]), "", "", "", "", style="dim")
    for running in document.get("running", []):
        line = f"  running {printable(running['module'])} on {printable(running['job'])}"
        if running.get("slurm_job"):
            slurm = f"{running['slurm_job']} {running.get('slurm_state', '')}".strip()
            line += f" (Slurm job {printable(slurm)})"
        age = format_duration(running["seconds"])
        table.add_row(Text(line), "", "", "", "", age, style="dim")
    workers = document["workers"]
    caption = f"workers: {workers['live']} live, {workers['dead']} awaiting recovery"
    if workers.get("stuck"):
        caption += f", {workers['stuck']} stuck (lease locked by another process)"
    table.caption = caption
    return table


def _priorities(counts: dict[str, int]) -> str:
    """` (1 urgent, 2 offpeak)`: the jobs that are not normal, if any (the rest are)."""
    other = [
        f"{jobs} {priority}" for priority, jobs in counts.items() if jobs and priority != "normal"
    ]
    return f" ({', '.join(other)})" if other else ""


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover
