"""`mercli process`: run the processing jobs in processing/ through their modules (SPEC §7)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mercli.commands.options import common_options
from mercli.errors import ExitCode
from mercli.process.service import ProcessService


@click.command()
@common_options
@click.option("--once", is_flag=True, help="Run every job that is due now once, then exit.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Modules run at the same time (one job each).",
)
def process(spool: Path, once: bool, workers: int) -> None:
    """Run the processing jobs in spool/processing/ and publish their output.

    \b
    Needs no config: each job carries its module chain and targets (from the rules file
    route used). Each module gets in/ (the instances as <series>#<sop>.dcm with .tags
    sidecars, and a mercure-style task.json) and an empty out/, via MERCURE_IN_DIR and
    MERCURE_OUT_DIR, so mercure modules run unchanged. Its DICOM output (and result.json)
    becomes dispatch jobs for the rule's targets, or new series for routing with
    results = "route", in one transaction with the job's move to spool/success/.

    \b
    A failed run (non-zero exit, timeout, output that is not DICOM, no output) is retried
    after the module's retry_delay, growing by retry_backoff; after max_attempts or max_age
    the job goes to spool/error/ with the exit status and the tail of module.log.

    \b
    Exit (--once): 0 all processed, 1 some jobs failed or wait for a retry.

    \b
    Examples:
      mercli process --spool /var/spool/mercli --workers 2
      mercli process --once
    """
    summary = ProcessService(spool, workers).run(once=once)
    click.echo(
        f"processed {summary.processed} job(s), {summary.retried} to retry, "
        f"{summary.failed} failed",
        err=True,
    )
    for output in summary.outputs:
        click.echo(output)
    if once and (summary.failed or summary.retried):
        sys.exit(ExitCode.SOME_FAILED)
