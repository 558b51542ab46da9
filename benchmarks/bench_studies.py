"""Study rules (SPEC §4.1): completion latency, and routing with many studies held at once.

- Latency: `mercli receive` and `mercli route` run as services, with a study rule that requires
  two of the study's series (`study_settle` and `settle` 1 s). storescu sends the three series
  of a study in three associations, one after the other; the row is the time from the exit of
  the last storescu until the study job exists in outgoing/, minus `study_settle` (target: under
  0.5 s, i.e. the study is complete `study_settle` + 0.5 s after its sender is done).
- Throughput: 50 studies of 5 series of 10 instances, received for real into incoming/ once.
  Each of 3 runs (rows: medians) copies that spool twice (then os.sync(), so the copies'
  writeback is charged to neither pass), routes one copy by a study rule without `require`
  (it completes only by `study_timeout`, 1 h) so that all 250 series are held in studies/,
  and the other by the same rule as a series rule (two series jobs per series: the reference,
  ratio column), alternating which goes first; both are `route --once --all` in process
  (`RouteService.run_once`), in instances/s. Then one completion pass as the service makes it
  (scan studies/, find the due ones, complete each; the pass's clock is set past
  `study_timeout` instead of waiting, its held.json cache cold) turns the 50 held studies
  into 100 study jobs: studies/s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.datasets import mr_studies, mr_study
from benchmarks.report import Row, with_ratios
from mercli.route.complete import Completer, due_studies
from mercli.route.service import RouteService
from mercli.route.studies import HeldCache, scan_studies
from mercli.rules.config import load_rules
from mercli.spool import INCOMING, JOB_FILE, OUTGOING, STUDIES, Spool, Worker

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK leaves Nagle on otherwise
STUDY_SETTLE = 1.0
STUDIES_HELD, SERIES_PER_STUDY, PER_SERIES = 50, 5, 10
SERIES_HELD = STUDIES_HELD * SERIES_PER_STUDY
TARGETS = """
[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = 104
called_aet = "PACS"

[targets.archive]
type = "folder"
path = "archive"
"""
LATENCY_RULES = f"""
[route]
settle = "1s"
series_timeout = "1h"
study_settle = "{STUDY_SETTLE}s"
study_timeout = "1h"
{TARGETS}
[[rules]]
name = "brain"
trigger = "study"
when = 'Modality == "MR"'
require = ['"T1" in SeriesDescription', '"FLAIR" in SeriesDescription']
targets = ["pacs"]
"""
HOLD_RULES = f"""
[route]
settle = "1s"
series_timeout = "1h"
study_timeout = "1h"
{TARGETS}
[[rules]]
name = "mr"
{{trigger}}
when = 'Modality == "MR"'
targets = ["pacs", "archive"]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _poll(condition: Callable[[], bool], timeout: float, interval: float = 0.005) -> None:
    """Poll `condition` every `interval` seconds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {condition}")
        time.sleep(interval)


def _storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aec", "MERCLI", "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV,
        check=True,
        capture_output=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def _job_count(spool: Path) -> int:
    folder = spool / OUTGOING
    return len(os.listdir(folder)) if folder.is_dir() else 0


def latency(scratch: Path) -> list[Row]:
    rules = scratch / "latency.toml"
    rules.write_text(LATENCY_RULES)
    spool, port = scratch / "spool-latency", _free_port()
    mercli = [sys.executable, "-m", "mercli"]
    receiver = subprocess.Popen(
        [*mercli, "receive", "-q", "--spool", str(spool), "--port", str(port)], env=DCMTK_ENV
    )
    router = subprocess.Popen(
        [*mercli, "route", "-q", "--spool", str(spool), "--rules", str(rules)]
    )
    series, delays = ["T1", "DWI", "FLAIR"], []
    try:
        _poll(lambda: _port_open(port), timeout=20, interval=0.05)
        for run in range(3):
            study = mr_study(scratch / "latency", f"run{run}", series, 20)
            before = _job_count(spool)
            for files in study:  # one association each; the last required series last
                _storescu(port, files)
            ended = time.monotonic()
            _poll(lambda b=before: _job_count(spool) > b, timeout=30)
            delays.append(time.monotonic() - ended - STUDY_SETTLE)
            assert _job_count(spool) == before + 1, "one study job per study and target"
    finally:
        for process in (router, receiver):
            _stop(process)
    for job in Spool.open(spool).items(OUTGOING):  # each: the 3 series, 60 instances
        record = json.loads((job.path / JOB_FILE).read_text())
        assert record["study"] and len(record["series"]) == 3 and record["instances"] == 60
    delays.sort()
    note = "runs " + "/".join(f"{d * 1000:.0f}" for d in delays) + " ms"
    return [
        Row(
            "studies",
            "3 series, 3 assocs",
            "last assoc -> study job - settle",
            delays[1] * 1000,
            unit="ms",
            target="< 500 ms",
            note=note + f" (study_settle {STUDY_SETTLE:.0f} s)",
        )
    ]


def _receive(spool: Path, files: list[Path]) -> None:
    """Fill incoming/ the real way: storescu into mercli receive."""
    port = _free_port()
    command = [sys.executable, "-m", "mercli", "receive", "-q", "--spool", str(spool)]
    receiver = subprocess.Popen([*command, "--port", str(port)], env=DCMTK_ENV)
    try:
        _poll(lambda: _port_open(port), timeout=20, interval=0.05)
        _storescu(port, files)
    finally:
        _stop(receiver)


def _copy_spool(source: Path, destination: Path) -> None:
    """A second spool with the same received series (incoming/ and the receive hints)."""
    spool = Spool.open(destination)
    for folder in (spool.state_dir(INCOMING), spool.hints):
        shutil.copytree(source / folder.name, folder, dirs_exist_ok=True)


def _hold_and_complete(scratch: Path, received: Path, count: int, run: int) -> list[float]:
    """One run on fresh copies of the received spool: series-rule routing, hold, completion;
    returns the three rates and, last, the CPU rates (same order)."""
    rates: dict[str, float] = {}
    cpu_rates: dict[str, float] = {}
    kinds = [("series", ""), ("held", 'trigger = "study"')]
    for kind, _ in kinds:
        _copy_spool(received, scratch / f"spool-{kind}-{run}")
    os.sync()  # the copies' writeback is not charged to whichever pass fsyncs first
    for kind, trigger in kinds if run % 2 == 0 else kinds[::-1]:  # alternate who goes first
        root = scratch / f"spool-{kind}-{run}"
        rules = scratch / f"{kind}.toml"
        rules.write_text(HOLD_RULES.format(trigger=trigger))
        service = RouteService(root, rules)
        wall, cpu = time.perf_counter(), time.process_time()
        summary = service.run_once(everything=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        made = summary.held if trigger else summary.jobs
        assert summary.instances == count and len(made) == (1 if trigger else 2) * SERIES_HELD
        rates[kind], cpu_rates[kind] = count / wall, count / cpu
    root, rules = scratch / f"spool-held-{run}", scratch / "held.toml"
    spool = Spool.open(root)
    ruleset = load_rules(rules)
    assert len(os.listdir(spool.state_dir(STUDIES))) == STUDIES_HELD
    later = time.time() + ruleset.settings.study_timeout + 1  # the pass's clock, not a wait
    jobs: list[str] = []
    wall, cpu = time.perf_counter(), time.process_time()
    cache = HeldCache()  # cold: every held.json read once, as a freshly started router does
    with Worker(spool, "route") as worker:
        completer = Completer(spool, worker, ruleset, cache)
        for study in due_studies(scan_studies(spool, cache), ruleset, later)[0]:
            jobs += completer.complete(study.name, later).jobs
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(jobs) == 2 * STUDIES_HELD and not os.listdir(spool.state_dir(STUDIES)), jobs
    rates["complete"], cpu_rates["complete"] = STUDIES_HELD / wall, STUDIES_HELD / cpu
    order = ("series", "held", "complete")
    return [rates[k] for k in order] + [cpu_rates[k] for k in order]


def throughput(scratch: Path) -> list[Row]:
    data = mr_studies(scratch, STUDIES_HELD, SERIES_PER_STUDY, PER_SERIES)
    count, received = len(data.files), scratch / "spool-received"
    _receive(received, data.files)
    runs = [_hold_and_complete(scratch, received, count, run) for run in range(3)]
    median = [statistics.median(values) for values in zip(*runs, strict=True)]
    series, held, complete = (sorted(run[n] for run in runs) for n in range(3))

    def spread(values: list[float]) -> str:
        return "runs " + "/".join(_number(v) for v in values)

    rows = [
        Row(
            "studies",
            data.label,
            "series rule: route --once --all",
            median[0],
            note=f"{SERIES_HELD} series -> {2 * SERIES_HELD} jobs, {spread(series)},"
            f" CPU {median[3]:.0f}/s",
        ),
        Row(
            "studies",
            data.label,
            "study rule: hold, --once --all",
            median[1],
            target=">= 0.8x",
            note=f"{SERIES_HELD} series held, {spread(held)}, CPU {median[4]:.0f}/s",
        ),
    ]
    rows = with_ratios(rows, "series rule: route --once --all")
    rows.append(
        Row(
            "studies",
            data.label,
            "complete 50 studies, one pass",
            median[2],
            unit="st/s",
            target=">= 25 st/s",
            note=f"{2 * STUDIES_HELD} study jobs, {median[2] * count / STUDIES_HELD:.0f} img/s,"
            f" {spread(complete)}, CPU {median[5]:.0f}/s",
        )
    )
    return rows


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        rows = latency(scratch)
        rows += throughput(scratch)
    return rows
