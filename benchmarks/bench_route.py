"""Routing: decision + job creation throughput, and latency from release to jobs.

- Throughput: a spool of received series (real DICOM files and their sidecars) is routed in
  one process by rules with two targets; instances per second of wall and CPU time.
- Latency: `mercli receive` and `mercli route` run as services; storescu sends a series and
  returns once the association is released; the row is the time from then until every job
  of the series exists, minus `settle` (target: under 0.5 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.datasets import small_series
from benchmarks.report import Row
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import OUTGOING, Spool, Worker
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until

SETTLE = 1.0
RULES = f"""
[route]
settle = "{SETTLE}s"
series_timeout = "1h"

[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = 104
called_aet = "PACS"

[targets.archive]
type = "folder"
path = "archive"

[[rules]]
name = "ct"
when = 'Modality == "CT" and "LOCALIZER" not in ImageType'
targets = ["pacs", "archive"]
"""


def _receive(spool: Path, files: list[Path]) -> None:
    """Fill incoming/ the real way: storescu into mercli receive."""
    port = free_port()
    command = [sys.executable, "-m", "mercli", "receive", "-q", "--spool", str(spool)]
    receiver = subprocess.Popen([*command, "--port", str(port)], env=DCMTK_ENV)
    try:
        wait_until(lambda: port_open(port))
        subprocess.run(
            ["storescu", "-aec", "MERCLI", "127.0.0.1", str(port), *map(str, files)],
            env=DCMTK_ENV,
            check=True,
            capture_output=True,
        )
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)


def throughput(scratch: Path, rules: Path) -> list[Row]:
    data = small_series(scratch, 5000)
    spool_root = scratch / "spool-throughput"
    _receive(spool_root, data.files)
    spool = Spool.open(spool_root)
    summary = RouteSummary()
    wall, cpu = time.perf_counter(), time.process_time()
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in router.due(float("inf"))[0]:
            router.route(state, summary)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert summary.instances == len(data.files) and len(summary.jobs) == 2
    note = f"{summary.instances} instances, 2 targets, CPU {summary.instances / cpu:.0f}/s"
    return [
        Row(
            "route",
            data.label,
            "mercli route (decide + jobs)",
            summary.instances / wall,
            target=">= 5000 img/s",
            note=note,
        )
    ]


def latency(scratch: Path, rules: Path) -> list[Row]:
    data = small_series(scratch, 200)
    spool = scratch / "spool-latency"
    port = free_port()
    mercli = [sys.executable, "-m", "mercli"]
    receiver = subprocess.Popen(
        [*mercli, "receive", "-q", "--spool", str(spool), "--port", str(port)], env=DCMTK_ENV
    )
    router = subprocess.Popen(
        [*mercli, "route", "-q", "--spool", str(spool), "--rules", str(rules)]
    )
    delays = []
    try:
        wait_until(lambda: port_open(port))
        for _ in range(3):
            before = _job_count(spool)
            subprocess.run(
                ["storescu", "-aec", "MERCLI", "127.0.0.1", str(port), *map(str, data.files)],
                env=DCMTK_ENV,
                check=True,
                capture_output=True,
            )
            released = time.monotonic()
            wait_until(lambda b=before: _job_count(spool) >= b + 2, timeout=60, max_delay=0.005)
            delays.append(time.monotonic() - released - SETTLE)
    finally:
        for process in (router, receiver):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    delays.sort()
    note = "runs " + "/".join(f"{d * 1000:.0f}" for d in delays) + " ms"
    return [
        Row(
            "route",
            f"{len(data.files)}-instance series",
            "release -> jobs, minus settle",
            delays[1] * 1000,
            unit="ms",
            target="< 500 ms",
            note=note,
        )
    ]


def _job_count(spool: Path) -> int:
    folder = spool / OUTGOING
    return len(os.listdir(folder)) if folder.is_dir() else 0


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        rules = scratch / "rules.toml"
        rules.write_text(RULES)
        rows = throughput(scratch, rules)
        rows += latency(scratch, rules)
    return rows
