"""Throughput of `deidentify` on CT-like instances (read once; timed: copy + de-identify).

.venv/bin/python tools/bench_deid.py [count]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from benchmarks.datasets import ct_series
from mercli.deid import Profile, deidentify


def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        files = ct_series(Path(scratch), count).files
        datasets = [pydicom.dcmread(f) for f in files]
    profile = Profile(options=("retain-longitudinal-modified-dates",), secret=b"s" * 32)
    start = time.perf_counter()
    for ds in datasets:
        deidentify(copy.deepcopy(ds), profile)
    elapsed = time.perf_counter() - start
    print(f"{count} CT instances: {elapsed:.2f} s, {count / elapsed:.0f} instances/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
