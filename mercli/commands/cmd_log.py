"""`mercli log`: the audit trail of a study, series, accession number or patient."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mercli.commands.options import common_options
from mercli.errors import SpoolError
from mercli.names import printable

if TYPE_CHECKING:
    from mercli.audit.trail import Trail
    from mercli.spool import Spool
    from mercli.spool.events import Cursor

HEADER = f"{'TIME (UTC)':<19}  {'EVENT':<10}  {'ITEM':<35}  {'SERIES / STUDY':<32}  DETAIL"


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Click callback: `2h`, `3d` (ago) or an ISO date or time (UTC unless it says)."""
    from mercli.durations import parse_duration

    if value is None:
        return None
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        message = f"{value!r} is neither a duration (2h, 3d) nor a date/time (2026-11-30T08:00)"
        raise click.BadParameter(message, ctx=ctx, param=param) from None
    # UTC, as the log's times and day files are: compared as text, they must read alike
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


@click.command()
@common_options
@click.option("--study", "studies", multiple=True, metavar="UID", help="StudyInstanceUID.")
@click.option("--series", multiple=True, metavar="UID", help="SeriesInstanceUID.")
@click.option("--accession", "accessions", multiple=True, metavar="NO", help="AccessionNumber.")
@click.option("--patient-id", "patient_ids", multiple=True, metavar="ID", help="PatientID.")
@click.option(
    "--since", callback=_since, metavar="T", help="Only events after T: 2h, 3d, or 2026-11-30."
)
@click.option("-f", "--follow", is_flag=True, help="Then print new events as they come (^C).")
@click.option("--json", "as_json", is_flag=True, help="NDJSON: the events as logged.")
def log(
    spool: Path,
    studies: tuple[str, ...],
    series: tuple[str, ...],
    accessions: tuple[str, ...],
    patient_ids: tuple[str, ...],
    since: datetime | None,
    follow: bool,
    as_json: bool,
) -> None:
    """The trail of every item from the event log: received, routed by which rules, held
    for a study, processed, dispatched (delivered) or failed, retried, resent, purged.

    \b
    Without a filter every event is shown. Filters may be repeated and combined (the
    trails of all of them are shown). --study and --patient-id take the whole study (or
    every study of the patient); --series takes the items of that series and the study
    jobs it went into. One line per event, oldest first; the instances a series batch
    received are one line ("12 instance(s) from CT1"). --json prints the events as
    logged, one JSON object per line, every received instance included.

    \b
    Events never hold patient IDs or accession numbers: they hold keyed hashes of them
    (HMAC with a secret of the spool, spool/keys/audit.key), which --patient-id and
    --accession compute to look them up. An index beside the log,
    spool/events/index.sqlite, is brought up to date on each run (only what is new is
    read) and rebuilt if missing or damaged; a first run on a big log takes a while.

    \b
    Examples:
      mercli log --study 1.2.840.113619.2.55.3.604688119.969.1268071029.320
      mercli log --accession A12345 --since 7d
      mercli log --patient-id 0012345 --json | jq -r 'select(.event=="failed") | .reason'
      mercli log --series 1.2.3.4.5 --follow
      mercli log --since 1h -f                      # everything, then tail
    """
    from mercli.audit.trail import Query, collect
    from mercli.spool import Spool

    opened = Spool.open(spool)
    query = Query(studies, series, accessions, patient_ids, since)
    try:
        history = collect(opened, query)
    except sqlite3.Error as exc:
        raise SpoolError(f"event index unusable: {exc} ({opened.events.directory})") from exc
    printer = Printer(as_json)
    printer.history(history.records, streamed=history.streamed)
    if follow:
        _follow(opened, history.cursor, history.trail, printer)


def _follow(spool: Spool, cursor: Cursor, trail: Trail | None, printer: Printer) -> None:
    """Tail the log until SIGINT/SIGTERM, then exit 0."""
    from mercli.audit.trail import follow
    from mercli.service import stop_on_signals

    stop, wake = threading.Event(), threading.Event()
    stop_on_signals(stop, "stopping mercli log --follow", wake)
    follow(spool.events, cursor, trail, printer.batch, stop, wake)


@dataclass
class Received:
    """The received events of one series batch from one sender, shown as one line."""

    first: Mapping[str, Any]
    count: int = 1
    last_at: str = ""


