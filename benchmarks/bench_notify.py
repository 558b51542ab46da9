"""What notifications cost routing (target: <= 5 %).

250 series (50 studies x 5 series x 10 MR instances; the worst case: the cost is per
series), and 50 series of 100 instances, are received once (storescu into mercli receive);
each run routes a fresh copy of that spool in this process (`RouteService.run_once`, two
folder targets) with rules that notify nobody and with the same rules plus a webhook channel
that the rule asks for `routed`, `delivered` and `failed` (the usual set; for the series of
10 also with `received`, two notifications a series): per series one
notification made and appended to the router's notification log inside the routing
transaction (by the thread that writes and `fdatasync`s the line before the commit rename,
while the routing thread's own fsyncs run), and the subscriptions in both jobs' job.json.
Collecting the log into notify/ items is `mercli notify`'s work, done after the timing (and
checked: one item a series). The rows are instances per second, median of RUNS
interleaved runs (who goes first alternates); the ratio is of those medians. The note also
gives the median of the RUNS paired ratios (each run of one subject against the other's run
next to it): on this VM a run's speed drifts with how many inodes were freed nearby in the
last minutes (ext4 without a journal skips them when creating files, README "Benchmarks"),
which the pairs cancel and the medians of each subject do not.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.bench_studies import (
    PER_SERIES,
    SERIES_PER_STUDY,
    STUDIES_HELD,
    _copy_spool,
    _receive,
)
from benchmarks.datasets import mr_studies
from benchmarks.report import Row, with_ratios
from benchmarks.scratch import set_aside
from mercli.notify.collect import collect
from mercli.route.service import RouteService
from mercli.spool import NOTIFY, Spool, Worker

RUNS = 6  # the 10-instance case moves by +-5 % with the disk's state between runs; 6: each
# subject goes first equally often whether 2 or 3 take turns
RULES = """
[targets.a]
type = "folder"
path = "a"

[targets.b]
type = "folder"
path = "b"
{channel}
[[rules]]
name = "all"
targets = ["a", "b"]
{notify}
"""
CHANNEL = """
[notify.hook]
type = "webhook"
url = "https://hooks.example.org/mercli"
body = '{"text": "{{ event }}: {{ rule }} {{ modality }} {{ series_description }} -> {{ target }}"}'
"""
NOTIFY_ON = {  # subject -> the rule's notify_on, and how many notifications route makes a series
    "route, 1 notification a series": ('["routed", "delivered", "failed"]', 1),
    "route, 2 notifications a series": ('["received", "routed", "delivered", "failed"]', 2),
}
QUIET, TELLING, BOTH = "route, no notifications", *NOTIFY_ON


def _route(scratch: Path, received: Path, subject: str, run: int, count: int, series: int) -> float:
    root = scratch / f"spool-{run}-{subject[:8].strip(',')}"
    _copy_spool(received, root)
    os.sync()
    rules = scratch / "rules.toml"
    events, each = NOTIFY_ON.get(subject, ("", 0))
    notify = f'notify = ["hook"]\nnotify_on = {events}\n' if each else ""
    rules.write_text(RULES.format(channel=CHANNEL if each else "", notify=notify))
    wall = time.perf_counter()
    summary = RouteService(root, rules).run_once(everything=True)
    wall = time.perf_counter() - wall
    spool = Spool(root)
    with Worker(spool, "notify") as worker:  # outside the timing: `mercli notify`'s work
        collect(spool, worker)
    made = len(spool.items(NOTIFY))
    assert summary.instances == count and made == series * each, made
    set_aside(root)
    return count / wall


def _case(scratch: Path, studies: int, per_series: int, subjects: tuple[str, ...]) -> list[Row]:
    data = mr_studies(scratch, studies, SERIES_PER_STUDY, per_series)
    received = scratch / f"spool-received-{per_series}"
    _receive(received, data.files)
    series = studies * SERIES_PER_STUDY
    rates: dict[str, list[float]] = {subject: [] for subject in subjects}
    for run in range(RUNS):
        turn = run % len(subjects)  # who goes first rotates
        for subject in subjects[turn:] + subjects[:turn]:
            rates[subject].append(_route(scratch, received, subject, run, len(data.files), series))
    rows = []
    for subject, runs in rates.items():
        note = "runs " + "/".join(f"{r:.0f}" for r in sorted(runs))
        if subject != QUIET:
            pairs = zip(runs, rates[QUIET], strict=True)
            note += f"; paired ratio {statistics.median(t / q for t, q in pairs):.3f}x"
        rows.append(Row("notify", data.label, subject, statistics.median(runs), note=note))
    return with_ratios(rows, QUIET, target=">= 0.95x")


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        # 250 series of 10: the worst case (the cost is per series), also with `received`
        rows = _case(scratch, STUDIES_HELD, PER_SERIES, (QUIET, TELLING, BOTH))
        rows += _case(scratch, 10, 100, (QUIET, TELLING))  # 50 series of 100
    return rows
