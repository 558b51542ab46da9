"""`mercli notify`: send the notifications waiting in notify/ (webhooks, email)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from mercli.commands.options import common_options
from mercli.errors import ExitCode
from mercli.notify.service import NotifyService


@click.command()
@common_options
@click.option(
    "--once", is_flag=True, help="Try every notification that is due now once, then exit."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Notifications sent at the same time (threads).",
)
def notify(spool: Path, once: bool, workers: int) -> None:
    """Send the notifications of route, process and dispatch to webhooks and mailboxes.

    \b
    Route, process and dispatch write a notification for each event a [notify.NAME]
    channel of the rules asked for (received, routed, discarded, processed, delivered,
    failed) into their notification logs (spool/notices/), in the transaction of the event;
    this command collects those of committed transactions into spool/notify/ (every 0.2 s;
    --once: first), renders the channel's templates and sends them. Each carries its
    channel's definition: no rules file is needed. Secrets stay references (password_file,
    "${VAR}"), read when sending.

    \b
    Webhooks: one HTTP(S) request with the rendered body; 2xx is sent. 408, 425, 429 and
    5xx are tried again (Retry-After honoured), other 4xx and 3xx (redirects are not
    followed) fail at once. Email: one text/plain UTF-8 message over SMTP (tls = implicit
    TLS, starttls = STARTTLS; a login is only sent encrypted); the Message-ID is the same
    for every resend of one notification.

    \b
    A failed notification is retried after retry_delay, growing by retry_backoff up to
    retry_max_delay; after max_attempts or max_age it goes to spool/notify_failed/ with
    error.json saying why. Sent ones go to spool/notify_sent/. A channel that is down holds
    up only its own notifications. A sender killed mid-send sends that notification again
    on restart (at-least-once): none is lost. Any number of senders can share a spool.

    \b
    Exit (--once): 0 all sent, 1 some failed or wait for a retry, 5 a channel was
    unreachable.

    \b
    Examples:
      mercli notify --spool /var/spool/mercli
      mercli notify --once                        # from cron or a script
      mercli status                               # notify / notify_failed backlog
      ls spool/notify_failed/*/error.json         # why a notification was given up
    """
    summary = NotifyService(spool, workers).run(once=once)
    if logging.getLogger("mercli").isEnabledFor(logging.INFO):  # -q: what failed is logged
        unreachable = ", ".join(sorted(summary.unreachable))
        click.echo(
            f"sent {summary.sent} notification(s), {summary.retried} to retry, "
            f"{summary.failed} failed" + (f"; unreachable: {unreachable}" if unreachable else ""),
            err=True,
        )
    if not once:
        return  # a service stopped by a signal exits 0; its problems are in the log
    if summary.unreachable:
        sys.exit(ExitCode.PEER)
    if summary.retried or summary.failed:
        sys.exit(ExitCode.SOME_FAILED)
