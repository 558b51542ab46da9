"""Transcoding throughput per codec (issue 20): `mercli.dicom.convert.transcode_file` vs
DCMTK's command-line codecs on the same 512 x 512 x 16 bit CT slices.

Two data sets of COUNT slices: `ct_series`' byte pattern (compresses unlike any image) and a
phantom (a water disk with a bone ring and noise in 12 bits: about 2:1 lossless, like a real
CT). Per codec (all lossless), "encode" converts the explicit VR little endian slices into it
and "decode" converts the encoded slices back to explicit VR little endian; mercli in this
process (its pydicom codecs, each output fsync'ed and renamed into place), DCMTK as one
process per file (dcmcrle/dcmdrle, dcmcjpls/dcmdjpls; no fsync), each side decoding its own
encoder's output. Debian's DCMTK has no JPEG 2000 codec: those rows have no peer. Rates are
instances per second, the note gives MB/s of decoded pixel data (512 KB per instance) and the
mean size of the output files; one pass each, mercli and DCMTK interleaved per codec.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.datasets import ct_series
from benchmarks.report import Row, print_table, with_ratios
from mercli.dicom.convert import (
    EXPLICIT_LE,
    JPEG_2000_LOSSLESS,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    transcode_file,
)
from tests.dicomfiles import make_instance

COUNT = 100  # per data set; the suite takes about a minute on the 2-core VM
PIXEL_BYTES = 512 * 512 * 2
MERCLI, DCMTK = "mercli transcode_file", "DCMTK tools"
CODECS = {
    RLE_LOSSLESS: ("RLE", "dcmcrle", "dcmdrle"),
    JPEG_LS_LOSSLESS: ("JPEG-LS", "dcmcjpls", "dcmdjpls"),
    JPEG_2000_LOSSLESS: ("J2K", None, None),
}

Convert = Callable[[Path, Path], None]


def _timed(files: list[Path], out: Path, convert: Convert) -> float:
    out.mkdir()
    start = time.perf_counter()
    for path in files:
        convert(path, out / path.name)
    return len(files) / (time.perf_counter() - start)


def _mercli(syntax: str) -> Convert:
    return lambda source, destination: transcode_file(source, destination, syntax)


def _dcmtk(tool: str) -> Convert:
    def run(source: Path, destination: Path) -> None:
        subprocess.run([tool, str(source), str(destination)], check=True, timeout=60)

    return run


def _row(case: str, subject: str, rate: float, folder: Path, tool: str = "") -> Row:
    sizes = [p.stat().st_size for p in folder.iterdir()]
    mb = rate * PIXEL_BYTES / 1e6
    note = f"{mb:.0f} MB/s, {sum(sizes) / len(sizes) / 1024:.0f} KB/file"
    return Row("transcode", case, subject, rate, note=f"{tool}, {note}" if tool else note)


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


def _codecs(root: Path, files: list[Path], label: str) -> list[Row]:
    """Encode to and decode from each codec, mercli then DCMTK; rows with ratios to DCMTK."""
    rows = []
    root.mkdir()
    for syntax, (name, encoder, decoder) in CODECS.items():
        steps = [(MERCLI, "", _mercli(syntax), _mercli(EXPLICIT_LE))]
        if encoder and decoder:
            steps.append((DCMTK, f"{encoder}/{decoder}", _dcmtk(encoder), _dcmtk(decoder)))
        for subject, tools, encode, decode in steps:
            encoded, back = root / f"out-{len(rows)}", root / f"out-{len(rows) + 1}"
            encoder_name, _, decoder_name = tools.partition("/")
            rate = _timed(files, encoded, encode)
            rows.append(_row(f"{name} encode {label}", subject, rate, encoded, encoder_name))
            rate = _timed(sorted(encoded.iterdir()), back, decode)
            rows.append(_row(f"{name} decode {label}", subject, rate, back, decoder_name))
    return with_ratios(rows, DCMTK, target="ratio")


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as scratch:
        root = Path(scratch)
        rows = _codecs(root / "phantom", phantom_series(root, COUNT), "phantom")
        rows += _codecs(root / "pattern", ct_series(root, COUNT).files, "pattern")
    return rows


if __name__ == "__main__":
    print_table(run())
