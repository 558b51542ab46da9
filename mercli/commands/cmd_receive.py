"""`mercli receive`: the C-STORE SCP that writes received instances durably into the spool."""

from __future__ import annotations

from pathlib import Path

import click

from mercli.commands.options import check_extra_tags, common_options
from mercli.receive.handler import ReceiveConfig
from mercli.receive.service import serve

_DEFAULTS = ReceiveConfig()


@click.command()
@common_options
@click.option("--port", type=click.IntRange(0, 65535), default=_DEFAULTS.port, show_default=True)
@click.option("--host", default=_DEFAULTS.host, show_default=True, help="Address to listen on.")
@click.option("--aet", default=_DEFAULTS.aet, show_default=True, help="Our AE title.")
@click.option(
    "--allow-aet",
    "allow_aets",
    multiple=True,
    metavar="AE",
    help="Accept associations only from these calling AE titles (repeatable). Default: any.",
)
@click.option(
    "--any-called-aet",
    is_flag=True,
    help="Accept any called AE title, not only --aet (the sidecar's ReceiverAET keeps it).",
)
@click.option(
    "--max-associations",
    type=click.IntRange(1),
    default=_DEFAULTS.max_associations,
    show_default=True,
    help="Concurrent associations, in total over all processes.",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=_DEFAULTS.processes,
    show_default="number of CPUs, at most 8",
    help="Listening processes sharing the port (SO_REUSEPORT); 1 = a single process.",
)
@click.option(
    "--extra-tag",
    "extra_tags",
    multiple=True,
    metavar="TAG",
    callback=check_extra_tags,
    help="Also write this tag into sidecars: a keyword or (gggg,eeee) (repeatable).",
)
@click.option(
    "--engine",
    type=click.Choice(["pynetdicom", "dcmtk"]),
    default=_DEFAULTS.engine,
    show_default=True,
    help="pynetdicom: mercli's own listener. dcmtk: DCMTK storescp + getdcmtags (see below).",
)
def receive(
    spool: Path,
    port: int,
    host: str,
    aet: str,
    allow_aets: tuple[str, ...],
    any_called_aet: bool,
    max_associations: int,
    processes: int,
    extra_tags: tuple[str, ...],
    engine: str,
) -> None:
    """Receive DICOM instances (C-STORE, C-ECHO) into spool/incoming/.

    Accepts every storage SOP class, private and unknown ones included, in whatever transfer
    syntax the sender proposes first: the dataset is stored byte for byte as sent, plus a
    file meta header, with a NAME.tags sidecar (see `mercli tags`). Success is answered only
    once both are durable on disk. A write failure or full disk answers 0xA700 and the
    listener keeps serving; an instance without readable UIDs answers 0xC210/0xC212 and is
    quarantined in spool/error/ with the reason.

    Runs until SIGINT or SIGTERM, then finishes open associations and exits 0.

    --engine dcmtk runs DCMTK's storescp (one process per association) into
    spool/staging/ and publishes each finished file with getdcmtags (`make build`). The
    spool ends the same, but storescp acknowledges before the sidecar is written, accepts any
    called AE title, and cannot apply --allow-aet, --host or --extra-tag (refused, exit 2).

    \b
    Examples:
      mercli receive --spool /var/spool/mercli --port 104 --aet ROUTER
      mercli receive --allow-aet CT1 --allow-aet MR2     # only these senders
      TCP_NODELAY=1 storescu -aec MERCLI localhost 11112 *.dcm
    """
    config = ReceiveConfig(
        host=host,
        port=port,
        aet=aet,
        allow_aets=allow_aets,
        any_called_aet=any_called_aet,
        max_associations=max_associations,
        processes=processes,
        extra_tags=extra_tags,
        engine=engine,
    )
    serve(spool, config)
