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
A channel that cannot be reached, or that stops answering (a timeout), is left alone until
that notification's next attempt, so its other notifications do not each wait out a
timeout; a channel whose last attempt failed is then tried by one worker at a time until
one succeeds, so the other channels keep the other workers. A sender
killed mid-send leaves the claim to recovery: the notification is sent again (at-least-once;
the webhook's Idempotency-Key and the email's Message-ID stay the same), never lost.

A notification item whose notification.json cannot be read goes to notify_failed/ at once;
one whose progress.json cannot be read starts its attempts afresh. Anything else that goes
wrong with one item (the spool refusing a claim or a save: a full disk) sets that item
aside in memory (`mercli.setaside`), and the workers go on with the others: no error ends
a worker thread, and none makes a worker try the same item again at once.
Retry times are wall-clock times in progress.json; one further away than the channel's
retry_max_delay (the clock was set back since it was written) counts as due.
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
from mercli.setaside import SetAside
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
        self.set_aside = SetAside()  # items that met an error that is not their channel's
        self.troubled: set[str] = set()  # channels whose last attempt failed
        self.in_flight: dict[str, int] = {}  # channel name -> attempts running now
        self.unsettled: set[str] = set()  # --once: items set aside, counted as to retry
        self.summary = NotifySummary()

    # -- choosing --------------------------------------------------------------------------

    def pick(self) -> tuple[Claim, Notification] | None:
        """Claim the oldest notification that may be tried now, or None."""
        with self.lock:
            now = time.time()
            for name in self._waiting():
                if name in self.busy or name in self.tried or self.set_aside.waits(name):
                    continue
                try:
                    picked = self._pick(name, now)
                except Exception as exc:  # this item's trouble, not the others'
                    self._trouble(name, exc)
                    continue
                if picked is not None:
                    return picked
        return None

    def _pick(self, name: str, now: float) -> tuple[Claim, Notification] | None:
        note = self._note(name)
        if note is None:
            return None
        channel = note.channel
        if self.down_until.get(channel.name, 0.0) > now:
            return None
        if channel.name in self.troubled and self.in_flight.get(channel.name, 0):
            return None  # one worker probes a failing channel; the others serve the rest
        due = self._progress(name).next_attempt
        if now < due <= now + channel.retry_max_delay:
            return None  # further away than any retry: the clock went back; due now
        claim = self.worker.claim(NOTIFY, name)
        if claim is None:
            return None
        self.busy.add(name)
        self.in_flight[channel.name] = self.in_flight.get(channel.name, 0) + 1
        if self.once:
            self.tried.add(name)
        return claim, note

    def _trouble(self, name: str, exc: Exception) -> None:
        """Set an item aside after an error of the spool or a bug (lock held)."""
        seconds = self.set_aside.hold(name)
        if self.once and name not in self.unsettled:
            self.tried.add(name)
            self.unsettled.add(name)
            self.summary.retried += 1  # --once must not exit 0 with it unsent
        log.error("notification %s set aside for %.0f s: %s", name, seconds,
                  exc if isinstance(exc, OSError) else type(exc).__name__)  # fmt: skip

    def next_due(self) -> float | None:
        """Wall time of the earliest retry or channel coming back, if any."""
        with self.lock:
            now = time.time()  # past ones: not picked for another reason, with its own time
            times = [p.next_attempt for _, p in self.progress.values() if p.next_attempt > now]
            times += list(self.down_until.values())
            aside = self.set_aside.next_wall_time()
        return min([*times, aside] if aside is not None else times, default=None)

    def _waiting(self) -> list[str]:
        """Names in notify/, oldest first (item ids sort by time); caches of gone ones dropped."""
        with os.scandir(self.spool.state_dir(NOTIFY)) as entries:
            names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        for cache in (self.notes, self.progress):
            for stale in set(cache) - set(names) - self.busy:
                del cache[stale]
        self.set_aside.keep_only([*names, *self.busy])
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
        try:
            claim.quarantine(reason, state=NOTIFY_FAILED)
        except BaseException:
            if claim.path.exists():
                claim.release()
            raise
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
            with self.lock:  # settled as its schedule says: errors in a row start again
                self.set_aside.settled(claim.name)
            return outcome
        except BaseException as exc:
            if claim.path.exists():
                claim.release()
            if isinstance(exc, Exception):
                with self.lock:
                    self._trouble(claim.name, exc)
            raise
        finally:
            with self.lock:
                self.busy.discard(claim.name)
                left = self.in_flight.get(note.channel.name, 1) - 1
                if left > 0:
                    self.in_flight[note.channel.name] = left
                else:
                    self.in_flight.pop(note.channel.name, None)

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
        with self.lock:
            if outcome.ok:
                self.troubled.discard(channel.name)
            elif not outcome.permanent:
                self.troubled.add(channel.name)
        if outcome.ok:
            progress.finished = datetime.now(UTC).isoformat(timespec="milliseconds")
            progress.last_error, progress.next_attempt = "", 0.0
            try:  # a record for people: the move below is what says "sent"
                progress.save(self.worker, claim.path)
            except OSError as exc:
                log.warning(
                    "notification %s sent; its progress.json not saved: %s", claim.name, exc
                )
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
        with self.lock:  # kept in memory too: a save that fails must not mean "retry now"
            self.set_aside.hold(claim.name, delay)
            if outcome.unreachable:
                self.down_until[note.channel.name] = progress.next_attempt
        progress.save(self.worker, claim.path)
        claim.release()
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
