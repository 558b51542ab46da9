"""`mercli status`: what is waiting where, for people (a table) and for scripts (--json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mercli.commands.options import common_options
from mercli.durations import format_duration
from mercli.errors import SpoolError
from mercli.spool import INCOMING, Spool
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
    console = Console(file=sys.stdout if sys.stdout.isatty() else sys.stderr)
    console.print(_table(document))
    if document["recent_errors"]:
        console.print("[bold]Recent errors[/bold]")
        for error in document["recent_errors"]:
            console.print(f"  {error['id']}: {error['reason']}")


def _table(document: dict[str, Any]) -> Table:
    table = Table(title=f"spool {document['spool']}")
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
    for target, backlog in document["targets"].items():
        table.add_row(f"  -> {target}", str(backlog["jobs"]), "", "", "", "", style="dim")
    workers = document["workers"]
    table.caption = f"workers: {workers['live']} live, {workers['dead']} awaiting recovery"
    return table


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover
