"""`mercli run`: the embedded default for a single box — receive, route, dispatch, purge (and
process, when the rules define modules)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import click

from mercli.commands.options import check_extra_tags, common_options, duration
from mercli.receive.handler import ReceiveConfig
from mercli.rules.config import load_rules
from mercli.supervisor import RunConfig, Supervisor

_DEFAULTS = ReceiveConfig()


@click.command()
@common_options
@click.option(
    "--rules",
    "rules_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The rules file for route (and purge retention).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=_DEFAULTS.port, show_default=True)
@click.option("--host", default=None, help="Address to listen on (default: all).")
@click.option("--aet", default=_DEFAULTS.aet, show_default=True, help="Our AE title.")
@click.option("--allow-aet", "allow_aets", multiple=True, metavar="AE", help="Calling AE allowed.")
@click.option("--any-called-aet", is_flag=True, help="Accept any called AE title.")
@click.option("--engine", type=click.Choice(["pynetdicom", "dcmtk"]), default="pynetdicom")
@click.option("--processes", type=click.IntRange(1, 64), default=None, help="Receiving processes.")
@click.option("--extra-tag", "extra_tags", multiple=True, metavar="TAG", callback=check_extra_tags)
@click.option("--network-timeout", callback=duration, help="See `mercli receive --help`.")
@click.option("--shutdown-grace", callback=duration, help="See `mercli receive --help`.")
@click.option("--tls-cert", metavar="FILE", help="See `mercli receive --help` (DICOM TLS).")
@click.option("--tls-key", metavar="FILE", help="See `mercli receive --help`.")
@click.option("--tls-ca", metavar="FILE", help="See `mercli receive --help`.")
@click.option("--tls-require-client-cert", is_flag=True, help="See `mercli receive --help`.")
@click.option("--tls-port", type=click.IntRange(0, 65535), help="See `mercli receive --help`.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--purge-every",
    default="1h",
    show_default=True,
    callback=duration,
    help="How often to run `mercli purge` (retention from [purge] in the rules); 0 = never.",
)
def run(
    spool: Path,
    rules_path: Path,
    port: int,
    host: str | None,
    aet: str,
    allow_aets: tuple[str, ...],
    any_called_aet: bool,
    engine: str,
    processes: int | None,
    extra_tags: tuple[str, ...],
    network_timeout: float | None,
    shutdown_grace: float | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_require_client_cert: bool,
    tls_port: int | None,
    workers: int,
    purge_every: float,
) -> None:
    """Receive, route, dispatch and purge in one command: a router on one box.

    \b
    Runs `mercli receive`, `mercli route --rules RULES` and `mercli dispatch` as child
    processes over one spool (and `mercli notify` when the rules define [notify.NAME]
    channels), prefixes their log lines with their names, restarts a part
    that dies, and runs `mercli purge` every --purge-every. A part that cannot start at all
    (port in use, invalid rules) stops everything with its exit code. SIGINT/SIGTERM stop
    receive first (open associations finish), then route, then dispatch; exit 0.

    \b
    Examples:
      mercli run --rules examples/rules.toml --spool ./spool
      mercli run --rules /etc/mercli/rules.toml --port 104 --aet ROUTER --workers 8
      TCP_NODELAY=1 storescu -aec MERCLI localhost 11112 *.dcm
    """
    ruleset = load_rules(rules_path)  # a broken rules file is reported before anything listens
    receive_args = ["--port", str(port), "--aet", aet, "--engine", engine]
    receive_args += ["--host", host] if host else []
    receive_args += [arg for ae in allow_aets for arg in ("--allow-aet", ae)]
    receive_args += ["--any-called-aet"] if any_called_aet else []
    receive_args += ["--processes", str(processes)] if processes else []
    receive_args += [arg for tag in extra_tags for arg in ("--extra-tag", tag)]
    receive_args += [] if network_timeout is None else ["--network-timeout", f"{network_timeout}"]
    receive_args += [] if shutdown_grace is None else ["--shutdown-grace", f"{shutdown_grace}"]
    receive_args += _tls_args(tls_cert, tls_key, tls_ca, tls_require_client_cert, tls_port)
    verbosity = _verbosity()
    config = RunConfig(spool, rules_path.resolve(), tuple(receive_args), workers, purge_every)
    config = replace(config, process=bool(ruleset.modules))
    config = replace(config, notify=bool(getattr(ruleset, "notify", {})))
    Supervisor(config, verbosity).run()


def _tls_args(
    cert: str | None, key: str | None, ca: str | None, require: bool, port: int | None
) -> list[str]:
    """The --tls-* options for the receive part, as given (receive checks them)."""
    files = (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca))
    args = [arg for name, value in files if value for arg in (name, value)]
    args += ["--tls-require-client-cert"] if require else []
    return args + ([] if port is None else ["--tls-port", str(port)])


def _verbosity() -> list[str]:
    """-v/-q for the parts: common_options set our own log level from them."""
    level = logging.getLogger("mercli").level
    return ["-v"] if level <= logging.DEBUG else ["-q"] if level >= logging.WARNING else []
