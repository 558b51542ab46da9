"""Runs every benchmark and prints one table; results also saved under benchmarks/results/."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import (
    bench_dcmtk_engine,
    bench_deid,
    bench_dicomweb,
    bench_dispatch,
    bench_e2e,
    bench_log,
    bench_notify,
    bench_process,
    bench_receive,
    bench_route,
    bench_slurm,
    bench_spool,
    bench_studies,
    bench_tls,
    bench_transcoding,
)
from benchmarks.report import Row, print_table

SUITES = [
    bench_spool,
    bench_receive,
    bench_dcmtk_engine,
    bench_route,
    bench_studies,
    bench_dispatch,
    bench_process,
    bench_slurm,
    bench_deid,
    bench_transcoding,
    bench_tls,
    bench_dicomweb,
    bench_notify,
    bench_log,
    bench_e2e,
]


def main() -> int:
    wanted = set(sys.argv[1:])  # e.g. `python -m benchmarks receive`; default: all
    rows: list[Row] = []
    for suite in SUITES:
        if not wanted or suite.__name__.removeprefix("benchmarks.bench_") in wanted:
            rows += suite.run()
    print_table(rows)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"bench-{stamp}.json").write_text(json.dumps([r.as_json() for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
