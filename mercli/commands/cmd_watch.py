"""`mercli watch DIR`: a drop folder whose complete files are ingested, then moved away."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from mercli.commands.cmd_ingest import ingest_options
from mercli.commands.options import common_options, duration
from mercli.ingest import IngestConfig, WatchConfig
from mercli.ingest import watch as watch_folder
from mercli.ingest.watch import MAX_SCAN, MIN_SCAN
from mercli.service import ignore_signals, stop_on_signals

_DEFAULTS = WatchConfig()


def _scan_interval(ctx: click.Context, param: click.Parameter, value: str) -> float:
    seconds = duration(ctx, param, value) or 0.0
    if not MIN_SCAN <= seconds <= MAX_SCAN:
        raise click.BadParameter(f"must be between {MIN_SCAN:g}s and {MAX_SCAN:g}s", ctx, param)
    return seconds


def _positive(ctx: click.Context, param: click.Parameter, value: str) -> float:
    seconds = duration(ctx, param, value)
    if not seconds:
        raise click.BadParameter("must be more than 0", ctx=ctx, param=param)
    return seconds


@click.command()
@common_options
@click.argument(
    "folder", metavar="DIR", type=click.Path(path_type=Path, file_okay=False, exists=True)
)
@click.option(
    "--stable",
    default=f"{_DEFAULTS.stable:g}s",
    show_default=True,
    callback=_positive,
    help="A file must be closed and unchanged this long before it is read.",
)
@click.option(
    "--after",
    type=click.Choice(["done", "delete"]),
    default=_DEFAULTS.after,
    show_default=True,
    help="What happens to an ingested file: moved to DIR/.done/, or deleted.",
)
@click.option(
    "--scan-every",
    default=f"{_DEFAULTS.scan_every:g}s",
    show_default=True,
    callback=_scan_interval,
    help=f"Full listing of DIR at least this often ({MIN_SCAN:g}s to {MAX_SCAN:g}s).",
)
@click.option(
    "--incomplete-after",
    default=f"{_DEFAULTS.incomplete_after:g}s",
    show_default=True,
    callback=_positive,
    help="A DICOM file still cut short after this long unchanged goes to DIR/.failed/.",
)
@ingest_options
@click.option("--once", is_flag=True, help="Exit once nothing in DIR is waiting to be ingested.")
def watch(
    spool: Path,
    folder: Path,
    stable: float,
    after: str,
    scan_every: float,
    incomplete_after: float,
    sender_aet: str,
    max_size: int,
    extra_tags: tuple[str, ...],
    once: bool,
) -> None:
    """Ingest the files dropped into DIR, each once it is complete.

    A file is read only when it is closed after writing (inotify), no process has it open
    for writing, it has not changed for --stable, and (Part 10) its element lengths all
    close inside it: a half-copied file from cp, rsync --inplace or an SMB share is never
    read early. It is then published into incoming/ exactly as `mercli ingest` does
    (zip archives too), and moved to DIR/.done/ (or deleted, --after delete). Files that
    fail go to DIR/.failed/ with a .reason file beside them; symlinks are never followed
    (moved to .failed/). Sub-folders are watched too; names starting with '.' are ignored.

    \b
    A journal in DIR/.done/ makes a kill -9 at any point harmless: on restart, nothing
    already published is published again (see README). One watcher per DIR.
    Runs until SIGINT/SIGTERM (finishing the file in hand), or with --once until DIR
    holds nothing waiting.

    \b
    Examples:
      mercli watch --sender-aet SCANNER1 /srv/dropbox
      mercli watch --stable 10s --after delete /mnt/smb/export
    """
    stop = threading.Event()
    if not once:
        stop_on_signals(stop, "finishing the file in hand")
    config = WatchConfig(
        stable=stable, after=after, scan_every=scan_every, incomplete_after=incomplete_after
    )
    ingest = IngestConfig(sender_aet=sender_aet, extra_tags=extra_tags, max_size=max_size)
    watch_folder(spool, folder, config, ingest, stop=stop, once=once)
    if not once:
        ignore_signals()
