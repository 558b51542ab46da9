"""Reading the outbox: one notification item as `mercli notify` sees it, and what sending
it once came to.

The format is the one `mercli.notify` describes (written by route, process and dispatch);
this module only reads it. The channel's defaults live in `Channel` (one place); the retry
policy here is dispatch's, with the channel's own numbers: the n-th failed attempt waits
`retry_delay * retry_backoff^(n-1)` seconds, at most `retry_max_delay`, and a peer's
Retry-After (webhooks) replaces that wait, within the same cap. `max_attempts` and `max_age`
(from the notification's `created`) end the retries; 0 means no limit.

`progress.json` (`NotifyProgress`) is the job's `dispatch.json` under another name: written
whole by the claim holder, never torn.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from mercli.jobs import Progress
from mercli.notify import CHANNEL_TYPES, PROGRESS_FILE
from mercli.notify.channels import Channel
from mercli.spool import NOTIFICATION_FILE, read_regular

DEADLINE_FACTOR = 3  # an attempt as a whole may take this many times the channel's timeout


class BadNotification(ValueError):
    """notification.json is missing, unreadable or not the documented shape."""


class NotifyProgress(Progress):
    """progress.json: the attempts of one notification so far (`delivered` unused)."""

    FILE: ClassVar[str] = PROGRESS_FILE


@dataclass(frozen=True)
class Notification:
    """One notification item: what to send (already rendered) and through which channel."""

    id: str
    event: str
    subject: str
    body: str
    channel: Channel
    created: float  # epoch seconds; the age that max_age is measured against
    source: dict[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def load(cls, name: str, folder: Path) -> Notification:
        """Read `folder`/notification.json; BadNotification saying what is wrong
        (FileNotFoundError if the item itself is gone: another sender took it)."""
        if not folder.is_dir():
            raise FileNotFoundError(folder)
        try:
            record = json.loads(read_regular(folder / NOTIFICATION_FILE))
        except (OSError, ValueError) as exc:
            raise BadNotification(f"{NOTIFICATION_FILE} unreadable: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("channel"), dict):
            raise BadNotification(f"{NOTIFICATION_FILE} has no channel object")
        try:
            channel = Channel.from_json(record["channel"])
        except (TypeError, ValueError, KeyError) as exc:
            raise BadNotification(f"{NOTIFICATION_FILE}: bad channel: {exc}") from None
        if channel.type not in CHANNEL_TYPES:
            raise BadNotification(f"unknown channel type {channel.type!r}")
        source = record.get("source")
        return cls(
            id=str(record.get("id") or name),
            event=str(record.get("event") or ""),
            subject=str(record.get("subject") or ""),
            body=str(record.get("body") or ""),
            channel=channel,
            created=_epoch(record.get("created"), folder),
            source=source if isinstance(source, dict) else {},
        )


def _epoch(value: object, folder: Path) -> float:
    """`created` as epoch seconds; the file's own time if it is missing or unparsable."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    return (folder / NOTIFICATION_FILE).stat().st_mtime


@dataclass
class Outcome:
    """Sending one notification once. `error` empty: sent.

    `permanent`: retrying cannot help (a 4xx, a refused recipient): notify_failed/ now.
    `unreachable`: no connection could be made, or the peer stopped answering (a timeout),
    so the channel's other notifications wait for this one's next attempt instead of each
    timing out in turn.
    `retry_after`: seconds the peer asked us to wait (HTTP Retry-After), if it said.
    `detail`: words for the log (never a secret, never the body).
    """

    error: str = ""
    permanent: bool = False
    unreachable: bool = False
    retry_after: float | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def retry_delay(channel: Channel, attempts: int, retry_after: float | None = None) -> float:
    """Seconds until the next attempt after `attempts` failed ones (exponential, capped)."""
    if retry_after is not None:
        return float(min(max(0.0, retry_after), channel.retry_max_delay))
    delay = channel.retry_delay * channel.retry_backoff ** max(0, attempts - 1)
    return float(min(delay, channel.retry_max_delay))


def gives_up(channel: Channel, created: float, attempts: int, now: float) -> str:
    """Why this was the last attempt, or "" to try again."""
    if channel.max_attempts and attempts >= channel.max_attempts:
        return f"gave up after {attempts} attempts"
    if channel.max_age and now - created >= channel.max_age:
        return f"gave up: notification older than {channel.max_age:.0f} s"
    return ""


def redact(text: str, secrets: list[str]) -> str:
    """`text` without any of `secrets` in it (longest first, so none is left in part)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


class Deadline:
    """Whether `cut_off` had to end an exchange (so the error says so, not "broken pipe")."""

    expired: bool = False


@contextmanager
def cut_off(seconds: float, sock: Callable[[], socket.socket | None]) -> Iterator[Deadline]:
    """Bound a whole exchange, not just each read: after `seconds`, shut the socket down so
    a peer that trickles one byte per timeout cannot hold a worker for ever (STYLE: every
    wait has a deadline). The blocked call then fails with an OSError."""
    state = Deadline()

    def expire() -> None:
        state.expired = True
        current = sock()
        if current is not None:
            with suppress(OSError):
                current.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield state
    finally:
        timer.cancel()
