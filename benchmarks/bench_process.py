"""Processing overhead: what `mercli process` adds around a module, per job.

A 300-instance CT series is routed once into a processing job (template); each run copies it
(hard links) into a fresh spool and runs `ProcessService(...).run(once=True)` in this process
with a no-op module (a Python script that copies in/ to out/). The row is the time from the
claim to the published output (from the start of `Processor.attempt`, right after the claim,
to the end of `Processor._publish`: in/ and task.json prepared, the module run, every output
file checked, one transaction to outgoing/ and success/; not the scratch clean-up after it)
minus the module's own run time (`run_module`, from its start to its exit), median of RUNS
(target: < 0.3 s or < 10 % of the module's time).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.datasets import DataSet, ct_series
from benchmarks.report import Row
from benchmarks.scratch import set_aside
from mercli.process import runner
from mercli.process.service import Processor, ProcessService
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import OUTGOING, PROCESSING, SUCCESS, Spool, Worker
from tests.test_route import receive_file

RUNS = 3
NOOP_MODULE = """\
import os, shutil
from pathlib import Path
out_dir = Path(os.environ["MERCURE_OUT_DIR"])
for path in Path(os.environ["MERCURE_IN_DIR"]).glob("*.dcm"):
    shutil.copyfile(path, out_dir / path.name)
"""
RULES = """
[targets.archive]
type = "folder"
path = "archive"

[modules.noop]
command = [{python}, {script}]
timeout = "10m"

[[rules]]
name = "ct"
process = ["noop"]
targets = ["archive"]
"""


def _template(scratch: Path, data: DataSet) -> Path:
    """One routed processing job holding the data set."""
    script = scratch / "noop.py"
    script.write_text(NOOP_MODULE)
    rules = scratch / "rules.toml"
    rules.write_text(
        RULES.format(python=json.dumps(sys.executable), script=json.dumps(str(script)))
    )
    spool = Spool.open(scratch / "template")
    with Worker(spool, "receive") as worker:
        for path in data.files:
            receive_file(worker, path)
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    (job,) = spool.items(PROCESSING)
    return job.path


def _fresh_spool(scratch: Path, template: Path) -> Path:
    root = scratch / "spool-run"
    set_aside(root)
    spool = Spool.open(root)
    shutil.copytree(template, spool.state_dir(PROCESSING) / template.name, copy_function=os.link)
    return root


def _wrapped(
    function: Callable[..., Any], times: list[float], ends: list[float] | None = None
) -> Callable[..., Any]:
    """`function`, appending its run time to `times` (or its start to `times`, its end to
    `ends`)."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if ends is None:
                times.append(time.perf_counter() - start)
            else:
                times.append(start)
                ends.append(time.perf_counter())

    return timed


def measure(scratch: Path, template: Path, count: int) -> tuple[float, float]:
    """(claim -> published output, the module's own run time) of one job, in seconds."""
    root = _fresh_spool(scratch, template)
    os.sync()
    claimed: list[float] = []
    published: list[float] = []
    modules: list[float] = []
    unused: list[float] = []
    attempt, publish, run_module = Processor.attempt, Processor._publish, runner.run_module
    Processor.attempt = _wrapped(attempt, claimed, unused)  # type: ignore[method-assign]
    Processor._publish = _wrapped(publish, unused, published)  # type: ignore[method-assign]
    runner.run_module = _wrapped(run_module, modules)
    try:
        summary = ProcessService(root, 1).run(once=True)
    finally:
        Processor.attempt = attempt  # type: ignore[method-assign]
        Processor._publish = publish  # type: ignore[method-assign]
        runner.run_module = run_module
    spool = Spool(root)
    (job,) = spool.items(OUTGOING)
    if summary.processed != 1 or len(spool.items(SUCCESS)) != 1:
        raise RuntimeError(f"processing failed: {summary}")
    if len(list(job.path.glob("*.dcm"))) != count:
        raise RuntimeError("the output job lacks instances")
    return published[0] - claimed[0], modules[0]


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        data = ct_series(scratch, 300)
        template = _template(scratch, data)
        runs = [measure(scratch, template, len(data.files)) for _ in range(RUNS)]
    overheads = sorted(total - module for total, module in runs)
    median = statistics.median(overheads)
    module = statistics.median(m for _, m in runs)
    total = statistics.median(t for t, _ in runs)
    note = (
        f"{median / module * 100:.0f} % of the module's {module:.2f} s; claim->published "
        f"{total:.2f} s; runs " + "/".join(f"{o:.3f}" for o in overheads) + " s"
    )
    return [
        Row(
            "process",
            data.label,
            "claim -> published, minus module",
            median,
            unit="s",
            target="< 0.3 s or < 10 %",
            note=note,
        )
    ]
