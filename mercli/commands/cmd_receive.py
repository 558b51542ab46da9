"""`mercli receive`: the C-STORE SCP that writes received instances durably into the spool."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from mercli.commands.options import check_extra_tags, common_options, duration
from mercli.dicom.tls import TlsConfigError
from mercli.receive.handler import ReceiveConfig
from mercli.receive.service import serve

_DEFAULTS = ReceiveConfig()


def _positive(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """Click callback: a duration (`30s`, `2m`, seconds) that is more than 0."""
    seconds = duration(ctx, param, value)
    if not seconds:
        raise click.BadParameter("must be more than 0", ctx=ctx, param=param)
    return seconds


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
    default=None,
    show_default="number of CPUs, at most 8; with --engine dcmtk a quarter of them, 1 to 4",
    help="Listening processes sharing the port (SO_REUSEPORT); 1 = a single process. With "
    "--engine dcmtk: getdcmtags processes publishing what storescp received.",
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
    "--acse-timeout",
    default=f"{_DEFAULTS.acse_timeout:g}s",
    show_default=True,
    callback=_positive,
    help="Time a connection has to send its whole association request.",
)
@click.option(
    "--network-timeout",
    default=f"{_DEFAULTS.network_timeout:g}s",
    show_default=True,
    callback=_positive,
    help="Silence allowed between PDUs, and the time one PDU may take to arrive.",
)
@click.option(
    "--shutdown-grace",
    default=f"{_DEFAULTS.shutdown_grace:g}s",
    show_default=True,
    callback=duration,
    help="On SIGINT/SIGTERM, time open associations get before they are aborted.",
)
@click.option(
    "--engine",
    type=click.Choice(["pynetdicom", "dcmtk"]),
    default=_DEFAULTS.engine,
    show_default=True,
    help="pynetdicom: mercli's own listener. dcmtk: DCMTK storescp + getdcmtags (see below).",
)
@click.option(
    "--tls-cert",
    metavar="FILE",
    help="Serve DICOM TLS with this certificate (PEM; may hold the chain and the key).",
)
@click.option("--tls-key", metavar="FILE", help="The private key of --tls-cert (PEM, unencrypted).")
@click.option(
    "--tls-ca",
    metavar="FILE",
    help="CA certificate(s) (PEM) that client certificates must chain to.",
)
@click.option(
    "--tls-require-client-cert",
    is_flag=True,
    help="Mutual TLS: refuse peers without a client certificate from --tls-ca.",
)
@click.option(
    "--tls-port",
    type=click.IntRange(0, 65535),
    metavar="N",
    help="Serve TLS on this port (2762 is DICOM-TLS's) and plain DICOM on --port. "
    "Without it, --port itself serves TLS and no port is plain.",
)
@click.option(
    "--journal/--no-journal",
    default=_DEFAULTS.journal,
    show_default=True,
    help="Durable receipt through the spool's write-ahead journal (one fdatasync an "
    "instance, published into incoming/ right after the answer); --no-journal writes and "
    "fsyncs each instance's files before answering. Both are durable at acknowledgement.",
)
def receive(
    spool: Path,
    port: int,
    host: str,
    aet: str,
    allow_aets: tuple[str, ...],
    any_called_aet: bool,
    max_associations: int,
    processes: int | None,
    extra_tags: tuple[str, ...],
    acse_timeout: float,
    network_timeout: float,
    shutdown_grace: float,
    engine: str,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_require_client_cert: bool,
    tls_port: int | None,
    journal: bool,
) -> None:
    """Receive DICOM instances (C-STORE, C-ECHO) into spool/incoming/.

    Accepts every storage SOP class, private and unknown ones included, in whatever transfer
    syntax the sender proposes first: the dataset is stored byte for byte as sent, plus a
    file meta header, with a NAME.tags sidecar (see `mercli tags`). Success is answered only
    once both are durable on disk: appended to the spool's journal (spool/journal/) and
    fdatasync'ed, then published into incoming/ a moment later; after a crash, the next
    receive (or any command's recovery) publishes what the journal holds. A write failure or
    full disk answers 0xA700 and the
    listener keeps serving; an instance without readable UIDs answers 0xC210/0xC212 and is
    quarantined in spool/error/ with the reason.

    Runs until SIGINT or SIGTERM, then finishes open associations and exits 0; those still
    open after --shutdown-grace are aborted (A-ABORT, their unfinished instance discarded).

    Hostile peers: connections that have not yet sent their association request are capped
    at twice --max-associations (the longest waiting is closed first) and must send it within
    --acse-timeout; a request with invalid AE titles, more than 128 presentation contexts or
    a context id twice is rejected; PDUs are capped at 1 MiB, command sets at 64 KiB; a
    C-STORE whose command carries an invalid UID is answered 0xC213 and nothing is stored.

    --engine dcmtk runs DCMTK's storescp (one process per association) into
    spool/staging/ and publishes each finished file with getdcmtags (`make build`). The
    spool ends the same, but storescp acknowledges before the sidecar is written, accepts any
    called AE title, and cannot apply --allow-aet, --host, --extra-tag or --max-associations
    (refused, exit 2);
    --acse-timeout and --shutdown-grace apply to the default engine only.

    DICOM TLS (TLS 1.2 or later), both engines: --tls-cert and --tls-key make --port speak
    TLS only; add --tls-port N to serve TLS there and plain DICOM on --port at once. With
    --tls-ca, a client certificate is asked for and, if presented, must chain to it;
    --tls-require-client-cert refuses peers without one. A failed handshake (plain peer, unknown
    CA, no client certificate) is logged with the peer's address and the reason; the
    handshake counts within --acse-timeout and against the cap on waiting connections. A
    certificate, key or CA that cannot be used exits 2, naming the file.

    \b
    Examples:
      mercli receive --spool /var/spool/mercli --port 104 --aet ROUTER
      mercli receive --allow-aet CT1 --allow-aet MR2     # only these senders
      TCP_NODELAY=1 storescu -aec MERCLI localhost 11112 *.dcm
      mercli receive --tls-cert server.pem --tls-key server.key --tls-port 2762
      TCP_NODELAY=1 storescu +tls client.key client.pem +cf ca.pem -aec MERCLI host 2762 *.dcm
    """
    given = click.get_current_context().get_parameter_source("max_associations")
    if engine == "dcmtk" and given is ParameterSource.COMMANDLINE:
        # the engine refuses a non-default value itself; an explicit default is refused too
        raise click.UsageError(
            "--max-associations: storescp serves every association it is offered "
            "(one process each) and cannot limit them; use --engine pynetdicom or a "
            "firewall's connection limit"
        )
    _check_tls_options(tls_cert, tls_key, tls_ca, tls_require_client_cert, tls_port, port)
    config = ReceiveConfig(
        host=host,
        port=port,
        aet=aet,
        allow_aets=allow_aets,
        any_called_aet=any_called_aet,
        max_associations=max_associations,
        processes=processes,
        extra_tags=extra_tags,
        network_timeout=network_timeout,
        acse_timeout=acse_timeout,
        shutdown_grace=shutdown_grace,
        engine=engine,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_ca=tls_ca,
        tls_require_client_cert=tls_require_client_cert,
        tls_port=tls_port,
        journal=journal,
    )
    try:
        serve(spool, config)
    except TlsConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _check_tls_options(
    cert: str | None,
    key: str | None,
    ca: str | None,
    require_client_cert: bool,
    tls_port: int | None,
    port: int,
) -> None:
    """TLS options that make no sense without the others: usage errors (exit 2)."""
    if cert is None:
        given = [
            name
            for name, value in (
                ("--tls-key", key),
                ("--tls-ca", ca),
                ("--tls-require-client-cert", require_client_cert or None),
                ("--tls-port", tls_port),
            )
            if value is not None
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)}: needs --tls-cert (and --tls-key)")
    if require_client_cert and not ca:
        raise click.UsageError("--tls-require-client-cert: needs --tls-ca to verify them with")
    if tls_port is not None and tls_port == port and port != 0:
        raise click.UsageError(
            f"--tls-port {tls_port} is --port too: leave --tls-port out to serve TLS only there"
        )
