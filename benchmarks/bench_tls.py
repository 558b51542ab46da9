"""DICOM TLS vs plain, in the same run (target >= 0.7x plain on CT): `mercli dispatch --once`
of a 300-instance CT job to DCMTK `storescp` with and without `+tls`, and DCMTK `storescu`
(`+tla`: TLS without a client certificate) into `mercli receive` with and without
`--tls-cert/--tls-key` (as bench_receive: storescu's time to the last durable answer).

Each run starts a fresh storescp (`-ic`: no client certificate asked for) and a fresh spool
holding the job (hard links of a template, the target's port and TLS keys patched in);
timed from the start of `mercli dispatch --once` to its exit (every C-STORE status checked,
the job moved to success/). Certificates are made for the run (tests/certs.py, EC P-256).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_dispatch import _fresh_spool, _template, _timed
from benchmarks.datasets import DataSet, ct_series
from benchmarks.report import Row, with_ratios
from mercli.spool import JOB_FILE, OUTGOING, Spool
from tests.certs import Pki, make_pki
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until

RUNS = 3
PLAIN = "dispatch -> storescp (plain)"
TLS = "dispatch -> storescp +tls"
RECEIVE_PLAIN = "storescu -> receive (plain)"
RECEIVE_TLS = "storescu +tla -> receive --tls-cert"


def _patch_tls(root: Path, pki: Pki) -> None:
    (job,) = Spool(root).items(OUTGOING)
    record: dict[str, Any] = json.loads((job.path / JOB_FILE).read_text())
    record["target"] |= {"tls": True, "tls_ca": str(pki.ca), "host": "localhost"}
    (job.path / JOB_FILE).unlink()
    (job.path / JOB_FILE).write_text(json.dumps(record))


def measure(subject: str, data: DataSet, template: Path, scratch: Path, pki: Pki) -> float:
    out = scratch / "received"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir()
    port = free_port()
    command = ["storescp", "-od", str(out)]
    if subject == TLS:
        command += ["+tls", str(pki.server_key), str(pki.server_cert), "-ic"]
    os.sync()
    storescp = subprocess.Popen(
        [*command, str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: port_open(port))
        root = _fresh_spool(scratch, template, port)
        if subject == TLS:
            _patch_tls(root, pki)
        dispatch = [sys.executable, "-m", "mercli", "dispatch", "--once", "-q", "--workers", "1"]
        seconds = _timed([*dispatch, "--spool", str(root)])
    finally:
        storescp.send_signal(signal.SIGTERM)
        storescp.wait(timeout=30)
    received = len(os.listdir(out))
    if received < len(data.files):
        raise RuntimeError(f"{subject}: storescp got {received} of {len(data.files)}")
    return len(data.files) / seconds


def measure_receive(subject: str, data: DataSet, scratch: Path, pki: Pki) -> float:
    out = scratch / "receive-spool"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    port = free_port()
    command = [sys.executable, "-m", "mercli", "receive", "-q", "--spool", str(out)]
    sender = ["storescu", "-aec", "MERCLI"]
    if subject == RECEIVE_TLS:
        command += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
        sender += ["+tla", "+cf", str(pki.ca)]
    os.sync()
    receiver = subprocess.Popen(
        [*command, "--port", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), what="mercli receive")
        time.sleep(0.2)
        seconds = _timed([*sender, "localhost", str(port), *map(str, data.files)])
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=60)
    stored = len(list((out / "incoming").rglob("*.dcm")))
    if stored < len(data.files):
        raise RuntimeError(f"{subject}: stored {stored} of {len(data.files)}")
    return len(data.files) / seconds


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        scratch = Path(temp)
        pki = make_pki(scratch / "pki")
        data = ct_series(scratch, 300)
        template = _template(scratch, data)
        rates: dict[str, list[float]] = {PLAIN: [], TLS: [], RECEIVE_PLAIN: [], RECEIVE_TLS: []}
        for _ in range(RUNS):
            for subject in (PLAIN, TLS):
                rates[subject].append(measure(subject, data, template, scratch, pki))
            for subject in (RECEIVE_PLAIN, RECEIVE_TLS):
                rates[subject].append(measure_receive(subject, data, scratch, pki))
    rows = [
        Row(
            "tls",
            data.label + (" in" if subject.startswith("storescu") else " out"),
            subject,
            statistics.median(runs),
            note="runs " + "/".join(f"{r:.0f}" for r in sorted(runs)),
        )
        for subject, runs in rates.items()
    ]
    rows = with_ratios(rows, PLAIN, target=">= 0.7x")
    return with_ratios(rows, RECEIVE_PLAIN, target=">= 0.7x")
