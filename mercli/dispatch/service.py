"""Running dispatch: worker threads over one Dispatcher, once or as a service.

Sending is network-bound, so `--workers N` are threads of one process sharing one lease and
one view of the spool; more processes (or hosts with a shared spool) scale the same way,
since every job is claimed by rename. As a service the workers sleep until a job appears in
outgoing/ (watchdog), a retry falls due, or FULL_SCAN seconds pass.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

from mercli import pickloop
from mercli.dicom import import_pydicom
from mercli.dispatch import helpers
from mercli.dispatch.dispatcher import Dispatcher, DispatchSummary
from mercli.service import RECOVER_EVERY, SIGNAL_POLL, stop_on_signals, wake_on_changes
from mercli.spool import OUTGOING, Spool, Worker, recover

log = logging.getLogger(__name__)


class DispatchService:
    """`mercli dispatch`: N worker threads until done (--once) or until SIGINT/SIGTERM."""

    def __init__(self, spool_root: Path, workers: int, edit_helpers: int = 0) -> None:
        """`edit_helpers`: processes forked at `run` (mercli.dispatch.helpers); the command
        asks for `helpers.default_count`, a program embedding the service for none unless
        it says so."""
        self.spool = Spool.open(spool_root)
        self.workers = max(1, workers)
        self.edit_helpers = edit_helpers
        self.stop = threading.Event()
        self.wake = threading.Event()

    def run(self, *, once: bool) -> DispatchSummary:
        # pydicom warns with the odd value it read: patient data, not for a log.
        warnings.simplefilter("ignore")
        # First of all, while this process has one thread: see mercli.dispatch.helpers.
        pool = helpers.EditHelpers.start(self.edit_helpers)
        helpers.use(pool)
        try:
            recover(self.spool)
            with Worker(self.spool, "dispatch") as worker:
                dispatcher = Dispatcher(self.spool, worker, once=once)
                if once:
                    self._threads(dispatcher, self._drain)
                else:
                    self._serve(dispatcher)
                return dispatcher.summary
        finally:
            helpers.use(None)
            pool.close()

    def _threads(self, dispatcher: Dispatcher, body: object) -> None:
        if self.workers > 1:
            # Workers import pydicom lazily (edits, conversions, UID names in messages). Two
            # threads importing it for the first time at once can see it half-initialised
            # ("cannot import name 'UID' from partially initialized module"): import it here,
            # once, before they start. Not at start-up: `--help` stays light.
            import_pydicom()  # and before they start: it hides `requests` while it runs
        threads = [
            threading.Thread(target=body, args=(dispatcher,), name=f"dispatch-{n}")  # type: ignore[arg-type]
            for n in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:  # with a timeout: see mercli.service.SIGNAL_POLL
            while thread.is_alive():
                thread.join(SIGNAL_POLL)

    def _drain(self, dispatcher: Dispatcher) -> None:
        """--once: attempt every job eligible now, each at most once."""
        pickloop.drain(dispatcher, self.stop, "job")

    def _serve(self, dispatcher: Dispatcher) -> None:
        stop_on_signals(self.stop, "finishing the jobs in hand", self.wake)
        log.info("dispatching from %s with %d worker(s)", self.spool.root, self.workers)
        recoverer = threading.Thread(target=self._recover_periodically, daemon=True)
        recoverer.start()
        with wake_on_changes(self.wake, [self.spool.state_dir(OUTGOING)]):
            self._threads(dispatcher, self._work)

    def _work(self, dispatcher: Dispatcher) -> None:
        pickloop.serve(dispatcher, self.stop, self.wake, "job")

    def _recover_periodically(self) -> None:
        while not self.stop.wait(RECOVER_EVERY):
            recover(self.spool)
            self.wake.set()
