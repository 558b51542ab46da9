"""`mercli purge`: delete finished items past retention, or the oldest when the disk runs short."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mercli.commands.options import common_options, duration
from mercli.errors import ExitCode
from mercli.purge import (
    FreeSpace,
    KeepFree,
    OnItem,
    PurgeReport,
    delete_items,
    format_size,
    purge_for_space,
    retention_for,
    select_expired,
    select_for_space,
)
from mercli.rules.config import PURGE_STATES, PurgeSettings, load_rules
from mercli.spool import Spool, recover

PROGRESS_MIN = 200  # items; fewer finish before a bar would be worth drawing
DEFAULT_STATES = ("success", "discard")


def _states(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_STATES
    states = [part.strip() for part in value.split(",") if part.strip()]
    for state in states:
        if state not in PURGE_STATES:
            message = f"{state!r} is not one of {', '.join(PURGE_STATES)}"
            raise click.BadParameter(message, ctx=ctx, param=param)
    if not states:
        raise click.BadParameter("name at least one state", ctx=ctx, param=param)
    return tuple(s for s in PURGE_STATES if s in states)


def _keep_free(ctx: click.Context, param: click.Parameter, value: str | None) -> KeepFree | None:
    if value is None:
        return None
    try:
        return KeepFree.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.command()
@common_options
@click.option(
    "--older-than",
    callback=duration,
    metavar="DUR",
    help="Retention for every state purged (overrides [purge]); with --keep-free, a minimum age.",
)
@click.option(
    "--state",
    "states",
    callback=_states,
    metavar="STATES",
    help="Comma-separated states to purge: success, discard, error.  [default: success,discard]",
)
@click.option(
    "--dry-run", is_flag=True, help="List what would go (stdout) and totals; change nothing."
)
@click.option(
    "--keep-free",
    callback=_keep_free,
    metavar="PCT|SIZE",
    help="Disk-pressure mode: delete oldest first until this much is free (10%, 50G).",
)
@click.option(
    "--rules",
    "rules_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read retention from the [purge] table of this rules file.",
)
def purge(
    spool: Path,
    older_than: float | None,
    states: tuple[str, ...],
    dry_run: bool,
    keep_free: KeepFree | None,
    rules_path: Path | None,
) -> None:
    """Delete finished items (success/, discard/, error/) past their retention.

    \b
    Retention: success 3d and discard 3d, or the [purge] table of --rules
    (success = "3d", discard = "7d", error = "30d"); --older-than overrides it for every
    state purged. error/ is purged only when named with --state, and then needs
    --older-than or a configured error retention. Age counts from when an item entered its
    state. incoming/, outgoing/ and anything being worked on are never touched.

    \b
    --keep-free 10% (or 50G): if free space on the spool's filesystem is below that, delete
    the oldest items of success/, then discard/ (error/ only if named with --state), however
    young, until it is reached (--older-than then sets a minimum age). Exit 1 if it cannot be.

    \b
    Purged (or, with --dry-run, purgeable) items are printed as state/id on stdout; totals
    go to stderr. Each deletion is logged as a `purged` event. Safe from cron at any
    frequency, next to every other command. Exit: 0 done, 1 some items could not be deleted
    or not enough space freed, 2 usage, 3 bad rules, 4 spool unusable.

    \b
    Examples:
      mercli purge --rules /etc/mercli/rules.toml          # hourly from cron
      mercli purge --keep-free 10% -q > /dev/null         # every minute from cron
      mercli purge --state error --older-than 30d --dry-run
    """
    now = time.time()
    settings = load_rules(rules_path).purge if rules_path is not None else PurgeSettings()
    retention = None if keep_free else retention_for(states, settings, older_than)
    the_spool = Spool.open(spool)
    if not dry_run:
        recover(the_spool)  # a crashed purge's claims go back (or finish) before we list
    if keep_free is None:
        assert retention is not None
        candidates = select_expired(the_spool, retention, now)
        with _progress(len(candidates), dry_run) as on_item:
            report = delete_items(the_spool, candidates, now, dry_run=dry_run, on_item=on_item)
    else:
        candidates = select_for_space(the_spool, states, older_than or 0.0, now)
        with _progress(len(candidates), dry_run) as on_item:
            report = purge_for_space(
                the_spool, candidates, keep_free, now, dry_run=dry_run, on_item=on_item
            )
    for candidate in report.purged:
        click.echo(candidate.label)
    _summarize(report, keep_free)
    if report.failed or (report.space is not None and not report.space.reached):
        sys.exit(ExitCode.SOME_FAILED)


@contextmanager
def _progress(total: int, dry_run: bool) -> Iterator[OnItem | None]:
    """A rich progress bar on stderr for long purges on a terminal; else no callback."""
    if dry_run or total < PROGRESS_MIN or not sys.stderr.isatty():
        yield None
        return
    columns = (TextColumn("purging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("purge", total=total)
        yield lambda _candidate: bar.advance(task)


def _summarize(report: PurgeReport, keep_free: KeepFree | None) -> None:
    """Totals per state, failures and what disk-pressure mode did, on stderr."""
    quiet = not logging.getLogger("mercli").isEnabledFor(logging.INFO)
    for candidate, reason in report.failed:
        click.echo(f"Error: cannot purge {candidate.label}: {reason}", err=True)
    space = report.space
    if keep_free is not None and space is not None and not space.reached:
        click.echo(
            f"Error: could not free {keep_free} ({format_size(space.threshold)}): "
            f"{format_size(space.after)} free after purging every eligible item",
            err=True,
        )
    if quiet:
        return
    verb = "would purge" if report.dry_run else "purged"
    totals = report.totals()
    items = sum(count for count, _ in totals.values())
    size = sum(size for _, size in totals.values())
    detail = ", ".join(f"{s} {c} ({format_size(b)})" for s, (c, b) in totals.items())
    line = f"{verb} {items} item(s), {format_size(size)}" + (f": {detail}" if detail else "")
    if space is not None:
        line = _space_line(space, keep_free, report.dry_run) + ("; " + line if items else "")
    if report.vanished:
        line += f"; {report.vanished} taken by another process first"
    click.echo(line, err=True)


def _space_line(space: FreeSpace, keep_free: KeepFree | None, dry_run: bool) -> str:
    want = f"{keep_free} ({format_size(space.threshold)})"
    before = f"{format_size(space.before)} free of {format_size(space.total)}"
    if space.before >= space.threshold:
        return f"{before}, at least {want}: nothing to do"
    after = "would be" if dry_run else "now"
    return f"{before}, below {want}; {after} {format_size(space.after)} free"