class Printer:
    """Writes events to stdout: NDJSON as logged, or one escaped line per event."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.header_done = False

    def history(self, records: Iterable[Mapping[str, Any]], *, streamed: bool = False) -> None:
        """Past events; a series batch's received instances collapsed into one line (only
        when they are next to each other in the log, for a `streamed` history: every event
        of the log, handed on one by one rather than held in memory)."""
        if self.as_json:
            for record in records:
                # ASCII escapes: a C1 control (CSI) in a value never reaches the terminal raw
                self._emit(json.dumps(record, separators=(",", ":")))
            return
        for line in runs(records) if streamed else collapse(records):
            if isinstance(line, Received):
                self._write(render(line.first, count=line.count, last_at=line.last_at))
            else:
                self._write(render(line))

    def batch(self, records: list[dict[str, Any]]) -> None:
        """New events from --follow, printed as they come."""
        self.history(records)

    def _write(self, line: str) -> None:
        if not self.header_done:
            self.header_done = True
            self._emit(HEADER)
        self._emit(line)

    @staticmethod
    def _emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def collapse(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any] | Received]:
    """Events in order, each run of `received` of one series and sender as one `Received`
    (a run ends when the series is routed, held or discarded: a later batch is a new line)."""
    lines: list[Mapping[str, Any] | Received] = []
    open_runs: dict[tuple[str, str], Received] = {}
    for record in records:
        series = str(record.get("series", ""))
        if record.get("event") == "received":
            key = (series, str(record.get("sender", "")))
            run = open_runs.get(key)
            if run is not None:
                run.count += 1
                run.last_at = str(record.get("at", ""))
                continue
            open_runs[key] = run = Received(record, last_at=str(record.get("at", "")))
            lines.append(run)
            continue
        for key in [k for k in open_runs if k[0] == series]:
            del open_runs[key]
        lines.append(record)
    return lines


def runs(records: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any] | Received]:
    """Events in order, each run of consecutive `received` of one series and sender as one
    `Received`; holds one run at most."""
    run: Received | None = None
    for record in records:
        if run is not None and _same_batch(run.first, record):
            run.count += 1
            run.last_at = str(record.get("at", ""))
            continue
        if run is not None:
            yield run
            run = None
        if record.get("event") == "received":
            run = Received(record, last_at=str(record.get("at", "")))
        else:
            yield record
    if run is not None:
        yield run


def _same_batch(first: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """Is `record` another instance received for the series and sender of `first`?"""
    return record.get("event") == "received" and all(
        record.get(field) == first.get(field) for field in ("series", "sender")
    )


def render(record: Mapping[str, Any], count: int = 1, last_at: str = "") -> str:
    """One event as a table line; every value escaped (names come from the network)."""
    at = str(record.get("at", ""))[:19].replace("T", " ")
    event = printable(record.get("event", "?"), 10)
    item = printable(record.get("item", "-"), 128)  # whole: ids are for copy and paste
    subject = _subject(record)
    detail = printable(_detail(record, count, last_at), 300)
    return f"{at:<19}  {event:<10}  {item:<35}  {subject:<32}  {detail}".rstrip()


def _subject(record: Mapping[str, Any]) -> str:
    series, study = record.get("series"), record.get("study")
    if isinstance(series, str):
        return printable(series)
    if isinstance(study, str):
        return "study " + printable(study)
    return "-"


def _names(values: Any) -> str:
    return ", ".join(str(v) for v in values) if isinstance(values, list) else str(values)


def _detail(record: Mapping[str, Any], count: int, last_at: str) -> str:
    """What happened, in words; unknown events show their other fields."""
    kind, get = record.get("event"), record.get
    if kind == "received":
        span = f" until {last_at[11:19]}" if count > 1 and last_at else ""
        again = " (replaced earlier copy)" if count == 1 and get("replaced") else ""
        return f"{count} instance(s) from {get('sender', '?')}{span}{again}"
    if kind == "routed":
        where = "processing" if get("process") else f"target {get('target', '?')}"
        size = f", {get('instances')} instance(s)" if "instances" in record else ""
        return f"rules {_names(get('rules', []))} -> {where}{size}"
    if kind == "held":
        return f"held for study rules {_names(get('held_for', []))} (study {get('study', '?')})"
    if kind == "discarded":
        return f"{get('reason', '')} (rules {_names(get('rules', []))})"
    if kind == "dispatched":
        return f"delivered to {get('target', '?')}, {get('instances', '?')} instance(s)"
    if kind == "failed":
        where = get("target") or get("module") or "?"
        return f"{where}: {get('reason', '')}"
    if kind == "retry":
        where = get("target") or get("module") or "?"
        return f"{where}: {get('error', '')}; retry in {get('delay', '?')} s"
    if kind == "resent":
        return f"from {get('from', '?')} to {get('to', '?')}"
    if kind == "purged":
        return f"from {get('state', '?')} ({get('bytes', '?')} bytes)"
    if kind == "processed":
        return f"rule {get('rule', '?')} -> {_names(get('outputs', []))}"
    shown = {k: v for k, v in record.items() if k not in ("at", "event", "item", "series")}
    return json.dumps(shown, separators=(",", ":"))
