"""Sending a notification to a `webhook` channel: one HTTP(S) request, over http.client.

The body is the rendered notification, sent as it is (UTF-8) with the channel's method,
`content_type` and headers; a header value that is exactly `"${NAME}"` (and the url, if it
is) is read from the environment now, never stored. Every request carries
`Idempotency-Key: <notification id>` (unless the channel sets it), so a receiver can tell the
resend after a crash (at-least-once) from a new event.

How an answer is taken:
- 2xx: sent.
- 3xx: failed for good. Redirects are not followed (a POST must not silently become a GET
  elsewhere); the error says to point `url` at the final address.
- 408, 425, 429 and 5xx: tried again later; a Retry-After (seconds or an HTTP date) sets the
  wait, within `retry_max_delay`.
- any other 4xx: failed for good (the request itself is wrong: url, token, body).
- no connection (refused, DNS, timeout): tried again, and the channel's other notifications
  wait for that retry. TLS not trusted, a secret or CA file missing: tried again (an admin
  can fix the file without touching the outbox), until `max_attempts`/`max_age`.

Errors name the channel and host:port, never the url's path or query (webhook urls often
carry their token there), a header value or the body; the first 200 characters of a
refusal's answer are kept, with any secret sent cut out. Answers are read up to 64 KiB.
"""

from __future__ import annotations

import email.utils
import http.client
import re
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from mercli import __version__
from mercli.dicom.tls import TlsConfigError, client_context, describe_failure
from mercli.names import printable
from mercli.notify.outbox import DEADLINE_FACTOR, Notification, Outcome, cut_off, redact
from mercli.secrets import SecretError, env_reference, read_secret

MAX_RESPONSE = 64 * 1024
SHOWN_ANSWER = 200  # characters of a refusal's answer kept in the error
RETRIED_4XX = frozenset({408, 425, 429})  # timeout, too early, too many requests
_METHOD = re.compile(r"[A-Z]{3,10}")


class WebhookError(Exception):
    """Sending failed before an answer came: why, and whether anything was reached."""

    def __init__(self, message: str, *, unreachable: bool = False, permanent: bool = False):
        super().__init__(message)
        self.unreachable = unreachable
        self.permanent = permanent


@dataclass
class Answer:
    status: int
    reason: str
    body: bytes
    retry_after: float | None


@dataclass
class Request:
    """Everything one attempt sends, secrets resolved (kept to cut them out of errors)."""

    https: bool
    host: str
    port: int
    target: str  # path and query
    method: str
    headers: dict[str, str]
    secrets: list[str]

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def send_webhook(note: Notification) -> Outcome:
    """POST (or the channel's method) the notification once; what came of it."""
    channel = note.channel
    try:
        request = prepare(note)
    except (SecretError, TlsConfigError) as exc:
        return Outcome(error=str(exc))
    except WebhookError as exc:
        return Outcome(error=str(exc), permanent=exc.permanent)
    try:
        answer = exchange(request, note.body.encode("utf-8"), channel.timeout, channel.tls_ca)
    except (TlsConfigError, WebhookError) as exc:
        unreachable = getattr(exc, "unreachable", False)
        error = f"webhook {channel.name}: {redact(str(exc), request.secrets)}"
        return Outcome(error=error, unreachable=unreachable)
    return judge(answer, request, channel.name)


def prepare(note: Notification) -> Request:
    """The request: url split and checked, headers with their secrets read."""
    channel, secrets = note.channel, []
    url = channel.url or ""
    if env_reference(url) is not None:
        url = read_secret(url, f"webhook {channel.name} url")
        secrets.append(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"webhook {channel.name}: url is not http(s)://host/...", permanent=True)
    if parts.username or parts.password:
        raise WebhookError(
            f"webhook {channel.name}: credentials in the url are not sent; "
            'use headers = { Authorization = "${VAR}" }',
            permanent=True,
        )
    method = channel.method.upper()
    if not _METHOD.fullmatch(method):
        raise WebhookError(f"webhook {channel.name}: bad method {method!r}", permanent=True)
    headers = {
        "Content-Type": channel.content_type,
        "User-Agent": f"mercli/{__version__}",
        "Idempotency-Key": note.id,
    }
    for name, value in channel.headers.items():
        if env_reference(str(value)) is not None:
            value = read_secret(str(value), f"webhook {channel.name} header {name}")
            secrets.append(value)
        headers = {key: v for key, v in headers.items() if key.lower() != name.lower()}
        headers[name] = str(value)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookError(f"webhook {channel.name}: bad port in url", permanent=True) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Request(parts.scheme == "https", parts.hostname, port, target, method, headers, secrets)


def exchange(request: Request, body: bytes, timeout: float, ca: str | None) -> Answer:
    """Connect, send, read the answer (bounded), all within DEADLINE_FACTOR x timeout."""
    conn: http.client.HTTPConnection
    if request.https:
        context = client_context(ca)
        conn = http.client.HTTPSConnection(
            request.host, request.port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(request.host, request.port, timeout=timeout)
    try:
        with cut_off(timeout * DEADLINE_FACTOR, lambda: conn.sock) as deadline:
            try:
                connect(conn, request.where)
                return ask(conn, request, body)
            except WebhookError:
                if deadline.expired:  # a peer that stops answering is as good as down
                    raise WebhookError(
                        f"{request.where}: no answer within {timeout * DEADLINE_FACTOR:g} s",
                        unreachable=True,
                    ) from None
                raise
    finally:
        conn.close()


def connect(conn: http.client.HTTPConnection, where: str) -> None:
    """Open the connection (and TLS) now, so a peer that is down is told from one that
    fails later."""
    try:
        conn.connect()
    except ssl.SSLError as exc:
        raise WebhookError(f"{where}: {describe_failure(exc)}") from None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise WebhookError(f"cannot connect to {where}: {reason}", unreachable=True) from None


def ask(conn: http.client.HTTPConnection, request: Request, body: bytes) -> Answer:
    """Send the request on an open connection and read the answer."""
    try:
        conn.putrequest(request.method, request.target, skip_accept_encoding=True)
        for name, value in request.headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read(MAX_RESPONSE)
    except ValueError as exc:  # a header name or value http.client refuses (a line break)
        raise WebhookError(f"{request.where}: request refused locally: {exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        stalled = isinstance(exc, TimeoutError)  # connected, then silence: treated as down
        reason = "timed out" if stalled else str(exc) or type(exc).__name__
        raise WebhookError(f"{request.where}: no answer: {reason}", unreachable=stalled) from None
    retry_after = parse_retry_after(response.getheader("Retry-After"))
    return Answer(response.status, response.reason, data, retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: a number of seconds or an HTTP date; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def judge(answer: Answer, request: Request, channel: str) -> Outcome:
    """What an HTTP answer means for the notification (see the module docstring)."""
    status = answer.status
    said = f"webhook {channel}: {request.where} answered {status} {answer.reason}".rstrip()
    if 200 <= status < 300:
        return Outcome(detail=f"{status}")
    if 300 <= status < 400:
        hint = "redirects are not followed: set url to the final address"
        return Outcome(error=f"{said} ({hint})", permanent=True)
    shown = printable(answer.body.decode("utf-8", "replace").strip(), SHOWN_ANSWER)
    error = redact(f"{said}: {shown}" if shown else said, request.secrets)
    if 400 <= status < 500 and status not in RETRIED_4XX:
        return Outcome(error=error, permanent=True)
    return Outcome(error=error, retry_after=answer.retry_after)
