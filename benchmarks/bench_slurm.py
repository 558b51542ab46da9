"""What the Slurm runner adds per job over the local runner (SPEC §7.1; target < 2 s).

A one-node Slurm cluster (Debian's slurm-wlm, started by `tests.slurmkit` in a private folder
on free ports, as the tests start it) runs a no-op module (a Python script copying in/ to
out/) on a 10-instance CT series. Each run copies the routed processing job into a fresh spool
and runs `ProcessService(...).run(once=True)` in this process, the module once with
`runner = "local"`, once with `runner = "slurm"`, interleaved; a run's time is from the
process service's start to its end (submit, Slurm scheduling, the batch job, mercli noticing
the end, output checks, the publishing transaction). The row is the median of the Slurm runs
minus the median of the local ones. Slurm 22.05's controller starts batch jobs from a loop
that wakes once a second, so the figure is about half a second plus what mercli adds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.datasets import ct_series
from benchmarks.report import Row
from benchmarks.scratch import set_aside
from mercli.process.service import ProcessService
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import PROCESSING, SUCCESS, Spool, Worker
from tests.slurmkit import start_cluster
from tests.test_route import receive_file

RUNS = 5
INSTANCES = 10
NOOP_MODULE = """\
import os, shutil
from pathlib import Path
out_dir = Path(os.environ["MERCURE_OUT_DIR"])
for path in Path(os.environ["MERCURE_IN_DIR"]).glob("*.dcm"):
    shutil.copyfile(path, out_dir / path.name)
"""
RULES = """
[runners.slurm]
poll_max = "2s"

[targets.archive]
type = "folder"
path = "archive"

[modules.noop]
command = [{python}, {script}]
runner = "{runner}"

[[rules]]
name = "ct"
process = ["noop"]
targets = ["archive"]
"""


def _template(scratch: Path, files: list[Path], runner: str) -> Path:
    """One routed processing job holding the series, for `runner`."""
    script = scratch / "noop.py"
    script.write_text(NOOP_MODULE)
    rules = scratch / f"rules-{runner}.toml"
    rules.write_text(
        RULES.format(
            python=json.dumps(sys.executable), script=json.dumps(str(script)), runner=runner
        )
    )
    spool = Spool.open(scratch / f"template-{runner}")
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    (job,) = spool.items(PROCESSING)
    return job.path


def measure(scratch: Path, template: Path) -> float:
    """Seconds for `mercli process --once` to run the job (in this process)."""
    root = scratch / "spool-run"
    set_aside(root)
    spool = Spool.open(root)
    shutil.copytree(template, spool.state_dir(PROCESSING) / template.name, copy_function=os.link)
    start = time.perf_counter()
    summary = ProcessService(root, 1).run(once=True)
    took = time.perf_counter() - start
    if summary.processed != 1 or len(spool.items(SUCCESS)) != 1:
        raise RuntimeError(f"processing failed: {summary}")
    return took


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        data = ct_series(scratch, INSTANCES)
        templates = {
            runner: _template(scratch, data.files, runner) for runner in ("local", "slurm")
        }
        with start_cluster(scratch / "slurm") as cluster:
            saved = os.environ.get("SLURM_CONF")
            os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
            try:
                times: dict[str, list[float]] = {"local": [], "slurm": []}
                for _ in range(RUNS):
                    for runner, template in templates.items():
                        times[runner].append(measure(scratch, template))
            finally:
                if saved is None:
                    os.environ.pop("SLURM_CONF", None)
                else:
                    os.environ["SLURM_CONF"] = saved
    local, slurm = statistics.median(times["local"]), statistics.median(times["slurm"])
    note = (
        f"per job, no-op module, {INSTANCES} CT; local {local:.2f} s, slurm {slurm:.2f} s "
        f"(runs " + "/".join(f"{t:.2f}" for t in times["slurm"]) + " s); one-node cluster"
    )
    return [
        Row(
            "process",
            f"{INSTANCES} CT, no-op module",
            "slurm runner overhead over local",
            slurm - local,
            unit="s",
            target="< 2 s",
            note=note,
        )
    ]
