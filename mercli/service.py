"""What every long-running stage does alike: stop on signals, wake on file events, rescan.

Each stage (receive, route, dispatch, the `run` supervisor) is a loop that sleeps until there
may be work. watchdog events wake it early, but events are hints, never the truth: the loop
also rescans its folders at least every `FULL_SCAN` seconds, so a missed event only delays
work, and looks for dead workers' claims every `RECOVER_EVERY` seconds. SIGINT and SIGTERM set
a stop event (and wake the loop) so the stage finishes what it holds and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent

log = logging.getLogger(__name__)

FULL_SCAN = 5.0  # seconds between scans of the folders when nothing else wakes a loop
RECOVER_EVERY = 30.0  # seconds between looks for claims of dead workers


# The main thread must not wait on an Event without a timeout while a signal handler should
# stop it: the kernel may deliver SIGTERM to any thread, and then the main thread's blocked
# lock acquire is not interrupted, so the handler only runs when the wait ends on its own.
SIGNAL_POLL = 0.5  # seconds


def stop_on_signals(stop: threading.Event, doing: str, *also: threading.Event) -> None:
    """On SIGINT/SIGTERM: log "<SIGNAL> received: <doing>", set `stop` and every `also`."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: %s", signal.Signals(signum).name, doing)
        stop.set()
        for event in also:
            event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """In a child process: get `signum` when the thread that started it ends, however it
    ends (`kill -9` of mercli included), so no child outlives the claim it worked for.
    False where the kernel refused (a seccomp filter, say)."""
    import ctypes

    pr_set_pdeathsig = 1
    return int(ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum, 0, 0, 0)) == 0


def ignore_signals() -> None:
    """Stop reacting to SIGINT/SIGTERM (while a stage is already shutting down)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def wake_on_changes(wake: threading.Event, folders: Iterable[Path]) -> Iterator[None]:
    """Set `wake` whenever anything happens directly inside one of `folders` (watchdog)."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    class _Wake(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            wake.set()

    observer = Observer()
    handler = _Wake()
    for folder in folders:
        observer.schedule(handler, str(folder), recursive=False)
    observer.start()
    try:
        yield
    finally:
        observer.stop()
        observer.join()
