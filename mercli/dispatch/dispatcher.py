"""Dispatch: deliver each job in outgoing/ to its target, retry with backoff, settle it.

A job folder holds the instances, `job.json` (written by route, never changed: the target's
whole definition is inside) and, once it has been tried, `dispatch.json`: the attempts so far,
when the next may start, the last error and which instances the target already has. It is
only ever written by the worker holding the job's claim, as a whole new file renamed over the
old (`Worker.replace_file`), so it never tears.

One attempt: claim the job, send what the target does not have yet, then one of
- everything delivered: `success/` (event `dispatched`);
- a failure that retrying cannot mend (an instance no codec can convert, a file of the job that
  is a symlink or not a regular file: never followed, never sent), or the last attempt
  (`max_attempts`) or the job too old (`max_age`): `error/` with the reason (event `failed`);
- otherwise: back to `outgoing/` with the next attempt `retry_delay * retry_backoff^(n-1)`
  seconds later, at most `retry_max_delay` (event `retry`).
A target that cannot be reached is left alone until that job's next attempt, so one target
that is down costs the others nothing. A dispatcher killed mid-job leaves the claim to
recovery; the job is tried again, and instances it had sent may be sent twice (at-least-once),
none is skipped. A job the spool cannot claim or whose dispatch.json cannot be saved (a full
disk) is set aside in memory (`mercli.setaside`) while the workers go on with the others; a
job delivered whole goes to `success/` even if its dispatch.json could not be saved, so it is
never sent again for that; a dispatch.json that cannot be read starts the attempts afresh.

**Cancelling** (`mercli cancel`): a job being sent has a `cancel.json` (`CancelRequest`) put
into its claimed folder. It is looked for before the attempt, between the instances of a dicom
target (other types deliver a job whole per attempt) and after the attempt: a job that is not
wholly delivered then goes to `error/` with error.json `reason` "cancelled: <reason>", who and
when (event `cancelled`), never torn mid-file. A job delivered whole meanwhile goes to
`success/` as usual: the request came too late.

`ordered = true` targets get the series of one study in the order their first instance was
received: a job waits while another job of the same study and target that was received
earlier is still in outgoing/ (waiting, retrying, or being sent by any worker).

**Priorities** (job.json `priority`, SPEC §4.1). Of the jobs that may be tried now, urgent ones
are claimed first, then normal ones, then offpeak ones, each class oldest first. Offpeak jobs
may be tried only while the local time is inside their window (job.json `offpeak`; a job
without a usable window goes any time, last). No starvation: after URGENT_IN_A_ROW urgent
claims in a row, the next claim is a normal (or open offpeak) job if one may be tried. On an
ordered target the jobs of one study go at the priority of the most urgent of them (window
included), so an urgent series never overtakes an earlier one of its study, nor waits behind
the whole normal backlog for it. The counts are per dispatcher process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.dicom import import_pydicom
from mercli.dispatch import helpers
from mercli.dispatch.targets import Attempt, deliver
from mercli.fsutil import remove_tree
from mercli.jobs import CANCEL_FILE, PRIORITIES, CancelRequest, JobInfo, Progress, Target
from mercli.notify.enqueue import event_variables, quarantine, settle, subscriptions_from
from mercli.setaside import SetAside
from mercli.spool import (
    INSTANCE_SUFFIX,
    OUTGOING,
    SIDECAR_SUFFIX,
    SUCCESS,
    Claim,
    NotRegularFile,
    Spool,
    Worker,
    irregular_entry,
    read_regular,
)

log = logging.getLogger(__name__)

URGENT_IN_A_ROW = 4  # SPEC §4.1: at most this many urgent claims while normal work waits


@dataclass
class DispatchSummary:
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    cancelled: int = 0
    unreachable: set[str] = field(default_factory=set)


def retry_delay(target: Target, attempts: int) -> float:
    """Seconds until the next attempt after `attempts` failed ones (exponential, capped)."""
    delay = target.retry_delay * target.retry_backoff ** max(0, attempts - 1)
    return float(min(delay, target.retry_max_delay))


def gives_up(target: Target, info: JobInfo, attempts: int, now: float) -> str:
    """Why this was the last attempt, or "" to try again."""
    if target.max_attempts and attempts >= target.max_attempts:
        return f"gave up after {attempts} attempts"
    if target.max_age and now - info.created >= target.max_age:
        return f"gave up: job older than {target.max_age:.0f} s"
    return ""


class Dispatcher:
    """Picks eligible jobs for any number of worker threads and settles each attempt."""

    def __init__(
        self,
        spool: Spool,
        worker: Worker,
        *,
        once: bool = False,
        clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.spool = spool
        self.clock = clock  # local time of day, for offpeak windows (tests set it)
        self.urgent_streak = 0  # urgent claims in a row
        self.worker = worker
        self.once = once  # each job at most one attempt (--once)
        self.tried: set[str] = set()
        self.lock = threading.Lock()
        self.infos: dict[str, JobInfo] = {}
        self.progress: dict[str, tuple[int, Progress]] = {}  # by job dir mtime
        self.busy: set[str] = set()
        self.down_until: dict[str, float] = {}  # target name -> wall time
        self.set_aside = SetAside()  # jobs that met an error that is not their target's
        self.unsettled: set[str] = set()  # --once: jobs set aside, counted as to retry
        self.summary = DispatchSummary()

    # -- choosing --------------------------------------------------------------------------

    def pick(self) -> tuple[Claim, JobInfo] | None:
        """Claim the job that may be tried now and goes first by priority and age, or None."""
        with self.lock:
            now = time.time()
            names = self._outgoing()
            for priority, info in self._by_priority(names):
                if self.set_aside.waits(info.name):
                    continue
                try:
                    claim = self._pick(info, names, now)
                except Exception as exc:  # this job's trouble (a full disk, a bug), not the others'
                    self._trouble(info.name, exc)
                    continue
                if claim is not None:
                    self.busy.add(info.name)
                    if self.once:
                        self.tried.add(info.name)
                    self.urgent_streak = self.urgent_streak + 1 if priority == "urgent" else 0
                    return claim, info
        return None

    def _pick(self, info: JobInfo, names: Sequence[str], now: float) -> Claim | None:
        if self.down_until.get(info.target.name, 0.0) > now:
            return None
        if self._progress(info.name).next_attempt > now:
            return None
        if info.target.ordered and not self._first_of_study(info, names):
            return None
        return self.worker.claim(OUTGOING, info.name)

    def _trouble(self, name: str, exc: Exception) -> None:
        """Set a job aside after an error of the spool or a bug (lock held): the workers go on
        with the others, and it is not tried (nor sent) again at once (`mercli.setaside`)."""
        seconds = self.set_aside.hold(name)
        if self.once and name not in self.unsettled:
            self.tried.add(name)
            self.unsettled.add(name)
            self.summary.retried += 1  # --once must not exit 0 with it unsent
        shown = exc if isinstance(exc, OSError) else type(exc).__name__
        log.error("job %s set aside for %.0f s: %s", name, seconds, shown)

    def _by_priority(self, names: Sequence[str]) -> list[tuple[str, JobInfo]]:
        """The jobs not in hand, with their effective priority, in the order to try them;
        offpeak jobs outside their window left out (see the module docstring)."""
        infos = []
        for name in names:
            if name not in self.busy and name not in self.tried:
                info = self._info(name, self.spool.state_dir(OUTGOING) / name)
                if info is not None:
                    infos.append(info)
        ranks = {priority: rank for rank, priority in enumerate(PRIORITIES)}
        studies: dict[tuple[str, str], int] = {}  # ordered targets: most urgent of each study
        for info in infos:
            if info.target.ordered:
                key = (info.target.name, info.study)
                studies[key] = min(studies.get(key, len(PRIORITIES)), ranks[info.priority])
        order = dict(ranks)
        if self.urgent_streak >= URGENT_IN_A_ROW:
            order["urgent"] = len(PRIORITIES)  # one normal (or offpeak) job's turn, if any
        local = self.clock()
        found = []
        for info in infos:
            rank = studies.get((info.target.name, info.study), ranks[info.priority])
            priority = PRIORITIES[rank] if info.target.ordered else info.priority
            if priority == "offpeak" and info.offpeak and not info.offpeak.contains(local):
                continue
            found.append((order[priority], info.name, priority, info))
        found.sort(key=lambda entry: entry[:2])
        return [(priority, info) for _, _, priority, info in found]

    def next_due(self) -> float | None:
        """Wall time of the earliest retry or target coming back, if any."""
        with self.lock:
            now = time.time()  # past ones: not picked for another reason, with its own time
            times = [p.next_attempt for _, p in self.progress.values() if p.next_attempt > now]
            times += list(self.down_until.values())
            aside = self.set_aside.next_wall_time()
        return min([*times, aside] if aside is not None else times, default=None)

    def _outgoing(self) -> list[str]:
        with os.scandir(self.spool.state_dir(OUTGOING)) as entries:
            names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        for stale in set(self.progress) - set(names) - self.busy:
            del self.progress[stale]
        for stale in set(self.infos) - set(names) - self.busy:
            del self.infos[stale]
        self.set_aside.keep_only([*names, *self.busy])
        return names

    def _info(self, name: str, folder: Path) -> JobInfo | None:
        info = self.infos.get(name)
        if info is None:
            try:
                info = self.infos[name] = JobInfo.load(name, folder)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("job %s has no usable job.json (%s); skipped", name, exc)
                return None
        return info

    def _progress(self, name: str) -> Progress:
        folder = self.spool.state_dir(OUTGOING) / name
        try:
            stamp = folder.stat().st_mtime_ns  # dispatch.json is renamed in: the folder changes
        except FileNotFoundError:
            return Progress()
        cached = self.progress.get(name)
        if cached is None or cached[0] != stamp:
            cached = self.progress[name] = (stamp, Progress.load(folder))
        return cached[1]

    def _first_of_study(self, info: JobInfo, names: Sequence[str]) -> bool:
        """No earlier job of this study and target is waiting or being sent."""
        me = (info.first_received, info.name)
        others = [(n, self.spool.state_dir(OUTGOING) / n) for n in names if n != info.name]
        others += [(item.name, item.path) for item in self.spool.claimed(OUTGOING)]
        for name, folder in others:
            other = self._info(name, folder)
            if (
                other is not None
                and other.name != info.name
                and other.target.name == info.target.name
                and other.study == info.study
                and (other.first_received, other.name) < me
            ):
                return False
        return True

    # -- one attempt -----------------------------------------------------------------------

    def _deliver_edited(self, claim: Claim, info: JobInfo, progress: Progress) -> Attempt:
        """Deliver a private, edited copy of the job (mercli.dispatch.edits), made in this
        worker's scratch for this attempt and removed after it."""
        helpers.warm_up()  # they import pydicom while this thread does
        import_pydicom()
        from mercli.dispatch.edits import EditFailed, edited_copy  # pydicom: only if needed

        scratch = self.worker.tmp_path(".edited")
        try:
            try:
                folder, edited = edited_copy(claim.path, info, scratch)
            except EditFailed as exc:
                return Attempt(error=str(exc), permanent=exc.permanent)
            return deliver(folder, edited, progress, stop=_stop(claim))
        finally:
            remove_tree(scratch)

    def attempt(self, claim: Claim, info: JobInfo) -> Attempt:
        """Try the job once and settle it: success/, error/, or back to outgoing/."""
        try:
            unsafe = irregular_entry(claim.path)  # whatever the target type reads them with
            progress = Progress() if unsafe else Progress.load(claim.path)
            request = CancelRequest.load(claim.path)
            if request is not None:  # asked for while the job waited (or was just released)
                self._cancel(claim, info, progress, request)
                return Attempt(error=request.error, permanent=True)
            progress.attempts += 1
            started = time.monotonic()
            if unsafe:
                result = _refused(unsafe)
            elif info.target.edits:  # mercli.dispatch.edits, loaded when needed
                result = self._deliver_edited(claim, info, progress)
            else:
                result = deliver(claim.path, info, progress, stop=_stop(claim))
            request = None if result.ok else CancelRequest.load(claim.path)
            if request is not None:
                self._cancel(claim, info, progress, request)
                return Attempt(result.delivered, request.error, permanent=True)
            self._settle(claim, info, progress, result, time.monotonic() - started)
            with self.lock:  # settled as its schedule says: errors in a row start again
                self.set_aside.settled(claim.name)
            return result
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

    def _cancel(
        self, claim: Claim, info: JobInfo, progress: Progress, request: CancelRequest
    ) -> None:
        """End a job `mercli cancel` asked to stop: error/, with who, when and why."""
        progress.last_error, progress.next_attempt = request.error, 0.0
        progress.save(self.worker, claim.path)  # `delivered` stays: resend sends only the rest
        detail = {"target": info.target.name, "attempts": progress.attempts, **request.detail()}
        claim.quarantine(request.error, **detail)
        fields = {"item": claim.name, "target": info.target.name, "by": request.by}
        self.spool.log("cancelled", **fields, reason=request.reason)
        log.warning(
            "job %s to %s %s (by %s)", claim.name, info.target.name, request.error, request.by
        )
        self.summary.cancelled += 1

    def _settle(
        self, claim: Claim, info: JobInfo, progress: Progress, result: Attempt, seconds: float
    ) -> None:
        target, now = info.target.name, time.time()
        fields = {"item": claim.name, "target": target, "attempt": progress.attempts}
        if result.ok:
            progress.finished = datetime.now(UTC).isoformat(timespec="milliseconds")
            progress.last_error, progress.next_attempt = "", 0.0
            try:  # a record for people: moving the job to success/ is what says "delivered"
                progress.save(self.worker, claim.path)
            except OSError as exc:
                log.warning("job %s delivered; its dispatch.json not saved: %s", claim.name, exc)
            subscriptions = subscriptions_from({"notify": info.notify})
            variables = _variables("delivered", claim, info)
            if variables:  # someone listens: every instance of the job went, over its attempts
                variables["instances"] = _instances(claim, info)
            settle(claim, SUCCESS, subscriptions, "delivered", variables, _source(claim, info))
            self.spool.log("dispatched", **fields, instances=result.delivered)
            log.info(
                "job %s: %d instance(s) to %s in %.1f s",
                claim.name,
                result.delivered,
                target,
                seconds,
            )
            self.summary.delivered += 1
            return
        progress.last_error = result.error
        give_up = (
            "cannot be sent"
            if result.permanent
            else gives_up(info.target, info, progress.attempts, now)
        )
        if result.unreachable:
            self.summary.unreachable.add(target)
        if give_up:
            progress.save(self.worker, claim.path)
            subscriptions = subscriptions_from({"notify": info.notify})
            variables = _variables("failed", claim, info, error=result.error)
            if variables:  # someone listens: the instances the target did not confirm
                confirmed = len(set(progress.delivered))
                variables["instances"] = max(0, _instances(claim, info) - confirmed)
            source = _source(claim, info)
            detail: dict[str, Any] = {"target": target, "attempts": progress.attempts}
            quarantine(claim, result.error, subscriptions, variables, source, **detail)
            self.spool.log("failed", **fields, reason=result.error)
            log.error(
                "job %s to %s failed for good (%s): %s", claim.name, target, give_up, result.error
            )
            self.summary.failed += 1
            return
        delay = retry_delay(info.target, progress.attempts)
        progress.next_attempt = now + delay
        with self.lock:  # kept in memory too: a save that fails must not mean "retry now"
            self.set_aside.hold(claim.name, delay)
            if result.unreachable:
                self.down_until[target] = progress.next_attempt
        progress.save(self.worker, claim.path)
        claim.release()
        self.spool.log("retry", **fields, error=result.error, delay=round(delay, 1))
        log.warning(
            "job %s to %s: %s; retry %d in %.0f s",
            claim.name,
            target,
            result.error,
            progress.attempts + 1,
            delay,
        )
        self.summary.retried += 1


