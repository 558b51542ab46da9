"""De-identifying dispatch: `mercli dispatch --once` of a 300-instance CT job to a folder
target with `deidentify = "basic"` vs the same job to a plain folder target (issue 20).

One routing of the series makes one job per target (template); each run copies one job (hard
links) into a fresh spool and times `mercli dispatch --once --workers 1` from the process's
start to its exit: the folder target fsyncs every file before the job is moved to success/,
and a de-identifying target first writes its private edited copy (read, de-identify, write,
new sidecar: `mercli.dispatch.edits`) into the worker's scratch. Rows are medians of RUNS
runs, the subjects interleaved and their order alternated; target >= 0.5x plain. A third
row, for comparison only: a target with `transfer_syntax = "jpeg-ls-lossless"`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.datasets import DataSet, ct_series
from benchmarks.report import Row, with_ratios
from benchmarks.scratch import set_aside
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import INSTANCE_SUFFIX, JOB_FILE, OUTGOING, SUCCESS, Spool, Worker
from tests.test_route import receive_file

RUNS = 5
PLAIN, DEID, JPEG_LS = "plain", "deid", "jpegls"
SUBJECTS = {
    PLAIN: "folder target",
    DEID: 'folder, deidentify = "basic"',
    JPEG_LS: 'folder, transfer_syntax = "jpeg-ls-lossless"',
}
TARGETS = {
    PLAIN: "",
    DEID: 'deidentify = "basic"\npseudonym_secret_file = "secret"\n',
    JPEG_LS: 'transfer_syntax = "jpeg-ls-lossless"\n',
}


def _templates(scratch: Path, data: DataSet, subjects: list[str]) -> dict[str, Path]:
    """One routing of the data set to every subject's target: its job folder, by subject."""
    secret = scratch / "secret"
    secret.write_text(secrets.token_hex(16))  # 32 bytes
    secret.chmod(0o600)
    rules = scratch / "rules.toml"
    text = "".join(
        f'[targets.{name}]\ntype = "folder"\npath = "out-{name}"\n{TARGETS[name]}\n'
        for name in subjects
    )
    rules.write_text(text + f'[[rules]]\nname = "ct"\ntargets = {json.dumps(subjects)}\n')
    spool = Spool.open(scratch / "template")
    with Worker(spool, "receive") as worker:
        for path in data.files:
            receive_file(worker, path)
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    jobs = {}
    for job in spool.items(OUTGOING):
        record = json.loads((job.path / JOB_FILE).read_text())
        jobs[record["target"]["name"]] = job.path
    return jobs


def measure(scratch: Path, job: Path, subject: str, count: int) -> float:
    """Instances per second of one `mercli dispatch --once` of `job` to its target."""
    root = scratch / "spool-run"
    set_aside(root)
    out = scratch / f"out-{subject}"
    set_aside(out)
    out.mkdir()
    spool = Spool.open(root)
    shutil.copytree(job, spool.state_dir(OUTGOING) / job.name, copy_function=os.link)
    os.sync()
    command = [sys.executable, "-m", "mercli", "dispatch", "--once", "-q", "--workers", "1"]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, "--spool", str(root)], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0 or len(spool.items(SUCCESS)) != 1:
        raise RuntimeError(f"{subject}: dispatch failed: {result.stderr[-400:]}")
    delivered = list(out.glob(f"*/*{INSTANCE_SUFFIX}"))
    if len(delivered) != count:
        raise RuntimeError(f"{subject}: {len(delivered)} of {count} instances delivered")
    return count / seconds


def run() -> list[Row]:
    subjects = [PLAIN, DEID, JPEG_LS]
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        data = ct_series(scratch, 300)
        jobs = _templates(scratch, data, subjects)
        rates: dict[str, list[float]] = {subject: [] for subject in subjects}
        for run in range(RUNS):
            for subject in subjects if run % 2 == 0 else subjects[::-1]:
                rates[subject].append(measure(scratch, jobs[subject], subject, len(data.files)))
    rows = [
        Row(
            "deid",
            data.label,
            SUBJECTS[subject],
            statistics.median(runs),
            target="ratio" if subject == JPEG_LS else None,
            note="runs " + "/".join(f"{r:.0f}" for r in sorted(runs)),
        )
        for subject, runs in rates.items()
    ]
    return with_ratios(rows, SUBJECTS[PLAIN], target=">= 0.5x")
