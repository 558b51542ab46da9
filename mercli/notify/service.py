"""Running `mercli notify`: worker threads over one Sender, once or as a service.

The stages write notifications into their workers' logs (`mercli.spool.notices`); a
collector thread turns those of committed transactions into items of notify/ every
COLLECT_EVERY seconds (`mercli.notify.collect`). Sending is network-bound, so `--workers N`
are threads of one process sharing one lease; more processes (or hosts with a shared spool)
scale the same way, since every notification is claimed by rename. As a service the workers
sleep until an item appears in notify/ (watchdog), a retry falls due, or FULL_SCAN seconds
pass; dead workers' claims (and logs) are recovered every RECOVER_EVERY seconds, and at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from mercli import pickloop
from mercli.notify.collect import Collector
from mercli.notify.sender import NotifySummary, Sender
from mercli.service import RECOVER_EVERY, SIGNAL_POLL, stop_on_signals, wake_on_changes
from mercli.spool import NOTIFY, Spool, Worker, recover

log = logging.getLogger(__name__)

COLLECT_EVERY = 0.2  # seconds between passes over the notification logs


class NotifyService:
    """`mercli notify`: N worker threads until done (--once) or until SIGINT/SIGTERM."""

    def __init__(self, spool_root: Path, workers: int) -> None:
        self.spool = Spool.open(spool_root)
        self.workers = max(1, workers)
        self.stop = threading.Event()
        self.wake = threading.Event()

    def run(self, *, once: bool) -> NotifySummary:
        recover(self.spool)  # first: it decides what dead workers' logs hold
        with Worker(self.spool, "notify") as worker:
            collector = Collector(self.spool, worker)
            sender = Sender(self.spool, worker, once=once)
            if once:
                collector.collect()
                self._threads(sender, self._drain)
            else:
                self._serve(sender, collector)
            return sender.summary

    def _threads(self, sender: Sender, body: Callable[[Sender], None]) -> None:
        threads = [
            threading.Thread(target=body, args=(sender,), name=f"notify-{n}")
            for n in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:  # with a timeout: see mercli.service.SIGNAL_POLL
            while thread.is_alive():
                thread.join(SIGNAL_POLL)

    def _drain(self, sender: Sender) -> None:
        """--once: attempt every notification due now, each at most once."""
        pickloop.drain(sender, self.stop, "notification")

    def _serve(self, sender: Sender, collector: Collector) -> None:
        stop_on_signals(self.stop, "finishing the notifications in hand", self.wake)
        log.info("sending notifications from %s with %d worker(s)", self.spool.root, self.workers)
        recoverer = threading.Thread(target=self._recover_periodically, daemon=True)
        recoverer.start()
        collecting = threading.Thread(target=self._collect, args=(collector,), daemon=True)
        collecting.start()
        with wake_on_changes(self.wake, [self.spool.state_dir(NOTIFY)]):
            self._threads(sender, self._work)

    def _work(self, sender: Sender) -> None:
        pickloop.serve(sender, self.stop, self.wake, "notification")

    def _collect(self, collector: Collector) -> None:
        """The notification logs polled into notify/ (a pass with nothing new is a listing
        and a read of zeros; a file event would not say more, since lines are overwrites)."""
        while not self.stop.is_set():
            try:
                if collector.collect():
                    self.wake.set()
            except OSError as exc:
                log.error("collecting notifications: %s", exc)
            except Exception as exc:  # a bug or a template's surprise must not end collecting
                # the type only: a rendering error's text may quote a patient's values
                log.error("collecting notifications failed (%s); trying again", type(exc).__name__)
            self.stop.wait(COLLECT_EVERY)

    def _recover_periodically(self) -> None:
        while not self.stop.wait(RECOVER_EVERY):
            recover(self.spool)
            self.wake.set()