def _stop(claim: Claim) -> Callable[[], bool]:
    """Whether `mercli cancel` has asked to stop this claimed job (checked between instances)."""
    return lambda: os.path.exists(claim.path / CANCEL_FILE)


def _refused(unsafe: NotRegularFile) -> Attempt:
    """The attempt of a job holding a file no target may read: failed for good, and why."""
    name = os.path.basename(str(unsafe.filename))
    return Attempt(error=f"job file {name}: {unsafe.strerror}", permanent=True)


def summary_fields(summary: DispatchSummary) -> dict[str, Any]:
    return {**asdict(summary), "unreachable": sorted(summary.unreachable)}


def _variables(event: str, claim: Claim, info: JobInfo, **fields: Any) -> dict[str, Any]:
    """Template variables of a job's event: job.json's keys, and the rest (descriptions,
    patient data for phi channels) from one of its sidecars, read only if anyone listens."""
    if not info.notify:
        return {}
    tags: dict[str, Any] = dict(info.keys)
    folder = claim.path / info.series[0] if info.series else claim.path
    for sidecar in sorted(folder.glob(f"*{SIDECAR_SUFFIX}"))[:1]:
        with contextlib.suppress(OSError, ValueError):
            tags = {**json.loads(read_regular(sidecar)), **tags}
    rules = [str(rule) for rule in info.rules]
    return event_variables(
        event,
        tags,
        target=info.target.name,
        rule=rules[0] if rules else "",
        rules=rules,
        item=claim.name,
        **fields,
    )


def _instances(claim: Claim, info: JobInfo) -> int:
    """How many instances a job holds (in its series' sub-folders for a study job)."""
    folders = [claim.path / series for series in info.series] or [claim.path]
    count = 0
    for folder in folders:
        with contextlib.suppress(OSError):
            count += sum(1 for name in os.listdir(folder) if name.endswith(INSTANCE_SUFFIX))
    return count


def _source(claim: Claim, info: JobInfo) -> dict[str, Any]:
    return {"item": claim.name, "target": info.target.name}
