"""End to end: a 300-slice CT series through `mercli run` to storescp, vs direct, vs Orthanc.

- mercli: storescu -> `mercli run` (receive, route with settle = 1 s, dispatch) -> storescp,
  timed from storescu's start until the last instance is in storescp's folder, once with each
  receive engine: the default one makes every instance durable (data, sidecar and folder
  fsync'ed) before it answers the C-STORE; the dcmtk one is storescp, which answers first;
- direct: storescu -> storescp, the same series, until storescu exits;
- Orthanc: storescu -> Orthanc, until storescu exits (Orthanc would then wait 60 s of "stable
  age" before auto-routing anything; mercure waits a 60 s series timeout).
Target: mercli <= 2.5 x direct + settle. Each row is the median of RUNS runs.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.datasets import DataSet, ct_series
from benchmarks.report import Row
from benchmarks.scratch import set_aside
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until
from tests.orthanckit import orthanc

RUNS = 3
SETTLE = 1.0
ENGINES = {"pynetdicom": "(durable receipt)", "dcmtk": "--engine dcmtk"}
RULES = """
[route]
settle = "{settle}s"
series_timeout = "60s"

[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = {port}
called_aet = "STORESCP"

[[rules]]
name = "all"
targets = ["pacs"]
"""


def _storescu(port: int, data: DataSet, aec: str) -> None:
    subprocess.run(
        ["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, data.files)],
        env=DCMTK_ENV,
        check=True,
        capture_output=True,
    )


def _storescp(out: Path) -> tuple[subprocess.Popen[bytes], int]:
    set_aside(out)
    out.mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: port_open(port))
    return process, port


def direct(data: DataSet, scratch: Path) -> float:
    process, port = _storescp(scratch / "direct")
    try:
        start = time.perf_counter()
        _storescu(port, data, "STORESCP")
        return time.perf_counter() - start
    finally:
        process.terminate()
        process.wait()


def through_mercli(data: DataSet, scratch: Path, engine: str) -> float:
    out = scratch / "landed"
    target, target_port = _storescp(out)
    spool = scratch / "spool"
    set_aside(spool)
    rules = scratch / "rules.toml"
    rules.write_text(RULES.format(settle=SETTLE, port=target_port))
    port = free_port()
    command = [sys.executable, "-m", "mercli", "run", "-q", "--spool", str(spool)]
    command += ["--rules", str(rules), "--port", str(port), "--purge-every", "0"]
    command += ["--engine", engine]
    router = subprocess.Popen(command, env=DCMTK_ENV, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port))
        time.sleep(1.0)  # let route and dispatch come up; not part of the timing
        os.sync()
        start = time.perf_counter()
        _storescu(port, data, "MERCLI")
        count = len(data.files)
        wait_until(lambda: len(os.listdir(out)) >= count, timeout=120, max_delay=0.005)
        return time.perf_counter() - start
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(timeout=120)
        target.terminate()
        target.wait()


def into_orthanc(data: DataSet, scratch: Path) -> float:
    set_aside(scratch / "orthanc")
    with orthanc(scratch / "orthanc") as pacs:
        start = time.perf_counter()
        _storescu(pacs.dicom_port, data, pacs.aet)
        return time.perf_counter() - start


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        data = ct_series(scratch, 300)
        times: dict[str, list[float]] = {name: [] for name in ("direct", *ENGINES, "orthanc")}
        for _ in range(RUNS):
            times["direct"].append(direct(data, scratch))
            for engine in ENGINES:
                times[engine].append(through_mercli(data, scratch, engine))
            times["orthanc"].append(into_orthanc(data, scratch))
    median = {name: statistics.median(values) for name, values in times.items()}
    runs = {name: "runs " + "/".join(f"{v:.2f}" for v in sorted(vs)) for name, vs in times.items()}
    case = f"{data.label}, to last landed"
    return [
        *(
            Row(
                "e2e",
                case,
                f"storescu -> mercli run {ENGINES[engine]} -> storescp",
                median[engine],
                unit="s",
                ratio=(median[engine] - SETTLE) / median["direct"],
                baseline="direct (minus settle)",
                target="<= 2.5x + settle",
                note=f"settle {SETTLE:.0f} s; {runs[engine]}",
            )
            for engine in ENGINES
        ),
        Row(
            "e2e",
            case,
            "storescu -> storescp (direct)",
            median["direct"],
            unit="s",
            note=runs["direct"],
        ),
        Row(
            "e2e",
            case,
            "storescu -> Orthanc (stored; +60 s stable age to route)",
            median["orthanc"],
            unit="s",
            note=runs["orthanc"],
        ),
    ]
