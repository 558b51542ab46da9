"""Running the router: once, or as a service woken by file events with a periodic full scan.

watchdog reports new series folders in incoming/ and new hints in hints/, so a series is
routed the moment its settle time is up; the loop also wakes at the earliest time any series
becomes complete, and at least every FULL_SCAN seconds, because events are hints and the
folders are the truth (a missed event only delays, never loses).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from mercli.errors import ConfigError
from mercli.names import safe_name
from mercli.route.complete import Completer, Completion, due_studies
from mercli.route.router import Router, RouteSummary, reap_hints
from mercli.route.studies import HeldCache, scan_studies
from mercli.rules.config import RuleSet, load_rules
from mercli.service import FULL_SCAN, RECOVER_EVERY, stop_on_signals, wake_on_changes
from mercli.spool import INCOMING, STUDIES, Spool, Worker, recover

log = logging.getLogger(__name__)

REAP_HINTS_EVERY = 600.0
FAILED_BACKOFF = 10.0  # seconds before a series that could not be routed is tried again


class RouteService:
    """One router process: rules reloaded when their file changes, stops on SIGINT/SIGTERM."""

    def __init__(self, spool_root: Path, rules_path: Path) -> None:
        self.spool = Spool.open(spool_root)
        self.rules_path = rules_path
        self.rules = load_rules(rules_path)
        self.rules_mtime = rules_path.stat().st_mtime
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.failed_until: dict[str, float] = {}
        self.summary = RouteSummary()
        self.held = HeldCache()

    def run_once(self, *, everything: bool = False) -> RouteSummary:
        """Route every batch complete now (every batch, if `everything`), then return."""
        recover(self.spool)
        with Worker(self.spool, "route") as worker:
            self._pass(Router(self.spool, worker, self.rules), everything=everything)
        return self.summary

    def complete_study(self, uid: str) -> Completion | None:
        """Complete the held study with this StudyInstanceUID now, whatever its rules still
        wait for (`--complete-study`); None if no study of that UID is held."""
        recover(self.spool)
        with Worker(self.spool, "route") as worker:
            completer = Completer(self.spool, worker, self.rules, self.held)
            for name in dict.fromkeys((safe_name(uid), uid)):
                if name and "/" not in name and (self.spool.state_dir(STUDIES) / name).is_dir():
                    return completer.complete(name, force=True)
        return None

    def run_forever(self) -> RouteSummary:
        stop_on_signals(self.stop, "stopping after the current series", self.wake)
        recover(self.spool)
        folders = (self.spool.state_dir(INCOMING), self.spool.hints)
        log.info("routing %s with %s", self.spool.root, self.rules_path)
        next_recover = next_reap = 0.0
        with wake_on_changes(self.wake, folders), Worker(self.spool, "route") as worker:
            while not self.stop.is_set():
                router = Router(self.spool, worker, self._current_rules())
                next_at = self._pass(router)
                now = time.monotonic()
                if now >= next_recover:
                    recover(self.spool)
                    next_recover = now + RECOVER_EVERY
                if now >= next_reap:
                    reap_hints(self.spool, {s.name for s in router.due()[0]})
                    next_reap = now + REAP_HINTS_EVERY
                timeout = FULL_SCAN if next_at is None else next_at - time.time()
                self.wake.wait(max(0.0, min(FULL_SCAN, timeout)))
                self.wake.clear()
        return self.summary

    def _pass(self, router: Router, *, everything: bool = False) -> float | None:
        """Route what is due; the wall-clock time the next batch will be."""
        due, next_at = router.due(float("inf") if everything else None)
        for state in due:
            if self.stop.is_set():
                break
            if self.failed_until.get(state.name, 0.0) > time.monotonic():
                continue
            try:
                router.route(state, self.summary, check=not everything)
                self.failed_until.pop(state.name, None)
            except OSError as exc:  # disk full, permissions: keep the batch, try later
                self.summary.failed += 1
                self.failed_until[state.name] = time.monotonic() + FAILED_BACKOFF
                log.error("cannot route series %s: %s; retrying later", state.name, exc)
        study_next = self._complete_studies(router)
        return min((t for t in (next_at, study_next) if t is not None), default=None)

    def _complete_studies(self, router: Router) -> float | None:
        """Complete the studies that are due; the wall-clock time the next one will be."""
        completer = Completer(self.spool, router.worker, router.rules, self.held)
        now = time.time()
        due, next_at = due_studies(scan_studies(self.spool, self.held), router.rules, now)
        for study in due:
            if self.stop.is_set():
                break
            key = f"{STUDIES}/{study.name}"
            if self.failed_until.get(key, 0.0) > time.monotonic():
                continue
            try:
                done = completer.complete(study.name, now)
                self.summary.jobs += done.jobs
                self.summary.discarded += done.discarded
                self.failed_until.pop(key, None)
            except OSError as exc:
                self.summary.failed += 1
                self.failed_until[key] = time.monotonic() + FAILED_BACKOFF
                log.error("cannot complete study %s: %s; retrying later", study.name, exc)
        return next_at

    def _current_rules(self) -> RuleSet:
        """The rules, reloaded when their file changed; a broken edit keeps the old ones."""
        try:
            mtime = self.rules_path.stat().st_mtime
        except OSError:
            return self.rules
        if mtime != self.rules_mtime:
            self.rules_mtime = mtime
            try:
                self.rules = load_rules(self.rules_path)
                log.info("rules reloaded from %s", self.rules_path)
            except ConfigError as exc:
                log.error("rules not reloaded, keeping the previous ones: %s", exc)
        return self.rules
