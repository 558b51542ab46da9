"""Sending the outbox: claim each notification in notify/, send it once, settle the attempt.

The same protocol as dispatch, with notifications for jobs and channels for targets. One
attempt: claim the item, send it through its channel (`webhook` or `email`), then one of
- sent: `notify_sent/` (event `notified`);
- a failure retrying cannot mend (a 4xx, a refused recipient, a login over a plain
  connection), the last attempt (`max_attempts`) or a notification too old (`max_age`):
  `notify_failed/` with `error.json` saying why (event `notify_failed`);
- otherwise back to `notify/`, its next attempt `retry_delay * retry_backoff^(n-1)` seconds
  later (or when the webhook's Retry-After says), at most `retry_max_delay` (event
  `notify_retry`).
A channel that cannot be reached is left alone until that notification's next attempt, so
its other notifications do not each wait out a timeout, and other channels go on. A sender
killed mid-send leaves the claim to recovery: the notification is sent again (at-least-once;
the webhook's Idempotency-Key and the email's Message-ID stay the same), never lost.

A notification item whose notification.json cannot be read goes to notify_failed/ at once.
Events carry ids, channel names and reasons: never the rendered body, never a secret.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from mercli.notify.outbox import (
    BadNotification,
    Notification,
    NotifyProgress,
    Outcome,
    gives_up,
    retry_delay,
)
from mercli.notify.smtp import send_email
from mercli.notify.webhook import send_webhook
from mercli.spool import NOTIFY, NOTIFY_FAILED, NOTIFY_SENT, Claim, Spool, Worker

log = logging.getLogger(__name__)

SendFunction = Callable[[Notification], Outcome]
SEND: Mapping[str, SendFunction] = {"webhook": send_webhook, "email": send_email}


@dataclass
class NotifySummary:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    unreachable: set[str] = field(default_factory=set)  # channel names


class Sender:
    """Picks notifications that are due for any number of worker threads; settles each."""

    def __init__(self, spool: Spool, worker: Worker, *, once: bool = False) -> None:
        self.spool = spool
        self.worker = worker
        self.once = once  # each notification at most one attempt (--once)
        self.lock = threading.Lock()
        self.tried: set[str] = set()
        self.busy: set[str] = set()
        self.notes: dict[str, Notification] = {}  # notification.json never changes
        self.progress: dict[str, tuple[int, NotifyProgress]] = {}  # by folder mtime
        self.down_until: dict[str, float] = {}  # channel name -> wall time
        self.summary = NotifySummary()

    # -- choosing --------------------------------------------------------------------------

    def pick(self) -> tuple[Claim, Notification] | None:
        """Claim the oldest notification that may be tried now, or None."""
        with self.lock:
            now = time.time()
            for name in self._waiting():
                if name in self.busy or name in self.tried:
                    continue
                note = self._note(name)
                if note is None:
                    continue
                if self.down_until.get(note.channel.name, 0.0) > now:
                    continue
                if self._progress(name).next_attempt > now:
                    continue
                claim = self.worker.claim(NOTIFY, name)
                if claim is not None:
                    self.busy.add(name)
                    if self.once:
                        self.tried.add(name)
                    return claim, note
        return None

    def next_due(self) -> float | None:
        """Wall time of the earliest retry or channel coming back, if any."""
        with self.lock:
            times = [p.next_attempt for _, p in self.progress.values() if p.next_attempt]
            times += list(self.down_until.values())
        return min(times, default=None)

    def _waiting(self) -> list[str]:
        """Names in notify/, oldest first (item ids sort by time); caches of gone ones dropped."""
        with os.scandir(self.spool.state_dir(NOTIFY)) as entries:
            names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        for cache in (self.notes, self.progress):
            for stale in set(cache) - set(names) - self.busy:
                del cache[stale]
        return names

    def _note(self, name: str) -> Notification | None:
        note = self.notes.get(name)
        if note is None:
            folder = self.spool.state_dir(NOTIFY) / name
            try:
                note = self.notes[name] = Notification.load(name, folder)
            except BadNotification as exc:
                self._reject(name, str(exc))
                return None
            except FileNotFoundError:  # taken by another sender meanwhile
                return None
        return note

    def _reject(self, name: str, reason: str) -> None:
        """An item that is no notification: straight to notify_failed/, saying why."""
        claim = self.worker.claim(NOTIFY, name)
        if claim is None:
            return
        claim.quarantine(reason, state=NOTIFY_FAILED)
        self.spool.log("notify_failed", item=name, reason=reason)
        log.error("notification %s is unusable: %s", name, reason)
        self.summary.failed += 1

    def _progress(self, name: str) -> NotifyProgress:
        folder = self.spool.state_dir(NOTIFY) / name
        try:
            stamp = folder.stat().st_mtime_ns  # progress.json is renamed in: the folder changes
        except FileNotFoundError:
            return NotifyProgress()
        cached = self.progress.get(name)
        if cached is None or cached[0] != stamp:
            cached = self.progress[name] = (stamp, NotifyProgress.load(folder))
        return cached[1]

    # -- one attempt -----------------------------------------------------------------------

    def attempt(self, claim: Claim, note: Notification) -> Outcome:
        """Send the notification once and settle it: notify_sent/, notify_failed/ or back."""
        try:
            progress = NotifyProgress.load(claim.path)
            progress.attempts += 1
            started = time.monotonic()
            outcome = self._send(note)
            self._settle(claim, note, progress, outcome, time.monotonic() - started)
            return outcome
        except BaseException:
            if claim.path.exists():
                claim.release()
            raise
        finally:
            with self.lock:
                self.busy.discard(claim.name)

    def _send(self, note: Notification) -> Outcome:
        """Send through the channel's type. A bug there must not kill the worker thread nor
        let `--once` exit 0: it becomes a retried attempt, its traceback in our log only
        (an exception's text could quote anything, so error.json gets its type alone)."""
        try:
            return SEND[note.channel.type](note)
        except Exception as exc:
            log.error("notification %s: unexpected error", note.id, exc_info=True)
            return Outcome(error=f"internal error ({type(exc).__name__}); see mercli notify's log")

    def _settle(
        self,
        claim: Claim,
        note: Notification,
        progress: NotifyProgress,
        outcome: Outcome,
        seconds: float,
    ) -> None:
        channel, now = note.channel, time.time()
        fields = {
            "item": claim.name,
            "channel": channel.name,
            "on": note.event,  # "event" is the record's own key (notified, ...)
            "attempt": progress.attempts,
        }
        if outcome.ok:
            progress.finished = datetime.now(UTC).isoformat(timespec="milliseconds")
            progress.last_error, progress.next_attempt = "", 0.0
            progress.save(self.worker, claim.path)
            claim.move_to(NOTIFY_SENT)
            self.spool.log("notified", **fields)
            log.info(
                "notification %s (%s) sent to %s in %.2f s %s",
                claim.name,
                note.event,
                channel.name,
                seconds,
                outcome.detail,
            )
            self.summary.sent += 1
            return
        progress.last_error = outcome.error
        give_up = (
            "cannot be sent"
            if outcome.permanent
            else gives_up(channel, note.created, progress.attempts, now)
        )
        if outcome.unreachable:
            self.summary.unreachable.add(channel.name)
        if give_up:
            progress.save(self.worker, claim.path)
            claim.quarantine(
                outcome.error,
                state=NOTIFY_FAILED,
                channel=channel.name,
                event=note.event,
                attempts=progress.attempts,
                gave_up=give_up,
            )
            self.spool.log("notify_failed", **fields, reason=outcome.error)
            log.error(
                "notification %s to %s failed for good (%s): %s",
                claim.name,
                channel.name,
                give_up,
                outcome.error,
            )
            self.summary.failed += 1
            return
        self._retry_later(claim, note, progress, outcome, fields, now)

    def _retry_later(
        self,
        claim: Claim,
        note: Notification,
        progress: NotifyProgress,
        outcome: Outcome,
        fields: dict[str, Any],
        now: float,
    ) -> None:
        delay = retry_delay(note.channel, progress.attempts, outcome.retry_after)
        progress.next_attempt = now + delay
        progress.save(self.worker, claim.path)
        claim.release()
        if outcome.unreachable:
            with self.lock:
                self.down_until[note.channel.name] = progress.next_attempt
        self.spool.log("notify_retry", **fields, error=outcome.error, delay=round(delay, 1))
        log.warning(
            "notification %s to %s: %s; retry %d in %.0f s",
            claim.name,
            note.channel.name,
            outcome.error,
            progress.attempts + 1,
            delay,
        )
        self.summary.retried += 1


def summary_fields(summary: NotifySummary) -> dict[str, Any]:
    return {**asdict(summary), "unreachable": sorted(summary.unreachable)}
