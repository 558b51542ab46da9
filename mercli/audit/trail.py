"""The trail of a study, series, accession number or patient: every event of every item.

Events link up by the names they share (see `mercli.audit` for the chain): starting from the
keys the user asked for, `Trail` collects the events that carry one of its keys and takes
their other keys on (the items a `routed` event made, the series a `held` event held, the
item a `resent` event made), until nothing new turns up. Accession and patient keys are
only ever where a search starts: following them from a study would pull in every other
study of the patient.

Asked for a series, the trail takes its items and the study jobs its series went into, but
not the other series of that study: events reached through a study key count only when they
are about the whole study (study jobs carry no series).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mercli.audit.index import EventIndex, Key, Position, event_keys, open_index
from mercli.audit.keys import keyed, normalise, spool_secret
from mercli.names import safe_name
from mercli.spool import Spool
from mercli.spool.events import Cursor, EventLog

FOLLOWED = frozenset("ist")  # key kinds a trail takes on from the events it finds
FOLLOW_POLL = 0.5  # seconds between looks at the log when no file event wakes --follow
PENDING_MAX = 100_000  # received events --follow keeps back until their series joins the trail


@dataclass(frozen=True)
class Query:
    """What `mercli log` was asked for; no keys at all means every event."""

    studies: Sequence[str] = ()
    series: Sequence[str] = ()
    accessions: Sequence[str] = ()
    patient_ids: Sequence[str] = ()
    since: datetime | None = None

    @property
    def everything(self) -> bool:
        return not (self.studies or self.series or self.accessions or self.patient_ids)

    @property
    def whole_studies(self) -> bool:
        """True when the trail covers whole studies (not just some series of them)."""
        return bool(self.studies or self.accessions or self.patient_ids)

    def keys(self, root: Path) -> set[Key]:
        """The keys a search starts from: a UID as given and as its spool name (they differ
        only for malformed UIDs), and the keyed hashes of accession numbers and patient IDs."""
        keys = {("t", v) for uid in self.studies for v in (uid.strip(), safe_name(uid.strip()))}
        keys |= {("s", v) for uid in self.series for v in (uid.strip(), safe_name(uid.strip()))}
        if self.accessions or self.patient_ids:
            secret = spool_secret(root)
            keys |= {("a", keyed(secret, "AccessionNumber", v)) for v in self.accessions if v}
            keys |= {("p", keyed(secret, "PatientID", v)) for v in self.patient_ids if v}
        return {(kind, value) for kind, value in keys if normalise(value)}


class Trail:
    """The keys a trail has reached, and the rule for whether an event belongs to it."""

    def __init__(self, start: Iterable[Key], whole_studies: bool) -> None:
        self.keys: set[Key] = set(start)
        self.whole_studies = whole_studies

    def belongs(self, record: Mapping[str, Any], via: Key, keys: Sequence[Key]) -> bool:
        """Does an event found through `via` belong to the trail? Not if its line no longer
        carries the key (see `mercli.audit.index`), nor if it is another series' event of a
        study when the trail is about some series only."""
        if via not in keys:
            return False
        if via[0] == "t" and not self.whole_studies:
            return not isinstance(record.get("series"), str)
        return True

    def take_on(self, keys: Iterable[Key]) -> list[Key]:
        """Add an admitted event's keys (those a trail follows); the ones new to it."""
        new = [k for k in dict.fromkeys(keys) if k[0] in FOLLOWED and k not in self.keys]
        self.keys.update(new)
        return new

    def accepts(self, record: Mapping[str, Any]) -> list[Key] | None:
        """For --follow: the keys a new event brings to the trail if it belongs to it ([] if
        none are new), else None."""
        keys = event_keys(record)
        if any(k in self.keys and self.belongs(record, k, keys) for k in keys):
            return self.take_on(keys)
        return None


