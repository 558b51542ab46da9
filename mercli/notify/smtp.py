"""Sending a notification to an `email` channel: one message over SMTP (smtplib).

The message is text/plain UTF-8: Subject the rendered subject (line breaks folded into
spaces: header injection is impossible), the body as rendered, From, To, a Date (when the
notification was written) and a Message-ID made from the notification's id, so a resend after
a crash (at-least-once) carries the same Message-ID and mail clients and archives show it
once. `Auto-Submitted: auto-generated` (RFC 3834) keeps vacation responders quiet.

Connection: `tls = true` is implicit TLS (port 465 by default), `starttls = true` upgrades a
plain connection (587 by default; a server that does not offer STARTTLS is an error, never a
silent fall-back to plain text), neither is plain SMTP (25). The server's certificate is
verified against `tls_ca` or the system's CAs, with its host name. A `user` logs in with
the secret `password_file` or `password = "${VAR}"` names, read now; a login is only ever
sent encrypted: `user` without `tls`/`starttls` fails the notification for good, saying why.

How failures are taken: a 5xx answer to the sender, every recipient or the data, and a
message that cannot be built, fail for good; everything else (no connection, 4xx, a refused
login, TLS not trusted, a secret file missing) is tried again. When some recipients are
refused and others accepted, the message is sent: resending it would duplicate it for the
rest; the refused ones are in the detail. Errors never hold the password (it is cut out of
whatever the server said) nor the body.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import smtplib
import ssl
from email.message import EmailMessage

from mercli.dicom.tls import TlsConfigError, client_context, describe_failure
from mercli.names import printable
from mercli.notify.channels import Channel
from mercli.notify.outbox import DEADLINE_FACTOR, Notification, Outcome, cut_off, redact
from mercli.secrets import SecretError, read_secret

_LINE_BREAKS = re.compile(r"[\r\n\t\v\f]+")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9.\-_]")


class SmtpProblem(Exception):
    """Sending failed: why, and whether retrying can help."""

    def __init__(self, message: str, *, unreachable: bool = False, permanent: bool = False):
        super().__init__(message)
        self.unreachable = unreachable
        self.permanent = permanent


def send_email(note: Notification) -> Outcome:
    """Send the notification once as an email; what came of it."""
    channel = note.channel
    secrets: list[str] = []
    try:
        message = build_message(note)
        password = login_secret(channel)
        if password:
            secrets.append(password)
        refused = converse(channel, message, password)
    except (SecretError, TlsConfigError) as exc:
        return Outcome(error=f"email {channel.name}: {exc}")
    except SmtpProblem as exc:
        error = f"email {channel.name}: {redact(str(exc), secrets)}"
        return Outcome(error=error, unreachable=exc.unreachable, permanent=exc.permanent)
    detail = f"{len(channel.to) - len(refused)} recipient(s)"
    if refused:
        detail += "; refused: " + ", ".join(printable(r) for r in sorted(refused))
    return Outcome(detail=detail)


def build_message(note: Notification) -> EmailMessage:
    """The message for a notification; SmtpProblem(permanent) if the channel cannot make one."""
    channel = note.channel
    if not channel.sender or not channel.to:
        raise SmtpProblem("needs from and to addresses", permanent=True)
    message = EmailMessage()
    try:
        message["Subject"] = _LINE_BREAKS.sub(" ", note.subject).strip() or f"mercli {note.event}"
        message["From"] = channel.sender
        message["To"] = ", ".join(channel.to)
        message["Date"] = email.utils.formatdate(note.created, usegmt=True)
        message["Message-ID"] = message_id(note.id, channel.sender)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(note.body, subtype="plain", charset="utf-8")
    except (ValueError, TypeError) as exc:  # an address or header with a line break
        raise SmtpProblem(f"cannot build the message: {exc}", permanent=True) from None
    return message


def message_id(notification_id: str, sender: str) -> str:
    """`<mercli.<id>@<sender's domain>>`: the same for every send of one notification."""
    local = _UNSAFE_ID.sub("-", notification_id) or "notification"
    domain = email.utils.parseaddr(sender)[1].rpartition("@")[2]
    domain = _UNSAFE_ID.sub("-", domain) or "mercli.invalid"
    return f"<mercli.{local}@{domain}>"


def login_secret(channel: Channel) -> str | None:
    """The password for `user`, read now; None without a user. Refuses a plain login."""
    if not channel.user:
        return None
    if not (channel.tls or channel.starttls):
        raise SmtpProblem(
            "user is set but the connection is not encrypted: the password is never sent "
            "in plain text (set starttls = true or tls = true)",
            permanent=True,
        )
    reference = channel.password_file or channel.password
    if not reference:
        raise SmtpProblem("user is set without password_file or password", permanent=True)
    return read_secret(reference, f"email {channel.name} password")


def smtp_port(channel: Channel) -> int:
    """The port: as set, else 465 (implicit TLS), 587 (STARTTLS) or 25."""
    if channel.smtp_port:
        return int(channel.smtp_port)
    return 465 if channel.tls else 587 if channel.starttls else 25


def converse(channel: Channel, message: EmailMessage, password: str | None) -> dict[str, object]:
    """Connect, (STARTTLS,) (log in,) send, quit, within DEADLINE_FACTOR x timeout;
    the recipients refused while others were accepted."""
    if not channel.smtp_host:
        raise SmtpProblem("no smtp_host", permanent=True)
    context = client_context(channel.tls_ca) if channel.tls or channel.starttls else None
    smtp: smtplib.SMTP
    if channel.tls:
        smtp = smtplib.SMTP_SSL(timeout=channel.timeout, context=context)
    else:
        smtp = smtplib.SMTP(timeout=channel.timeout)
    smtp._host = channel.smtp_host  # type: ignore[attr-defined]  # TLS checks this name
    where = f"{channel.smtp_host}:{smtp_port(channel)}"
    limit = channel.timeout * DEADLINE_FACTOR
    try:
        with cut_off(limit, lambda: getattr(smtp, "sock", None)) as deadline:
            try:
                _connect(smtp, channel, where)
                return _transact(smtp, channel, message, password, context, where)
            except SmtpProblem:
                if deadline.expired:  # a server that stops answering is as good as down
                    raise SmtpProblem(
                        f"{where}: no answer within {limit:g} s", unreachable=True
                    ) from None
                raise
    finally:
        smtp.close()


def _connect(smtp: smtplib.SMTP, channel: Channel, where: str) -> None:
    try:
        smtp.connect(channel.smtp_host or "", smtp_port(channel))
    except ssl.SSLError as exc:
        raise SmtpProblem(f"{where}: {describe_failure(exc)}") from None
    except smtplib.SMTPConnectError as exc:
        raise SmtpProblem(f"{where} refused us: {exc.smtp_code} {_said(exc)}") from None
    except (OSError, smtplib.SMTPException) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else _words(exc)
        raise SmtpProblem(f"cannot connect to {where}: {reason}", unreachable=True) from None


def _transact(
    smtp: smtplib.SMTP,
    channel: Channel,
    message: EmailMessage,
    password: str | None,
    context: ssl.SSLContext | None,
    where: str,
) -> dict[str, object]:
    step = "greeting"
    try:
        smtp.ehlo()
        if channel.starttls:
            step = "STARTTLS"
            if not smtp.has_extn("starttls"):
                raise SmtpProblem(f"{where} does not offer STARTTLS (starttls = true)")
            smtp.starttls(context=context)
            smtp.ehlo()
        if channel.user and password is not None:
            step = "login"
            smtp.login(channel.user, password)
        step = "sending"
        refused = smtp.send_message(message, channel.sender, list(channel.to))
    except ssl.SSLError as exc:
        raise SmtpProblem(f"{where}: {describe_failure(exc)}") from None
    except smtplib.SMTPAuthenticationError as exc:
        user = printable(channel.user)
        said = f"{exc.smtp_code} {_said(exc)}"
        raise SmtpProblem(f"{where} refused the login of {user}: {said}") from None
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        shown = "; ".join(
            f"{printable(rcpt)}: {code} {printable(text.decode('utf-8', 'replace'), 120)}"
            for rcpt, (code, text) in sorted(exc.recipients.items())
        )
        raise SmtpProblem(
            f"{where} refused every recipient: {shown}", permanent=all(c >= 500 for c in codes)
        ) from None
    except smtplib.SMTPResponseException as exc:  # sender refused, data refused, others
        raise SmtpProblem(
            f"{where} answered {exc.smtp_code} {_said(exc)} ({step})",
            permanent=exc.smtp_code >= 500 and step == "sending",
        ) from None
    except (OSError, smtplib.SMTPException) as exc:
        stalled = isinstance(exc, TimeoutError)  # connected, then silence: treated as down
        reason = "timed out" if stalled else _words(exc)
        raise SmtpProblem(f"{where}: {reason} ({step})", unreachable=stalled) from None
    _quit(smtp)
    return dict(refused)


def _quit(smtp: smtplib.SMTP) -> None:
    """QUIT politely; the message was accepted already, so a failure here changes nothing."""
    with contextlib.suppress(OSError, smtplib.SMTPException):
        smtp.quit()


def _said(exc: smtplib.SMTPResponseException) -> str:
    text = exc.smtp_error
    words = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return printable(words, 200)


def _words(exc: BaseException) -> str:
    return printable(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__, 200)
