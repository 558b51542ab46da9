"""The dcmtk receive engine vs plain `storescp -od` vs a mercure-shaped receiver, same run.

- `mercli receive --engine dcmtk` is timed from the first byte storescu sends until every
  sidecar exists in spool/incoming/ (storescp acknowledges before getdcmtags publishes).
- `storescp -od` only writes files: the ceiling for anything built on storescp.
- mercure receives with `storescp --fork --exec-on-reception`, one shell started per file; the
  command here is `true`, so this row is mercure's shape before any tag work.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_receive import _count_files
from benchmarks.datasets import DataSet, ct_series, small_series
from benchmarks.report import Row, with_ratios
from benchmarks.scratch import set_aside
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until

BASELINE = "DCMTK storescp -od"
RUNS = 3
Launcher = Callable[[Path, int], list[str]]


def _engine(out: Path, port: int) -> list[str]:
    command = [sys.executable, "-m", "mercli", "receive", "-q", "--engine", "dcmtk"]
    return [*command, "--spool", str(out), "--port", str(port)]


def _storescp(out: Path, port: int) -> list[str]:
    return ["storescp", "-od", str(out), str(port)]


def _mercure_shaped(out: Path, port: int) -> list[str]:
    return ["storescp", "--fork", "-od", str(out), "-xcr", "true #p/#f #a #c", str(port)]


SUBJECTS: dict[str, Launcher] = {
    "mercli receive --engine dcmtk": _engine,
    BASELINE: _storescp,
    "mercure-shaped (--fork + exec/file)": _mercure_shaped,
}


def _sidecars(spool: Path) -> int:
    incoming = spool / "incoming"
    if not incoming.is_dir():
        return 0
    return sum(
        name.endswith(".tags") for series in os.scandir(incoming) for name in os.listdir(series)
    )


def measure(launcher: Launcher, data: DataSet, scratch: Path) -> float:
    """Instances per second for one subject: storescu start until the last file (or sidecar)."""
    out = scratch / "out"
    set_aside(out)
    out.mkdir()
    port = free_port()
    os.sync()
    receiver = subprocess.Popen(
        launcher(out, port), env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: port_open(port), what="receiver")
        time.sleep(0.2)
        start = time.perf_counter()
        sent = subprocess.run(
            ["storescu", "-aec", "MERCLI", "127.0.0.1", str(port), *map(str, data.files)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if launcher is _engine:
            wait_until(lambda: _sidecars(out) >= len(data.files), timeout=120, what="sidecars")
        elapsed = time.perf_counter() - start
    finally:
        receiver.send_signal(signal.SIGTERM)
        try:
            receiver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            receiver.kill()
    if sent.returncode:
        raise RuntimeError(f"storescu failed against {launcher.__name__}: {sent.stderr[-300:]}")
    stored = _sidecars(out) if launcher is _engine else _count_files(out)
    if stored < len(data.files):
        raise RuntimeError(f"{launcher.__name__} stored {stored} of {len(data.files)}")
    return len(data.files) / elapsed


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        for data in (small_series(scratch, 2000), ct_series(scratch, 300)):
            rates: dict[str, list[float]] = {subject: [] for subject in SUBJECTS}
            for _ in range(RUNS):  # interleaved: this VM's disk is noisy
                for subject, launcher in SUBJECTS.items():
                    rates[subject].append(measure(launcher, data, scratch))
            for subject, runs in rates.items():
                note = "runs " + "/".join(f"{r:.0f}" for r in sorted(runs))
                rows.append(Row("dcmtk", data.label, subject, statistics.median(runs), note=note))
    return with_ratios(rows, BASELINE, target=">= 0.8x; ahead of mercure-shaped")
