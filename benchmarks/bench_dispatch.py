"""Dispatch throughput: `mercli dispatch --once` of a prepared job vs DCMTK `storescu +sd`.

Both send the same instances to the same kind of receiver, DCMTK `storescp -od` on a free
port, started fresh for each run; each row is the median of RUNS interleaved runs, timed from
the start of the sending process to its exit (mercli checks every C-STORE status and moves
the job to success/ before it exits).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.datasets import DataSet, ct_series, small_series
from benchmarks.report import Row, with_ratios
from benchmarks.scratch import set_aside
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import JOB_FILE, OUTGOING, Spool, Worker
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until
from tests.test_route import receive_file

RUNS = 3
BASELINE = "DCMTK storescu +sd"
RULES = """
[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = 104
called_aet = "STORESCP"

[[rules]]
name = "all"
targets = ["pacs"]
"""


def _template(scratch: Path, data: DataSet) -> Path:
    """One routed job holding the data set; copied (hard links) into a fresh spool per run."""
    spool = Spool.open(scratch / f"template-{len(data.files)}")
    (scratch / "rules.toml").write_text(RULES)
    with Worker(spool, "receive") as worker:
        for path in data.files:
            receive_file(worker, path)
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(scratch / "rules.toml"))
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    (job,) = spool.items(OUTGOING)
    return job.path


def _fresh_spool(scratch: Path, template: Path, port: int) -> Path:
    root = scratch / "spool-run"
    set_aside(root)
    spool = Spool.open(root)
    job = spool.state_dir(OUTGOING) / template.name
    shutil.copytree(template, job, copy_function=os.link)
    record = json.loads((template / JOB_FILE).read_text())
    record["target"]["port"] = port
    (job / JOB_FILE).unlink()
    (job / JOB_FILE).write_text(json.dumps(record))
    return root


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=DCMTK_ENV, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed: {result.stderr[-400:]}")
    return elapsed


def measure(subject: str, data: DataSet, template: Path, scratch: Path) -> float:
    out = scratch / "received"
    set_aside(out)
    out.mkdir()
    port = free_port()
    os.sync()
    storescp = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port))
        if subject == BASELINE:
            folder = str(data.files[0].parent)
            seconds = _timed(
                ["storescu", "-aec", "STORESCP", "+sd", "127.0.0.1", str(port), folder]
            )
        else:
            root = _fresh_spool(scratch, template, port)
            command = [sys.executable, "-m", "mercli", "dispatch", "--once", "-q"]
            seconds = _timed([*command, "--workers", "1", "--spool", str(root)])
    finally:
        storescp.send_signal(signal.SIGTERM)
        storescp.wait(timeout=30)
    received = len(os.listdir(out))
    if received < len(data.files):
        raise RuntimeError(f"{subject}: storescp got {received} of {len(data.files)}")
    return len(data.files) / seconds


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        cases = [(small_series(scratch, 2000), ">= 0.5x"), (ct_series(scratch, 300), ">= 0.8x")]
        for data, target in cases:
            template = _template(scratch, data)
            rates: dict[str, list[float]] = {"mercli dispatch --once": [], BASELINE: []}
            for _ in range(RUNS):
                for subject in rates:
                    rates[subject].append(measure(subject, data, template, scratch))
            case_rows = [
                Row(
                    "dispatch",
                    data.label,
                    subject,
                    statistics.median(runs),
                    target=None,
                    note="runs " + "/".join(f"{r:.0f}" for r in sorted(runs)),
                )
                for subject, runs in rates.items()
            ]
            rows += with_ratios(case_rows, BASELINE, target=target)
    return rows
