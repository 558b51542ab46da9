"""`mercli import-mercure`: a mercure.json as rules.toml, and what could not come along."""

from __future__ import annotations

from pathlib import Path

import click

from mercli.errors import ExitCode
from mercli.migrate import import_mercure as convert_mercure
from mercli.migrate.report import CHANGED, DROPPED, TODO


@click.command("import-mercure", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", metavar="MERCURE_JSON", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default="current folder",
    help="Write DIR/rules.toml, and DIR/secrets/ for credentials found in mercure.json.",
)
@click.option("--force", is_flag=True, help="Replace an existing rules.toml and secret files.")
def import_mercure(config: Path, out: Path, force: bool) -> None:
    """Convert mercure's configuration (mercure.json) into a mercli rules.toml.

    Targets, rules (expressions unchanged), study triggers, priorities, processing
    modules, notifications, retention and timing are carried over; disabled rules are
    kept commented out. Credentials written inline in mercure.json (S3 keys, DICOMweb
    tokens and passwords, SFTP passwords) go into DIR/secrets/ (mode 0600) and
    rules.toml names the files. Every rules.toml written has passed the same checks as
    `mercli rules check`.

    stdout: the files written, one per line. stderr: what was not carried over (dropped)
    and why, what works differently (changed), what to do before switching (todo), and
    the commands that run the stages.

    \b
    Exit codes:
      0  everything carried over
      1  something was dropped (listed on stderr); rules.toml is written all the same
      2  rules.toml (or a secret file) exists and --force was not given
      3  MERCURE_JSON is not a mercure configuration (or not JSON)

    \b
    Examples:
      mercli import-mercure /opt/mercure/config/mercure.json --out /etc/mercli
      mercli import-mercure mercure.json --out new/ --force 2> import-report.txt
      mercli import-mercure mercure.json && mercli rules check rules.toml
      mercli rules test rules.toml /opt/mercure/data/success/*/   # decide on old cases
    """
    result = convert_mercure(config, out, force=force)
    click.echo(str(result.rules))
    for path in result.secrets:
        click.echo(str(path))
    report = result.report
    for kind in (DROPPED, CHANGED, TODO):
        for finding in report.of(kind):
            click.echo(str(finding), err=True)
    click.echo("next: run the stages with", err=True)
    for command in result.commands:
        click.echo(f"  {command}", err=True)
    if report.anything_dropped:
        count = len(report.of(DROPPED))
        click.echo(f"{count} item(s) not carried over (see 'dropped:' above)", err=True)
        click.get_current_context().exit(int(ExitCode.SOME_FAILED))
