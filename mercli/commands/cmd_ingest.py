"""`mercli ingest PATH...`: publish DICOM files, folders, DICOMDIRs and zips into incoming/."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from mercli.commands.options import check_extra_tags, common_options
from mercli.errors import ExitCode
from mercli.ingest import IngestConfig, IngestReport
from mercli.ingest import ingest as ingest_paths

_DEFAULTS = IngestConfig()
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


def parse_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """Click callback: `4G`, `200M`, `512k`, or bytes (powers of 1024), more than 0."""
    match = _SIZE.fullmatch(str(value))
    if not match or float(match.group(1)) <= 0:
        raise click.BadParameter(f"not a size: {value!r} (use e.g. 200M, 4G)", ctx, param)
    power = " KMGT".index((match.group(2) or " ").upper())
    return int(float(match.group(1)) * 1024**power)


def ingest_options(func: Callable[..., None]) -> Callable[..., None]:
    """Options `ingest` and `watch` share."""
    for option in reversed(
        [
            click.option(
                "--sender-aet",
                default=_DEFAULTS.sender_aet,
                show_default=True,
                metavar="AE",
                help="The sidecar's SenderAET (rules can match on it); SenderAddress is 'file'.",
            ),
            click.option(
                "--max-size",
                default="4G",
                show_default=True,
                callback=parse_size,
                help="Largest instance accepted (a file, or a zip member uncompressed).",
            ),
            click.option(
                "--extra-tag",
                "extra_tags",
                multiple=True,
                metavar="TAG",
                callback=check_extra_tags,
                help="Also write this tag into sidecars, as receive --extra-tag (repeatable).",
            ),
        ]
    ):
        func = option(func)
    return func


@click.command()
@common_options
@click.argument(
    "paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders of folders.")
@ingest_options
@click.option("--dry-run", is_flag=True, help="Read everything, publish nothing; print the series.")
@click.option(
    "--move", is_flag=True, help="Delete each source file once all it held is durable in the spool."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON summary on stdout instead.")
def ingest(
    spool: Path,
    paths: tuple[Path, ...],
    recursive: bool,
    sender_aet: str,
    max_size: int,
    extra_tags: tuple[str, ...],
    dry_run: bool,
    move: bool,
    as_json: bool,
) -> None:
    """Publish DICOM files into incoming/ exactly as receive would.

    PATH is a DICOM file (Part 10, or a bare data set), a folder (its files; sub-folders
    with -r), a DICOMDIR (the files it references, never outside its folder), or a zip
    archive (read in place, never extracted). `-` reads paths from stdin, one a line.
    Each instance gets receive's sidecar with SenderAET from --sender-aet and
    SenderAddress 'file', and route completes its series `settle` after the ingest ends.

    \b
    Non-DICOM files are skipped and counted; symlinks inside folders are not followed.
    Unreadable DICOM is quarantined in error/ with the reason. Sources are only read,
    unless --move. Prints the series published (one spool series name a line) on
    stdout; exit 1 if anything was quarantined or refused.

    \b
    Examples:
      mercli ingest --sender-aet CDIMPORT /media/cdrom/DICOMDIR
      mercli ingest -r --sender-aet OLDPACS /srv/export/
      mercli ingest study.zip && mercli route --rules rules.toml --once
      find /srv/in -name '*.dcm' -mtime -1 | mercli ingest -
    """
    if paths == (Path("-"),):
        paths = tuple(Path(line.rstrip("\n")) for line in sys.stdin if line.strip())
    config = IngestConfig(
        sender_aet=sender_aet, extra_tags=extra_tags, max_size=max_size, dry_run=dry_run
    )
    with _progress() as progress:
        report = ingest_paths(
            spool, paths, config, recursive=recursive, move=move, progress=progress
        )
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        for series in report.series:
            click.echo(series)
    _summary(report, dry_run)
    if not report.ok:
        click.get_current_context().exit(int(ExitCode.SOME_FAILED))


def _summary(report: IngestReport, dry_run: bool) -> None:
    verb = "would publish" if dry_run else "published"
    parts = [
        f"{report.files} file(s) read: {verb} {report.instances} instance(s) in "
        f"{len(report.series)} series",
        f"{report.not_dicom} not DICOM (skipped)" if report.not_dicom else "",
        f"{report.not_followed} symlink(s)/special file(s) not followed"
        if report.not_followed
        else "",
        f"{len(report.quarantined)} quarantined in error/" if report.quarantined else "",
        f"{len(report.failed)} refused" if report.failed else "",
        f"{report.moved} source file(s) deleted (--move)" if report.moved else "",
    ]
    click.echo("; ".join(p for p in parts if p), err=True)


@contextmanager
def _progress() -> Iterator[Callable[[int, int, str], None] | None]:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True, markup=False, highlight=False)
    with Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("ingest", total=None)

        def update(done: int, total: int, _label: str) -> None:
            bar.update(task, completed=done, total=total)

        yield update
