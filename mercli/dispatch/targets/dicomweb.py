"""Delivery to a `dicomweb` target: STOW-RS (DICOM PS3.18 §10.5) over http.client.

A job goes as `POST {url}/studies` requests of at most `batch` instances each, over one
keep-alive connection per job attempt. Each body is `multipart/related;
type="application/dicom"`, streamed from the spool files in fixed-size chunks behind an
exact Content-Length computed from the file sizes and the part headers: memory stays flat
whatever the size of an instance or a series, and no chunked encoding is needed (some
gateways refuse it on uploads). The standard library's http.client does that with full
control of the SSL context (`mercli.dicom.tls.client_context`) and no extra dependency.

What "delivered" means: the response names the instance in ReferencedSOPSequence
(0008,1199), with or without a WarningReason (0008,1196); an HTTP 200 without a usable
body counts for all the request's instances. An instance in FailedSOPSequence (0008,1198)
has failed, for its FailureReason (0008,1197) — except 0x0111 (duplicate: the server has
that SOP Instance already, e.g. from an attempt whose answer was lost). Delivered
instances go into `progress.delivered` as each response is read, so a retry sends only
the rest. 409 and other error statuses put the status line and an escaped excerpt of the
body (or the per-instance reasons) into the error, which dispatch writes to error.json.

Secrets (basic password, bearer token) are read when sending, go only into the
Authorization header, and are redacted from every error text — a server echoing them back
cannot make them reach error.json or a log.

Waits: connecting and every send is bounded by `target.timeout`; the whole answer to a
request (status, headers, body) must arrive within `target.timeout` after the body was
sent; the body read is capped at MAX_RESPONSE bytes.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import secrets
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mercli.dicom.tls import TlsConfigError, client_context, describe_failure
from mercli.dispatch.targets.base import Attempt
from mercli.dispatch.targets.dicom import instances_in_order
from mercli.jobs import JobInfo, Progress, Target
from mercli.names import printable
from mercli.secrets import SecretError, read_secret
from mercli.spool import SIDECAR_SUFFIX

CHUNK = 1024 * 1024  # bytes read from a file and sent at a time
MAX_RESPONSE = 16 * 1024 * 1024  # a STOW answer larger than this is not read (or trusted)
EXCERPT = 200  # characters of an error body quoted in error.json
REFERENCED, FAILED = "00081199", "00081198"
SOP_INSTANCE, WARNING, FAILURE = "00081155", "00081196", "00081197"
DUPLICATE = 0x0111
REASONS = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
_UNSAFE_TOKEN = re.compile(r"[^\x21-\x7e]")  # a bearer token is visible ASCII (RFC 6750)


class SendError(Exception):
    """Sending failed at the target's level; `unreachable`: the connection itself failed."""

    def __init__(self, message: str, unreachable: bool = False, expired: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.expired = expired  # no answer within the deadline


class _SpoolReadError(Exception):
    """A job file could not be read while streaming it (carries the OSError, re-raised)."""


@dataclass(frozen=True)
class Instance:
    """One pending instance: its progress key, its file, and its SOP Instance UID."""

    key: str
    path: Path
    uid: str


@dataclass
class Outcome:
    """What one job attempt achieved so far."""

    sent: int = 0
    refused: list[str] = field(default_factory=list)  # "NAME: reason"
    errors: list[str] = field(default_factory=list)  # request-level problems
    unreachable: bool = False  # no connection could be made, and nothing went


# -- the job's instances --------------------------------------------------------------------


def pending_instances(folder: Path, job: JobInfo, progress: Progress) -> list[Instance]:
    """The instances not delivered yet: series jobs in InstanceNumber order, study jobs
    series by series (keys `<series>/NAME`), as the dicom target sends them."""
    keyed = [(path.stem, path) for path in instances_in_order(folder)] if not job.series else []
    for series in job.series:
        keyed += [(f"{series}/{path.stem}", path) for path in instances_in_order(folder / series)]
    done = set(progress.delivered)
    return [Instance(key, path, sop_uid(path)) for key, path in keyed if key not in done]


def sop_uid(path: Path) -> str:
    """The instance's SOP Instance UID from its sidecar; else the file name (which is the
    UID whenever the UID is well formed, mercli.names)."""
    try:
        value = json.loads(path.with_suffix(SIDECAR_SUFFIX).read_bytes()).get("SOPInstanceUID")
    except (OSError, ValueError, AttributeError):
        value = None
    return value if isinstance(value, str) and value else path.stem


# -- the request body -----------------------------------------------------------------------


class Multipart:
    """A multipart/related body of DICOM files, its exact length known before sending.

    The boundary is 128 random bits: the chance that it occurs inside an instance is nil,
    so files are not scanned for it (that would mean reading each twice).
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.boundary = "mercli-" + secrets.token_hex(16)
        self.paths = list(paths)
        self.sizes = [os.stat(path).st_size for path in self.paths]
        self.head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self.tail = f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    @property
    def length(self) -> int:
        parts = sum(len(self.head) + size + 2 for size in self.sizes)
        return parts + len(self.tail)

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The body, one reused buffer at a time; _SpoolReadError if a file cannot be read
        or is not the size it was (spool files never change: something is badly wrong)."""
        buffer = bytearray(CHUNK)
        for path, size in zip(self.paths, self.sizes, strict=True):
            yield self.head
            try:
                with open(path, "rb") as stream:
                    left = size
                    while left:
                        count = stream.readinto(memoryview(buffer)[: min(left, CHUNK)])
                        if not count:
                            raise OSError(f"{path.name} shrank while being sent")
                        left -= count
                        yield memoryview(buffer)[:count]
            except OSError as exc:
                raise _SpoolReadError(exc) from exc
            yield b"\r\n"
        yield self.tail


# -- the connection -------------------------------------------------------------------------


class Endpoint:
    """Where a target's STOW requests go, and with which credentials (read at send time)."""

    def __init__(self, target: Target) -> None:
        assert target.url is not None
        self.target = target
        parts = urlsplit(target.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        try:
            self.port = parts.port or (443 if self.https else 80)
        except ValueError:
            raise SendError(f'target "{target.name}": bad port in url') from None
        if not self.host:
            raise SendError(f'target "{target.name}": no host in url')
        self.path = (parts.path.rstrip("/") or "") + "/studies"
        if parts.query:
            self.path += "?" + parts.query
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.where = f"{parts.scheme}://{shown}:{self.port}{self.path}"  # no userinfo, ever
        self.secrets: list[str] = []
        self.authorization = self._authorization()

    def _authorization(self) -> str | None:
        """The Authorization header value; SendError (naming no value) if it cannot be."""
        target, what = self.target, f'target "{self.target.name}"'
        if target.auth == "basic":
            reference = target.password_file or target.password or ""
            password = read_secret(reference, f"{what} password")
            username = target.username or ""
            if ":" in username:
                raise SendError(f'{what}: "username" must not contain ":" (HTTP basic auth)')
            encoded = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self.secrets += [password, encoded]
            return f"Basic {encoded}"
        if target.auth == "bearer":
            token = read_secret(target.token_file or target.token or "", f"{what} token")
            self.secrets.append(token)
            if not token or _UNSAFE_TOKEN.search(token):
                raise SendError(
                    f"{what} token is empty or has spaces, control or non-ASCII characters"
                )
            return f"Bearer {token}"
        return None

    def connection(self) -> http.client.HTTPConnection:
        """A connection (not yet open); TlsConfigError for unusable TLS files."""
        timeout = self.target.timeout
        if not self.https:
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        target = self.target
        context = client_context(target.tls_ca, target.tls_cert, target.tls_key)
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=context)

    def redact(self, text: str) -> str:
        """`text` without any of the secrets in it (longest first, so none is left in part)."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text


def open_connection(conn: http.client.HTTPConnection, endpoint: Endpoint) -> None:
    """Connect (and handshake) now, so a target that is down is told from one that fails
    later; SendError(unreachable=True) for refusals, DNS failures and timeouts."""
    try:
        conn.connect()
    except ssl.SSLError as exc:  # reached, but not trusted (or not trusting us)
        conn.close()
        raise SendError(f"{endpoint.where}: {describe_failure(exc)}") from None
    except OSError as exc:
        conn.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise SendError(f"cannot connect to {endpoint.where}: {reason}", True) from None


# -- one request ----------------------------------------------------------------------------


def post(
    conn: http.client.HTTPConnection, endpoint: Endpoint, batch: Sequence[Instance]
) -> tuple[int, str, bytes | None]:
    """Send one STOW request; (status, reason, body or None if over MAX_RESPONSE).

    A kept-alive connection the server closed while we were busy fails the next request
    on it; that request goes once more, on a new connection (a resent instance is stored
    again, which STOW servers take as the same instance).
    """
    reused = conn.sock is not None
    try:
        return post_once(conn, endpoint, batch)
    except SendError as exc:
        if not reused or exc.expired or exc.unreachable:
            raise
    conn.close()
    return post_once(conn, endpoint, batch)


def post_once(
    conn: http.client.HTTPConnection, endpoint: Endpoint, batch: Sequence[Instance]
) -> tuple[int, str, bytes | None]:
    """One try of `post`."""
    body = Multipart([instance.path for instance in batch])
    headers = {
        "Content-Type": body.content_type,
        "Content-Length": str(body.length),
        "Accept": "application/dicom+json",
    }
    if endpoint.authorization:
        headers["Authorization"] = endpoint.authorization
    if conn.sock is None:
        open_connection(conn, endpoint)
    try:
        conn.request("POST", endpoint.path, body=body.chunks(), headers=headers)
    except _SpoolReadError as exc:
        conn.close()
        raise exc.args[0] from None
    except (OSError, http.client.HTTPException) as exc:
        # The server may have answered early (401, 413) and closed: read that answer if it can
        # still be read, it says more than "broken pipe".
        with contextlib.suppress(SendError):
            return read_answer(conn, min(endpoint.target.timeout, 5.0))
        conn.close()
        raise SendError(f"{endpoint.where}: connection lost while sending: {_why(exc)}") from None
    return read_answer(conn, endpoint.target.timeout)


def read_answer(conn: http.client.HTTPConnection, seconds: float) -> tuple[int, str, bytes | None]:
    """The response within `seconds` in all (a deadline, not a per-read timeout: a server
    trickling bytes cannot hold the worker), its body read up to MAX_RESPONSE."""
    expired = threading.Event()
    sock = conn.sock
    if sock is None:
        raise SendError("connection closed before an answer")

    def expire() -> None:
        expired.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        response = conn.getresponse()
        body = bounded_read(response)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        conn.close()
        if expired.is_set():
            raise SendError(f"no complete answer within {seconds:g} s", expired=True) from None
        raise SendError(_why(exc)) from None
    finally:
        timer.cancel()
    if body is None or response.will_close:
        conn.close()  # the next request reconnects
    return response.status, response.reason, body


def bounded_read(response: http.client.HTTPResponse) -> bytes | None:
    """The body, or None (the rest left unread) if it is larger than MAX_RESPONSE."""
    parts, total = [], 0
    while chunk := response.read(64 * 1024):
        total += len(chunk)
        if total > MAX_RESPONSE:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return printable(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__, 120)


# -- the answer -----------------------------------------------------------------------------


def parse_stow(body: bytes | None) -> tuple[dict[str, int | None], dict[str, int]] | None:
    """(referenced UID -> WarningReason or None, failed UID -> FailureReason) from a
    application/dicom+json STOW response; None if the body is not one."""
    try:
        record = json.loads(body or b"")
    except ValueError:
        return None
    if not isinstance(record, dict) or not (REFERENCED in record or FAILED in record):
        return None
    referenced = {uid: code for uid, code in _items(record, REFERENCED, WARNING)}
    failed = {uid: code if code is not None else 0 for uid, code in _items(record, FAILED, FAILURE)}
    return referenced, failed


def _items(record: dict[str, Any], sequence: str, reason: str) -> Iterator[tuple[str, int | None]]:
    """(SOP Instance UID, reason code) of each item of a sequence in DICOM JSON."""
    items = record.get(sequence, {})
    for item in (items.get("Value") or []) if isinstance(items, dict) else []:
        uid, code = _value(item, SOP_INSTANCE), _value(item, reason)
        if isinstance(uid, str):
            yield uid, code if isinstance(code, int) else None


def _value(item: object, tag: str) -> object:
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def reason_text(code: int) -> str:
    """A FailureReason or WarningReason code in words."""
    known = REASONS.get(code) or REASONS.get(code & 0xFF00) or REASONS.get(code & 0xF000)
    return f"0x{code:04X} {known}" if known else f"0x{code:04X}"


def settle_batch(
    batch: Sequence[Instance],
    answer: tuple[int, str, bytes | None],
    progress: Progress,
    outcome: Outcome,
    where: str,
) -> bool:
    """Record what one response says; True if sending further batches cannot help (the
    server refused us, or failed as a whole), False to go on (409 is about these instances)."""
    status, reason, body = answer
    parsed = parse_stow(body)
    if status in (401, 403):
        outcome.errors.append(f"authentication refused (HTTP {status}) by {where}")
        return True
    if not 200 <= status < 300:
        detail = _refusals(batch, parsed) or _excerpt(body)
        outcome.errors.append(f"HTTP {status} {printable(reason, 60)} from {where}: {detail}")
        return status != 409
    referenced, failed = parsed or ({}, {})
    for instance in batch:
        code = failed.get(instance.uid)
        if code is not None and code != DUPLICATE:
            outcome.refused.append(f"{instance.path.stem}: {reason_text(code)}")
        elif code is not None or instance.uid in referenced or status == 200:
            progress.delivered.append(instance.key)  # 200: all stored, listed or not
            outcome.sent += 1
        else:
            outcome.refused.append(f"{instance.path.stem}: not confirmed (HTTP {status})")
    return False


def _refusals(batch: Sequence[Instance], parsed: Any) -> str:
    """The per-instance failure reasons of an error answer, if it has any."""
    failed: dict[str, int] = parsed[1] if parsed else {}
    names = [f"{i.path.stem}: {reason_text(failed[i.uid])}" for i in batch if i.uid in failed]
    return "; ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _excerpt(body: bytes | None) -> str:
    if body is None:
        return f"(answer larger than {MAX_RESPONSE} bytes, not read)"
    text = " ".join(body.decode("utf-8", "replace").split())
    return printable(text, EXCERPT) if text else "(no body)"


# -- the job --------------------------------------------------------------------------------


def deliver(folder: Path, job: JobInfo, progress: Progress) -> Attempt:
    """Send the job's undelivered instances in STOW-RS batches over one connection."""
    pending = pending_instances(folder, job, progress)
    if not pending:
        return Attempt(0)
    try:
        endpoint = Endpoint(job.target)
    except (SecretError, SendError) as exc:
        return Attempt(error=str(exc))
    outcome = Outcome()
    try:
        conn = endpoint.connection()
    except TlsConfigError as exc:
        return Attempt(error=str(exc))
    try:
        send_batches(conn, endpoint, pending, progress, outcome)
    finally:
        conn.close()
    return _attempt(outcome, endpoint)


def send_batches(
    conn: http.client.HTTPConnection,
    endpoint: Endpoint,
    pending: Sequence[Instance],
    progress: Progress,
    outcome: Outcome,
) -> None:
    """Each batch in turn, until one says stop or the connection fails."""
    size = max(1, endpoint.target.batch)
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        try:
            answer = post(conn, endpoint, batch)
        except SendError as exc:
            outcome.errors.append(str(exc))
            outcome.unreachable = exc.unreachable and outcome.sent == 0
            return
        if settle_batch(batch, answer, progress, outcome, endpoint.where):
            return


def _attempt(outcome: Outcome, endpoint: Endpoint) -> Attempt:
    """The attempt's result from what the batches said."""
    problems = list(outcome.errors)
    if outcome.refused:
        shown = "; ".join(outcome.refused[:5])
        more = f" (+{len(outcome.refused) - 5} more)" if len(outcome.refused) > 5 else ""
        problems.append(f"{len(outcome.refused)} refused: {shown}{more}")
    error = endpoint.redact("; ".join(problems))
    return Attempt(outcome.sent, error, unreachable=outcome.unreachable)
