"""The prometheus_client Collector that reads the spool at scrape time, and the exposition text.

Counters come from `CounterStore` (only the event-log lines since the last scrape are read);
gauges from `mercli.status.collect_status`, the same numbers `mercli status` shows. A scrape
therefore costs the new events plus one look at the spool's folders, never the history.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from mercli.jobs import PRIORITIES
from mercli.metrics.counters import COUNTERS, MAX_NAMES, NAME, OTHER, EventCounts
from mercli.metrics.state import CounterStore
from mercli.spool import Spool
from mercli.status import PRIORITY_STATES, collect_status

WORKER_STATES = ("live", "dead", "stuck")


class SpoolCollector:
    """Yields every mercli metric family, reading new events and the spool on each collect."""

    def __init__(self, store: CounterStore) -> None:
        self.store = store

    @property
    def spool(self) -> Spool:
        return self.store.spool

    def collect(self) -> Iterator[Metric]:
        self.store.advance()
        yield from counter_families(self.store.counts)
        yield from gauge_families(collect_status(self.spool))


def registry_for(store: CounterStore) -> CollectorRegistry:
    """A registry with only our collector (no python_/process_ metrics of this exporter)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SpoolCollector(store))
    return registry


def exposition(store: CounterStore) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of the spool right now."""
    return bytes(generate_latest(registry_for(store)))


def counter_families(counts: EventCounts) -> Iterator[Metric]:
    """Every counter family, with its unlabelled series at 0 before anything happened."""
    for name, spec in COUNTERS.items():
        family = CounterMetricFamily(name, spec.help, labels=spec.labels)
        series = counts.values.get(name, {})
        if not series and not spec.labels:
            family.add_metric([], 0)
        for labels, value in sorted(series.items()):
            family.add_metric(list(labels), value)
        yield family


def gauge_families(document: dict[str, Any]) -> Iterator[Metric]:
    """Gauges from a `mercli status --json` document."""
    yield from _state_gauges(document["states"])
    jobs = GaugeMetricFamily(
        "mercli_spool_jobs",
        "Jobs in outgoing/ (the backlog) and error/ per priority.",
        labels=("state", "priority"),
    )
    for state in PRIORITY_STATES:
        for priority in PRIORITIES:
            jobs.add_metric([state, priority], document["priorities"][state][priority])
    yield jobs
    yield _backlog(document["targets"])
    workers = GaugeMetricFamily(
        "mercli_workers",
        "Worker processes by lease: live, dead (claims awaiting recovery), stuck.",
        labels=("state",),
    )
    for state in WORKER_STATES:
        workers.add_metric([state], document["workers"].get(state, 0))
    yield workers
    yield GaugeMetricFamily(
        "mercli_running_modules",
        "Processing modules running right now.",
        value=len(document.get("running", [])),
    )


def _state_gauges(states: dict[str, dict[str, Any]]) -> Iterable[Metric]:
    families = {
        "items": ("mercli_spool_items", "Items per spool state (series batches, jobs)."),
        "instances": ("mercli_spool_instances", "DICOM instances per spool state."),
        "bytes": ("mercli_spool_bytes", "Bytes of files per spool state."),
        "claimed": ("mercli_spool_claimed_items", "Items being worked on right now, per state."),
        "oldest_age_s": (
            "mercli_spool_oldest_item_age_seconds",
            "Age of the oldest item in each state (since it entered it); 0 when empty.",
        ),
    }
    for key, (name, text) in families.items():
        family = GaugeMetricFamily(name, text, labels=("state",))
        for state, counts in states.items():
            family.add_metric([state], counts[key] or 0)
        yield family


def _backlog(targets: dict[str, dict[str, Any]]) -> Metric:
    """Outgoing jobs per target and priority, target names bounded like the counters'."""
    merged: dict[str, dict[str, int]] = {}
    for name, backlog in sorted(targets.items()):
        label = name if NAME.fullmatch(name) and len(merged) < MAX_NAMES else OTHER
        slot = merged.setdefault(label, dict.fromkeys(PRIORITIES, 0))
        for priority, jobs in backlog["priorities"].items():
            if priority in slot:
                slot[priority] += jobs
    family = GaugeMetricFamily(
        "mercli_backlog_jobs",
        "Jobs waiting in outgoing/ per target and priority.",
        labels=("target", "priority"),
    )
    for target, counts in sorted(merged.items()):
        for priority, jobs in counts.items():
            family.add_metric([target, priority], jobs)
    return family
