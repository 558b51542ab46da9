"""Transcoding throughput per codec (issue 20 item 3): `mercli.dicom.convert.transcode_file`
on 300 CT slices of 512 x 512 x 16 bit, and DCMTK's command-line codecs on the same files.

Not registered in `benchmarks/__main__.py` yet: run it alone with
`python -m benchmarks.bench_transcoding`. Rates are instances per second; the note gives
MB/s of decoded pixel data (512 KB per instance) and the compressed size.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.datasets import ct_series
from benchmarks.report import Row, print_table
from mercli.dicom.convert import (
    EXPLICIT_LE,
    JPEG_2000_LOSSLESS,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    transcode_file,
)
from tests.dicomfiles import make_instance

COUNT = 300
PIXEL_BYTES = 512 * 512 * 2
CODECS = {
    RLE_LOSSLESS: ("RLE", "dcmcrle", "dcmdrle"),
    JPEG_LS_LOSSLESS: ("JPEG-LS lossless", "dcmcjpls", "dcmdjpls"),
    JPEG_2000_LOSSLESS: ("JPEG 2000 lossless", None, None),
}


def _timed(files: list[Path], out: Path, convert: Callable[[Path, Path], None]) -> float:
    out.mkdir()
    start = time.perf_counter()
    for path in files:
        convert(path, out / path.name)
    return len(files) / (time.perf_counter() - start)


def _dcmtk(tool: str) -> Callable[[Path, Path], None]:
    env = {**os.environ, "TCP_NODELAY": "1"}

    def run(source: Path, destination: Path) -> None:
        subprocess.run([tool, str(source), str(destination)], check=True, timeout=60, env=env)

    return run


def _row(subject: str, rate: float, folder: Path) -> Row:
    size = sum(p.stat().st_size for p in folder.iterdir()) / len(list(folder.iterdir()))
    mb = rate * PIXEL_BYTES / 1e6
    return Row(
        "transcode",
        f"{COUNT} x 512x512 CT",
        subject,
        rate,
        note=f"{mb:.0f} MB/s, {size / 1024:.0f} KB/file",
    )


def phantom_series(scratch: Path, count: int) -> list[Path]:
    """CT-like slices: a water disk with a bone ring and 1% noise in 12 bits (ct_series' byte
    pattern compresses unlike any image; this one like a real CT, about 2:1 lossless)."""
    import numpy

    folder = scratch / "phantom-slices"
    folder.mkdir()
    y, x = numpy.mgrid[-256:256, -256:256]
    radius = numpy.hypot(x, y)
    body = numpy.where(radius < 200, 1024, 0) + numpy.where((radius > 180) & (radius < 200), 800, 0)
    rng = numpy.random.default_rng(20)
    files = []
    for n in range(count):
        pixels = numpy.clip(body + rng.normal(0, 12, (512, 512)) + 24, 0, 4095).astype("<u2")
        files.append(
            make_instance(folder, rows=512, columns=512, number=n + 1, PixelData=pixels.tobytes())
        )
    return files


def run() -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as scratch:
        root = Path(scratch)
        rows += _codecs(root / "pattern", ct_series(root, COUNT).files, "")
        rows += _codecs(root / "phantom", phantom_series(root, COUNT), " (phantom)")
    return rows


def _codecs(root: Path, files: list[Path], label: str) -> list[Row]:
    rows = []
    root.mkdir()
    for syntax, (name, encoder, decoder) in CODECS.items():
        encoded = root / f"py-{syntax}"
        rate = _timed(files, encoded, lambda s, d, t=syntax: transcode_file(s, d, t))
        rows.append(_row(f"pydicom encode {name}{label}", rate, encoded))
        back = root / f"py-back-{syntax}"
        coded = sorted(encoded.iterdir())
        rate = _timed(coded, back, lambda s, d: transcode_file(s, d, EXPLICIT_LE))
        rows.append(_row(f"pydicom decode {name}{label}", rate, back))
        if encoder and decoder:
            out = root / f"dcmtk-{syntax}"
            rows.append(_row(f"DCMTK {encoder}{label}", _timed(files, out, _dcmtk(encoder)), out))
            back = root / f"dcmtk-back-{syntax}"
            coded = sorted(out.iterdir())
            rows.append(_row(f"DCMTK {decoder}{label}", _timed(coded, back, _dcmtk(decoder)), back))
    return rows


if __name__ == "__main__":
    results = run()
    print_table(results)
    for row in results:
        print(f"{row.subject:<34} {row.rate:8.1f} img/s  {row.note}")
