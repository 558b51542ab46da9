"""STOW-RS vs C-STORE: `mercli dispatch --once` of the same job to the same Orthanc, both ways.

The same 300 CT instances go once to a `dicomweb` target (STOW-RS, the DICOMweb plugin,
batch 50) and once to a `dicom` target (our C-STORE SCU) of a fresh Orthanc per run, which
stores both the same way. Each row is the median of RUNS interleaved runs, timed from the
start of the dispatch process to its exit (every answer checked, job in success/); the
ratio is STOW-RS over C-STORE, so below 1 means HTTP costs more than DIMSE here.
"""

from __future__ import annotations

import json
import os
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
from mercli.spool import JOB_FILE, OUTGOING, Spool, Worker
from tests.netkit import DCMTK_ENV
from tests.orthanckit import Orthanc, orthanc
from tests.test_route import receive_file

RUNS = 3
COUNT = 300
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB = {"Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
STOW, CSTORE = "mercli STOW-RS (batch 50)", "mercli C-STORE"
RULES = {
    STOW: '[targets.pacs]\ntype = "dicomweb"\nurl = "http://127.0.0.1:1/dicom-web"\nbatch = 50\n',
    CSTORE: '[targets.pacs]\ntype = "dicom"\nhost = "127.0.0.1"\nport = 1\ncalled_aet = "ORTHANC"'
    + "\n",
}


def _template(scratch: Path, data: DataSet, subject: str) -> Path:
    """One routed job of the data set for the subject's target type."""
    folder = scratch / f"template-{list(RULES).index(subject)}"
    spool = Spool.open(folder / "spool")
    (folder / "rules.toml").write_text(
        RULES[subject] + '[[rules]]\nname = "all"\ntargets = ["pacs"]\n'
    )
    with Worker(spool, "receive") as worker:
        for path in data.files:
            receive_file(worker, path)
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(folder / "rules.toml"))
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
    (job,) = spool.items(OUTGOING)
    return job.path


def _fresh_spool(scratch: Path, template: Path, server: Orthanc) -> Path:
    """A spool holding a hard-linked copy of the template job, aimed at `server`."""
    root = scratch / "spool-run"
    set_aside(root)
    spool = Spool.open(root)
    job = spool.state_dir(OUTGOING) / template.name
    shutil.copytree(template, job, copy_function=os.link)
    record = json.loads((template / JOB_FILE).read_text())
    if record["target"]["type"] == "dicomweb":
        record["target"]["url"] = f"http://127.0.0.1:{server.http_port}/dicom-web"
    else:
        record["target"]["port"] = server.dicom_port
    (job / JOB_FILE).unlink()
    (job / JOB_FILE).write_text(json.dumps(record))
    return root


def measure(subject: str, data: DataSet, template: Path, scratch: Path) -> float:
    """Instances per second of one dispatch run into a fresh Orthanc."""
    set_aside(scratch / "orthanc")
    with orthanc(scratch / "orthanc", config=DICOMWEB) as server:
        root = _fresh_spool(scratch, template, server)
        os.sync()
        command = [sys.executable, "-m", "mercli", "dispatch", "--once", "-q", "--workers", "1"]
        start = time.perf_counter()
        result = subprocess.run(
            [*command, "--spool", str(root)], env=DCMTK_ENV, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{subject}: dispatch failed: {result.stderr[-400:]}")
        stored = server.instance_count()
    if stored != len(data.files):
        raise RuntimeError(f"{subject}: Orthanc has {stored} of {len(data.files)}")
    return len(data.files) / seconds


def run() -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        data = ct_series(scratch, COUNT)
        templates = {subject: _template(scratch, data, subject) for subject in RULES}
        rates: dict[str, list[float]] = {subject: [] for subject in RULES}
        for _ in range(RUNS):
            for subject, runs in rates.items():
                runs.append(measure(subject, data, templates[subject], scratch))
        rows = [
            Row(
                "dicomweb",
                data.label,
                subject,
                statistics.median(runs),
                note="runs " + "/".join(f"{r:.0f}" for r in sorted(runs)),
            )
            for subject, runs in rates.items()
        ]
    return with_ratios(rows, CSTORE)


if __name__ == "__main__":
    from benchmarks.report import print_table

    print_table(run())
