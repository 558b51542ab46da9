"""Receive throughput: mercli receive vs pynetdicom's storescp app vs DCMTK storescp -od.

Each receiver is started on a free port writing into a fresh folder; DCMTK storescu sends the
data set in one association (and then as 4 concurrent senders). storescu returns after the
last C-STORE response, and mercli answers only once instance and sidecar are durable, so the
time storescu takes is the time to durable receipt. Peak RSS (VmHWM, summed over processes)
is read from /proc just before each receiver is stopped.
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

from benchmarks.datasets import DataSet, ct_series, huge_instance, small_series
from benchmarks.report import Row, with_ratios
from benchmarks.scratch import set_aside
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until

PEER = "pynetdicom storescp app"
RUNS = 3
HUGE_BYTES = 1 << 30
Launcher = Callable[[Path, int], list[str]]


def _mercli(out: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mercli",
        "receive",
        "-q",
        "--spool",
        str(out),
        "--port",
        str(port),
    ]


def _mercli_no_journal(out: Path, port: int) -> list[str]:
    return [*_mercli(out, port), "--no-journal"]


def _pynetdicom_app(out: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pynetdicom",
        "storescp",
        "-q",
        "-od",
        str(out),
        "-pdu",
        "0",
        str(port),
    ]


def _dcmtk_storescp(out: Path, port: int) -> list[str]:
    return ["storescp", "-od", str(out), str(port)]


SUBJECTS: dict[str, Launcher] = {
    "mercli receive (durable+sidecar)": _mercli,
    "mercli receive --no-journal": _mercli_no_journal,
    PEER: _pynetdicom_app,
    "DCMTK storescp -od": _dcmtk_storescp,
}


def _rss_mb(pid: int) -> float:
    """Peak RSS of a process and its children, in MB."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def _count_files(folder: Path) -> int:
    """Received instances: every file, except a spool's sidecars and bookkeeping."""
    bookkeeping = {"tmp", "hints", "leases", "claims", "events"}
    return sum(
        1
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".tags" and p.relative_to(folder).parts[0] not in bookkeeping
    )


def measure(launcher: Launcher, data: DataSet, senders: int, scratch: Path) -> tuple[float, float]:
    """(instances per second, peak RSS MB) for one receiver, one data set, N senders."""
    out = scratch / "out"
    set_aside(out)
    out.mkdir()
    port = free_port()
    os.sync()  # start clean: no subject pays for the previous one's dirty pages
    receiver = subprocess.Popen(
        launcher(out, port), env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: port_open(port), what="receiver")
        time.sleep(0.2)  # let every listening process come up; not part of any timing
        groups = [data.files[n::senders] for n in range(senders)]
        start = time.perf_counter()
        clients = [
            subprocess.Popen(
                ["storescu", "-aec", "MERCLI", "127.0.0.1", str(port), *map(str, group)],
                env=DCMTK_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for group in groups
        ]
        codes = [client.wait() for client in clients]
        elapsed = time.perf_counter() - start
        rss = _rss_mb(receiver.pid)
    finally:
        receiver.send_signal(signal.SIGTERM)
        try:
            receiver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            receiver.kill()
    if any(codes):
        raise RuntimeError(f"storescu failed ({codes}) against {launcher.__name__}")
    stored = _count_files(out)
    if stored < len(data.files):
        raise RuntimeError(f"{launcher.__name__} stored {stored} of {len(data.files)}")
    return len(data.files) / elapsed, rss


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        for data in (small_series(scratch, 2000), ct_series(scratch, 300)):
            for senders in (1, 4):
                rows += _compare(data, senders, scratch)
        huge = huge_instance(scratch, HUGE_BYTES)
        rate, rss = measure(_mercli, huge, 1, scratch)
        rows.append(
            Row(
                "receive",
                huge.label,
                "mercli receive",
                rate * HUGE_BYTES / 1e6,
                unit="MB/s",
                note=f"peak RSS {rss:.0f} MB (target < 200 MB)",
            )
        )
    return with_ratios(rows, PEER, target=">= 2.0x (1 sender)")


def _compare(data: DataSet, senders: int, scratch: Path) -> list[Row]:
    """Median of RUNS interleaved runs per subject: this VM's disk is noisy."""
    case = f"{data.label}, {senders} sender{'s' if senders > 1 else ''}"
    results: dict[str, list[tuple[float, float]]] = {subject: [] for subject in SUBJECTS}
    for _ in range(RUNS):
        for subject, launcher in SUBJECTS.items():
            results[subject].append(measure(launcher, data, senders, scratch))
    rows = []
    for subject, runs in results.items():
        rates = sorted(rate for rate, _ in runs)
        rss = max(rss for _, rss in runs)
        spread = f"runs {'/'.join(f'{r:.0f}' for r in rates)}"
        rows.append(
            Row(
                "receive",
                case,
                subject,
                statistics.median(rates),
                note=f"{spread}, peak RSS {rss:.0f} MB",
            )
        )
    return rows
