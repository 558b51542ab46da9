"""`mercli metrics`: Prometheus metrics of the spool, printed, served over HTTP, or a textfile."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mercli.commands.options import common_options
from mercli.errors import ConfigError, SpoolError, UsageError
from mercli.spool import INCOMING, Spool

if TYPE_CHECKING:
    from mercli.metrics.state import CounterStore

log = logging.getLogger(__name__)


@click.command()
@common_options
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Serve the metrics over HTTP here (any path; Prometheus scrapes /metrics).",
)
@click.option(
    "--textfile",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="PATH",
    help="Write the metrics atomically to PATH (node_exporter's textfile collector).",
)
def metrics(spool: Path, listen: str | None, textfile: Path | None) -> None:
    """Prometheus metrics of the spool: event counters and backlog gauges.

    \b
    Counters (from the event log, e.g. mercli_received_instances_total,
    mercli_routed_total, mercli_dispatched_total{target}, mercli_failed_total,
    mercli_purged_total{state}) count everything since the spool began. Only the events
    logged since the last run are read: the counts and the log position are kept in
    SPOOL/metrics/state.json, and in memory with --listen.
    Gauges (from the spool folders, as `mercli status` shows them):
    mercli_spool_items{state}, mercli_spool_oldest_item_age_seconds{state},
    mercli_backlog_jobs{target,priority}, mercli_workers{state}, ...

    \b
    Without options the text exposition goes to stdout.
    --listen serves it over HTTP until SIGTERM/SIGINT; --textfile writes it for
    node_exporter (run it from cron or a systemd timer).

    \b
    Examples:
      mercli metrics --spool /var/spool/mercli | grep backlog
      mercli metrics --listen 127.0.0.1:9400
      mercli metrics --listen '[::]:9400'
      * * * * *  mercli metrics --textfile /var/lib/node_exporter/textfile/mercli.prom
    """
    if listen is not None and textfile is not None:
        raise UsageError("--listen and --textfile exclude each other")
    from mercli.metrics.collector import exposition
    from mercli.metrics.state import CounterStore

    store = CounterStore(_open(spool))
    if listen is not None:
        _serve(store, listen)
    elif textfile is not None:
        _write(textfile, exposition(store))
    else:
        click.echo(exposition(store).decode(), nl=False)


def _open(spool: Path) -> Spool:
    """The spool, or a read-only view of an existing one (then nothing is saved)."""
    try:
        return Spool.open(spool)
    except SpoolError:
        if not (spool / INCOMING).is_dir():
            raise
        return Spool.open_for_reading(spool)


def _write(path: Path, data: bytes) -> None:
    from mercli.metrics.textfile import write_textfile

    try:
        write_textfile(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write the textfile: {exc.strerror or exc} ({path})") from exc


def _serve(store: CounterStore, listen: str) -> None:
    from mercli.metrics.collector import registry_for
    from mercli.metrics.listen import parse_listen, serve
    from mercli.service import SIGNAL_POLL, stop_on_signals

    host, port = parse_listen(listen)
    stop = threading.Event()
    stop_on_signals(stop, "stopping the metrics listener")
    read = store.advance()  # catch up with the history now, not in the first scrape
    server = serve(registry_for(store), host, port)
    where = f"[{host}]" if ":" in host else host
    port = server.server_address[1]  # the one the kernel chose for port 0
    log.info("metrics on http://%s:%d/metrics (%d new events counted)", where, port, read)
    try:
        while not stop.wait(SIGNAL_POLL):  # see mercli.service.SIGNAL_POLL
            pass
    finally:
        server.shutdown()
        server.server_close()
