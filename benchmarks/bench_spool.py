"""The cost of durable receipt: spool publish of instance + sidecar vs a bare write+fsync.

The peer is the least any durable receiver must do (write and fsync one file per instance);
the ratio shows what the spool protocol (sidecar, renames, directory fsync, group lock) adds.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.report import Row, with_ratios
from mercli.fsutil import write_new
from mercli.spool import INCOMING, Spool, Worker

COUNT = 2000
SIZE = 12 * 1024


def _bare_writes(folder: Path, data: bytes) -> float:
    start = time.perf_counter()
    for n in range(COUNT):
        write_new(folder / f"{n}.dcm", data)
    return COUNT / (time.perf_counter() - start)


def _spool_publish(root: Path, data: bytes) -> float:
    spool = Spool.open(root)
    sidecar = b'{"SOPInstanceUID": "1.2.3"}' * 20
    with Worker(spool, "bench") as worker:
        start = time.perf_counter()
        for n in range(COUNT):
            dcm, tags = worker.tmp_path(), worker.tmp_path()
            write_new(dcm, data)
            write_new(tags, sidecar)
            spool.publish_to_group(
                INCOMING, "1.2.3", [(dcm, f"1.2.3.{n}.dcm"), (tags, f"1.2.3.{n}.tags")]
            )
        return COUNT / (time.perf_counter() - start)


def run() -> list[Row]:
    data = os.urandom(SIZE)
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as scratch:
        bare_dir = Path(scratch) / "bare"
        bare_dir.mkdir()
        rows = [
            Row(
                "spool",
                "2000 x 12 KB",
                "write+fsync (one file, floor)",
                _bare_writes(bare_dir, data),
            ),
            Row(
                "spool",
                "2000 x 12 KB",
                "spool publish (.dcm+.tags)",
                _spool_publish(Path(scratch) / "spool", data),
            ),
        ]
    return with_ratios(rows, "write+fsync (one file, floor)")
