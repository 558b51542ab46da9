"""The worker loop dispatch and notify share: pick the next due item, attempt it, go on.

Both keep their items as folders of one state (outgoing/, notify/), claimed by rename, tried
by any number of worker threads. A worker never ends on an error: a failure of one attempt
(the spool refusing a save, a bug) is logged and the picker has set that item aside
(`mercli.setaside`); a failure to look for items at all (the folder cannot be listed) is
tried again after FULL_SCAN as a service, and ends a --once run counted as unfinished.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from mercli.service import FULL_SCAN
from mercli.spool import Claim

log = logging.getLogger(__name__)


class Picker(Protocol):
    """A Dispatcher or a notify Sender: picks, attempts and settles items for threads."""

    lock: threading.Lock
    summary: Any  # has `retried`: what --once left to do

    def pick(self) -> tuple[Claim, Any] | None: ...

    def attempt(self, claim: Claim, item: Any, /) -> object: ...

    def next_due(self) -> float | None: ...


def attempt(picker: Picker, claim: Claim, item: Any, what: str) -> None:
    """One attempt; an error is logged (an OSError's words, else the type only: a message
    could quote anything), never the end of the worker thread."""
    try:
        picker.attempt(claim, item)
    except OSError as exc:  # the spool, not the peer
        log.error("%s %s: %s", what, claim.name, exc)
    except Exception as exc:
        log.error("%s %s: unexpected %s", what, claim.name, type(exc).__name__)


def drain(picker: Picker, stop: threading.Event, what: str) -> None:
    """--once: attempt every item due now, each at most once."""
    while not stop.is_set():
        try:
            picked = picker.pick()
        except Exception as exc:  # the folder cannot be listed: this run cannot finish
            log.error("cannot look for %s items: %s", what, exc)
            with picker.lock:
                picker.summary.retried += 1  # exit 1: not everything was tried
            return
        if picked is None:
            return
        attempt(picker, *picked, what)


def serve(picker: Picker, stop: threading.Event, wake: threading.Event, what: str) -> None:
    """As a service: attempt what is due, else sleep until woken, the next retry falls due or
    FULL_SCAN passes."""
    while not stop.is_set():
        try:
            picked = picker.pick()
        except Exception as exc:  # the folder cannot be listed now: try again later
            log.error("cannot look for %s items: %s", what, exc)
            stop.wait(FULL_SCAN)
            continue
        if picked is not None:
            attempt(picker, *picked, what)
            continue
        due = picker.next_due()
        timeout = FULL_SCAN if due is None else max(0.05, min(FULL_SCAN, due - time.time()))
        wake.wait(timeout)
        wake.clear()
