"""Counters from the event log: each event adds to a few counter families, with bounded labels.

This module only counts: it never reads files, so it is the same for a long-running listener
and for a one-shot run resumed from the state file (`mercli.metrics.state`). Its counts are
plain data (JSON-ready), which is what makes that resume possible.

Why labels are filtered here: event fields come partly from the network (UIDs, AE titles) and
partly from config (target, rule and module names). Only config names become label values,
and only when they look like the names rules.toml accepts; at most `MAX_NAMES` of each kind
are admitted (first seen first), the rest count under `OTHER`, so a mistake or an attack can
add at most a bounded number of series to Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mercli.spool import STATES

MAX_NAMES = 100  # distinct values admitted per label kind (target, rule, module)
OTHER = "_other"  # no rules.toml name starts with "_": it cannot collide with one
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # target names rules.toml accepts
STAGES = ("dispatch", "process")

Labels = tuple[str, ...]
Handler = Callable[["EventCounts", Mapping[str, Any]], None]


@dataclass(frozen=True)
class CounterSpec:
    """One counter family: its name without `_total`, help text and label names."""

    name: str
    help: str
    labels: tuple[str, ...] = ()


_FAILURE_LABELS = ("stage", "target", "module")

COUNTERS: dict[str, CounterSpec] = {
    spec.name: spec
    for spec in (
        CounterSpec("mercli_events", "Events in the spool's event log, by event name.", ("event",)),
        CounterSpec("mercli_received_instances", "DICOM instances received into incoming/."),
        CounterSpec(
            "mercli_received_replaced",
            "Received instances that replaced an earlier copy (same SOP Instance UID).",
        ),
        CounterSpec(
            "mercli_routed",
            "Jobs made by routing: kind dispatch (to a target) or process (a processing job).",
            ("kind", "target"),
        ),
        CounterSpec(
            "mercli_routed_rule",
            "Jobs made by routing, per rule that asked for them (a job two rules asked for "
            "counts for each).",
            ("rule",),
        ),
        CounterSpec("mercli_held", "Series held in studies/ for study-level rules."),
        CounterSpec("mercli_discarded", "Series (or studies) routing put in discard/."),
        CounterSpec("mercli_processed", "Processing jobs finished, per rule.", ("rule",)),
        CounterSpec("mercli_dispatched", "Jobs delivered to a target.", ("target",)),
        CounterSpec(
            "mercli_dispatched_instances", "DICOM instances delivered to a target.", ("target",)
        ),
        CounterSpec(
            "mercli_failed",
            "Jobs that failed for good (moved to error/), by stage and target or module.",
            _FAILURE_LABELS,
        ),
        CounterSpec(
            "mercli_retries", "Failed attempts that will be retried later.", _FAILURE_LABELS
        ),
        CounterSpec(
            "mercli_resent", "Items put back by `mercli resend`.", ("from_state", "to_state")
        ),
        CounterSpec("mercli_purged", "Items deleted by retention or disk pressure.", ("state",)),
        CounterSpec("mercli_purged_bytes", "Bytes freed by purging items.", ("state",)),
        CounterSpec(
            "mercli_quarantined", "Series or instances moved to error/ when received or routed."
        ),
        CounterSpec(
            "mercli_duplicates_dropped",
            "Instances dropped because a newer copy was already in their series.",
        ),
        CounterSpec("mercli_recovered_claims", "Claims of dead workers rolled back or forward."),
    )
}

KNOWN_EVENTS = frozenset(
    {
        "received",
        "routed",
        "held",
        "discarded",
        "processed",
        "dispatched",
        "failed",
        "retry",
        "resent",
        "purged",
        "quarantined",
        "notified",
        "notify_retry",
        "notify_failed",
        "duplicate_dropped",
        "recovered",
    }
)


@dataclass
class EventCounts:
    """Counter values per family and label values, and the names admitted as label values."""

    values: dict[str, dict[Labels, float]] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)  # kind -> admitted, in order

    def add(self, family: str, labels: Labels = (), amount: float = 1) -> None:
        series = self.values.setdefault(family, {})
        series[labels] = series.get(labels, 0) + amount

    def name(self, kind: str, value: object) -> str:
        """A target/rule/module name as a label value: itself if admitted, else `OTHER`."""
        if not isinstance(value, str) or not NAME.fullmatch(value):
            return OTHER
        admitted = self.names.setdefault(kind, [])
        if value in admitted:
            return value
        if len(admitted) >= MAX_NAMES:
            return OTHER
        admitted.append(value)
        return value

    def count(self, event: Mapping[str, Any]) -> None:
        """Add one event of the log to every family it concerns."""
        kind = event.get("event")
        name = kind if isinstance(kind, str) and kind in KNOWN_EVENTS else OTHER
        self.add("mercli_events", (name,))
        handler = _HANDLERS.get(name)
        if handler is not None:
            handler(self, event)

    def to_json(self) -> dict[str, Any]:
        return {
            "values": {
                family: [[list(labels), value] for labels, value in sorted(series.items())]
                for family, series in sorted(self.values.items())
            },
            "names": self.names,
        }

    @classmethod
    def from_json(cls, document: object) -> EventCounts:
        """Counts back from `to_json`; what does not fit the current families is dropped."""
        counts = cls()
        if not isinstance(document, dict):
            return counts
        for family, rows in _mapping(document.get("values")).items():
            spec = COUNTERS.get(family)
            for row in rows if spec is not None and isinstance(rows, list) else []:
                labels, value = row if isinstance(row, list) and len(row) == 2 else ([], None)
                if _valid_row(spec, labels, value):
                    counts.add(family, tuple(labels), value)
        for kind, admitted in _mapping(document.get("names")).items():
            if isinstance(admitted, list):
                counts.names[kind] = [n for n in admitted if isinstance(n, str)][:MAX_NAMES]
        return counts


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _valid_row(spec: CounterSpec | None, labels: object, value: object) -> bool:
    return (
        spec is not None
        and isinstance(labels, list)
        and len(labels) == len(spec.labels)
        and all(isinstance(v, str) for v in labels)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and value >= 0
    )


# -- one handler per event name ------------------------------------------------------------------


def _received(counts: EventCounts, event: Mapping[str, Any]) -> None:
    counts.add("mercli_received_instances")
    if event.get("replaced") is True:
        counts.add("mercli_received_replaced")


def _routed(counts: EventCounts, event: Mapping[str, Any]) -> None:
    if event.get("process"):
        counts.add("mercli_routed", ("process", ""))
    else:
        counts.add("mercli_routed", ("dispatch", counts.name("target", event.get("target"))))
    rules = event.get("rules")
    for rule in rules if isinstance(rules, list) else []:
        counts.add("mercli_routed_rule", (counts.name("rule", rule),))


def _processed(counts: EventCounts, event: Mapping[str, Any]) -> None:
    counts.add("mercli_processed", (counts.name("rule", event.get("rule")),))


def _dispatched(counts: EventCounts, event: Mapping[str, Any]) -> None:
    target = counts.name("target", event.get("target"))
    counts.add("mercli_dispatched", (target,))
    counts.add("mercli_dispatched_instances", (target,), _amount(event.get("instances")))


def _failure(family: str) -> Handler:
    """Handler for failed/retry: dispatch events name a target, processing ones a module."""

    def handler(counts: EventCounts, event: Mapping[str, Any]) -> None:
        if "target" in event:
            labels = ("dispatch", counts.name("target", event["target"]), "")
        elif "module" in event:
            labels = ("process", "", counts.name("module", event["module"]))
        else:
            labels = (OTHER, "", "")
        counts.add(family, labels)

    return handler


def _resent(counts: EventCounts, event: Mapping[str, Any]) -> None:
    counts.add("mercli_resent", (_state_of(event.get("from")), _state_of(event.get("to"))))


def _purged(counts: EventCounts, event: Mapping[str, Any]) -> None:
    state = _state_of(event.get("state"))
    counts.add("mercli_purged", (state,))
    counts.add("mercli_purged_bytes", (state,), _amount(event.get("bytes")))


def _recovered(counts: EventCounts, event: Mapping[str, Any]) -> None:
    for key in ("released", "rolled_forward"):
        value = event.get(key)
        counts.add("mercli_recovered_claims", (), len(value) if isinstance(value, list) else 0)


def _simple(family: str) -> Handler:
    def handler(counts: EventCounts, event: Mapping[str, Any]) -> None:
        counts.add(family)

    return handler


def _state_of(label: object) -> str:
    """`outgoing/<id>` or `outgoing` -> `outgoing`; anything that is no spool state -> OTHER."""
    state = label.partition("/")[0] if isinstance(label, str) else ""
    return state if state in STATES else OTHER


def _amount(value: object) -> float:
    """A count or size from an event: a non-negative number, else 0."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return 0.0


_HANDLERS: dict[str, Handler] = {
    "received": _received,
    "routed": _routed,
    "held": _simple("mercli_held"),
    "discarded": _simple("mercli_discarded"),
    "processed": _processed,
    "dispatched": _dispatched,
    "failed": _failure("mercli_failed"),
    "retry": _failure("mercli_retries"),
    "resent": _resent,
    "purged": _purged,
    "quarantined": _simple("mercli_quarantined"),
    "duplicate_dropped": _simple("mercli_duplicates_dropped"),
    "recovered": _recovered,
}