class History:
    """The past events a query asked for, oldest first (`records`, iterated once), and where
    --follow goes on after them (`cursor`, final once `records` is consumed)."""

    def __init__(self, events: EventLog, since: datetime | None, trail: Trail | None) -> None:
        self.events = events
        self.since = since
        self.trail = trail
        self.cursor = Cursor(f"{since:%Y-%m-%d}", 0) if since is not None else Cursor()
        self.found: list[dict[str, Any]] = []

    @property
    def streamed(self) -> bool:
        """True when every event is read straight from the log (no filter): too many, maybe,
        to hold in memory, so they are handed on one by one."""
        return self.trail is None

    @property
    def records(self) -> Iterator[dict[str, Any]]:
        stamp = "" if self.since is None else self.since.isoformat()
        if self.trail is not None:
            yield from (r for r in self.found if str(r.get("at", "")) >= stamp)
            return
        for record, after in self.events.read_after(self.cursor):
            self.cursor = after
            if str(record.get("at", "")) >= stamp:
                yield record


def collect(spool: Spool, query: Query) -> History:
    """The events of a query: its trail found through the index (brought up to date first),
    or, without a filter, every event straight from the log."""
    if query.everything:
        return History(spool.events, query.since, None)
    trail = Trail(query.keys(spool.root), query.whole_studies)
    history = History(spool.events, query.since, trail)
    index = open_index(spool.events, spool.tmp)
    try:
        found = _walk(index, trail)
        history.cursor = index.cursor
    finally:
        index.close()
    history.found = [found[p] for p in sorted(found)]
    return history


def _walk(index: EventIndex, trail: Trail) -> dict[Position, dict[str, Any]]:
    """Every event reachable from the trail's keys, by position in the log."""
    found: dict[Position, dict[str, Any]] = {}
    frontier = sorted(trail.keys)
    while frontier:
        key = frontier.pop()
        for position in index.lookup(key):
            if position in found or (record := index.read(position)) is None:
                continue
            keys = event_keys(record)
            if trail.belongs(record, key, keys):
                found[position] = record
                frontier.extend(trail.take_on(keys))
    return found


class Follower:
    """Which new events --follow shows: all of them, or the trail's.

    A series' `received` events come before the `routed` (or `held`) event that ties the
    series to a study: they are kept back (PENDING_MAX at most, the oldest series dropped
    first) and shown together, just before it, once it comes."""

    def __init__(self, trail: Trail | None) -> None:
        self.trail = trail
        self.pending: dict[str, list[dict[str, Any]]] = {}
        self.held_back = 0

    def take(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The events to show now, given one new event (often none or just it)."""
        if self.trail is None:
            return [record]
        new = self.trail.accepts(record)
        if new is None:
            self._hold(record)
            return []
        shown = [r for kind, name in new if kind == "s" for r in self._release(name)]
        return [*shown, record]

    def _hold(self, record: dict[str, Any]) -> None:
        series = record.get("series")
        if record.get("event") != "received" or not isinstance(series, str):
            return
        self.pending.setdefault(series, []).append(record)
        self.held_back += 1
        while self.held_back > PENDING_MAX and self.pending:
            self._release(next(iter(self.pending)))

    def _release(self, series: str) -> list[dict[str, Any]]:
        records = self.pending.pop(series, [])
        self.held_back -= len(records)
        return records


def follow(
    events: EventLog,
    cursor: Cursor,
    trail: Trail | None,
    emit: Callable[[list[dict[str, Any]]], None],
    stop: threading.Event,
    wake: threading.Event,
) -> None:
    """Emit the new events (`Follower`) in batches as they are appended, until `stop` is set.

    watchdog wakes the loop as soon as a day file grows; FOLLOW_POLL bounds the wait anyway
    (file events are hints: a missed one delays an event by FOLLOW_POLL at most).
    """
    from mercli.service import wake_on_changes

    follower = Follower(trail)
    with wake_on_changes(wake, [events.directory]):
        while not stop.is_set():
            for record, after in events.read_after(cursor):
                cursor = after
                if shown := follower.take(record):
                    emit(shown)
                if stop.is_set():
                    return
            wake.wait(FOLLOW_POLL)
            wake.clear()
