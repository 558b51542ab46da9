"""`mercli resend`: put discarded, failed or delivered items back to work."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from mercli.commands.options import common_options, read_ids
from mercli.errors import ConfigError, ExitCode, UsageError
from mercli.jobs import Target
from mercli.resend import (
    FROM_STATES,
    Filters,
    ResendReport,
    Selected,
    parse_time,
    resend_items,
    select,
)
from mercli.rules.config import load_rules
from mercli.spool import Spool, recover


def _time(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_time(value, time.time())
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


@click.command()
@common_options
@click.option(
    "--from",
    "from_state",
    required=True,
    type=click.Choice(FROM_STATES),
    help="The state to resend from.",
)
@click.option("--study", metavar="UID", help="Only this StudyInstanceUID.")
@click.option("--series", metavar="UID", help="Only this SeriesInstanceUID.")
@click.option("--patient-id", metavar="ID", help="Only this PatientID.")
@click.option("--accession", metavar="NO", help="Only this AccessionNumber.")
@click.option("--since", callback=_time, metavar="T", help="Entered the state at or after T.")
@click.option("--until", callback=_time, metavar="T", help="Entered the state before T.")
@click.option(
    "--rules",
    "rules_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Rules file that defines --target.",
)
@click.option("--target", "target_name", metavar="NAME", help="Send straight to this target.")
@click.option("--all", "everything", is_flag=True, help="Select every item of the state.")
@click.option("--dry-run", is_flag=True, help="List what would be resent; change nothing.")
@click.argument("ids", nargs=-1, metavar="[ID ... | -]")
def resend(
    spool: Path,
    from_state: str,
    study: str | None,
    series: str | None,
    patient_id: str | None,
    accession: str | None,
    since: float | None,
    until: float | None,
    rules_path: Path | None,
    target_name: str | None,
    everything: bool,
    dry_run: bool,
    ids: tuple[str, ...],
) -> None:
    """Re-inject discarded, failed or delivered items.

    \b
    Selects items of --from by filters (all must match): --study, --series, --patient-id,
    --accession (from job.json, the sidecars, or the instance itself), --since/--until on
    when the item entered its state (2h = two hours ago, 2026-11-28, 2026-11-28T14:00; local
    time unless a zone is given), and ids given as arguments or one per line on stdin with
    `-` (`discard/ID` or plain `ID`, as `mercli purge --dry-run` prints them). With no id
    and no filter, --all is needed.

    \b
    Where they go:
      default                back through routing with the current rules (incoming/<series>)
      --from error           a failed job goes back to its own target; only the instances
                             the target does not have yet are sent again
      --rules F --target T   straight to target T of rules file F, one new job per item

    \b
    A study job or discarded study (SPEC 4.1) stays one: to a target it becomes one new
    study job with the same series; back to routing each of its series goes to
    incoming/<series> (one line each), and study rules collect the study again.
    --series selects a study item holding that series.

    \b
    The source item is deleted only once its copy is safely in place; a crash leaves one or
    the other, never both. Resending twice is harmless: the second run finds nothing unless
    the copies came back to that state meanwhile. New items are printed on stdout
    (`incoming/<series>` or `outgoing/<job>`), one per line.
    Exit: 0 done, 1 some items could not be resent, 2 usage, 3 bad rules or unknown target,
    4 spool unusable.

    \b
    Examples:
      mercli resend --from discard --study 1.2.840.113619.2.55.3
      mercli resend --from error --since 1d
      mercli purge --state discard --older-than 0 --dry-run | mercli resend --from discard -
      mercli resend --from success --series 1.2.3 --rules rules.toml --target archive
    """
    names = read_ids(ids, (from_state,))
    filters = Filters(study, series, patient_id, accession, since, until, names)
    if names is None and not everything and filters == Filters():
        raise UsageError("select items: give ids, `-`, a filter (--study, --series, ...) or --all")
    target, offpeak = _target(rules_path, target_name)
    the_spool = Spool.open(spool)
    if not dry_run:
        recover(the_spool)  # a crashed resend's claims go back (or finish) before we list
    selected, missing = select(the_spool, from_state, filters)
    for name in missing:
        click.echo(f"Error: no item {name} in {from_state}/ (or it is being worked on)", err=True)
    if dry_run:
        for item in selected:
            click.echo(item.label)
        _summarize(selected, None, target, from_state)
    else:
        report = resend_items(the_spool, selected, target=target, offpeak=offpeak)
        for _source, copy in report.resent:
            click.echo(copy)
        _summarize(selected, report, target, from_state)
        if report.failed:
            sys.exit(ExitCode.SOME_FAILED)
    if missing:
        sys.exit(ExitCode.SOME_FAILED)


def _target(rules_path: Path | None, name: str | None) -> tuple[Target | None, str | None]:
    """The target named by --target in --rules, and the rules' offpeak window (for an offpeak
    target's jobs); both options or neither must be given."""
    if (rules_path is None) != (name is None):
        raise UsageError("--rules and --target go together")
    if rules_path is None or name is None:
        return None, None
    ruleset = load_rules(rules_path)
    if name not in ruleset.targets:
        defined = ", ".join(ruleset.targets) or "none"
        raise ConfigError(f'unknown target "{name}" ({rules_path}; defined: {defined})')
    return ruleset.targets[name], ruleset.offpeak_window


def _summarize(
    selected: list[Selected], report: ResendReport | None, target: Target | None, state: str
) -> None:
    """Failures always; totals unless -q; all on stderr."""
    if report is not None:
        for label, reason in report.failed:
            click.echo(f"Error: cannot resend {label}: {reason}", err=True)
    if not logging.getLogger("mercli").isEnabledFor(logging.INFO):
        return
    where = f"target {target.name}" if target is not None else "routing"
    if target is None and state == "error":
        where += " (failed jobs: to their own target)"
    if report is None:
        click.echo(f"would resend {len(selected)} item(s) to {where}", err=True)
        return
    line = f"resent {report.items} of {len(selected)} item(s) to {where}"
    if report.vanished:
        line += f"; {report.vanished} taken by another process first"
    click.echo(line, err=True)
