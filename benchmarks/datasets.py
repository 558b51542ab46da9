"""Synthetic, valid DICOM series for benchmarks, written once per run with pydicom."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from tests.dicomfiles import make_instance


@dataclass(frozen=True)
class DataSet:
    label: str
    files: list[Path]


def _series(scratch: Path, name: str, count: int, rows: int, columns: int) -> list[Path]:
    folder = scratch / name
    folder.mkdir(exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return [
        make_instance(folder, series=series, study=study, number=n + 1, rows=rows, columns=columns)
        for n in range(count)
    ]


def small_series(scratch: Path, count: int) -> DataSet:
    """`count` instances of about 12 KB (64 x 96 pixels, 16 bit)."""
    return DataSet(f"{count} x 12 KB", _series(scratch, "small", count, 64, 96))


def ct_series(scratch: Path, count: int) -> DataSet:
    """`count` CT slices of 512 x 512 pixels, 16 bit (512 KB each)."""
    return DataSet(f"{count} x 512x512 CT", _series(scratch, "ct", count, 512, 512))


def huge_instance(scratch: Path, size: int) -> DataSet:
    """One multi-frame instance with `size` bytes of pixel data, streamed to disk."""
    path = scratch / "huge.dcm"
    frames = max(1, size // (1024 * 1024 * 2))
    header = make_instance(
        scratch, rows=1024, columns=1024, filename="huge-header.dcm", NumberOfFrames=frames
    )
    data = header.read_bytes()
    cut = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010): replace the one-frame Pixel Data
    with path.open("wb") as out:
        out.write(data[:cut])
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frames * 1024 * 1024 * 2).to_bytes(4, "little"))
        block = bytes(range(256)) * 8192
        for _ in range(frames):
            out.write(block)
    header.unlink()
    return DataSet(f"1 x {frames * 2} MB multi-frame", [path])


def mr_study(
    scratch: Path, name: str, descriptions: list[str], per_series: int
) -> list[list[Path]]:
    """One MR study: per SeriesDescription, a series of `per_series` instances of about 12 KB."""
    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    found = []
    for description in descriptions:
        series = generate_uid()
        found.append(
            [
                make_instance(
                    folder,
                    series=series,
                    study=study,
                    modality="MR",
                    number=n + 1,
                    rows=64,
                    columns=96,
                    SeriesDescription=description,
                    StudyDescription="BRAIN",
                )
                for n in range(per_series)
            ]
        )
    return found


def mr_studies(scratch: Path, studies: int, series: int, per_series: int) -> DataSet:
    """`studies` MR studies of `series` series of `per_series` instances of about 12 KB."""
    descriptions = [f"SERIES {n + 1}" for n in range(series)]
    files = [
        path
        for n in range(studies)
        for one in mr_study(scratch / "studies", f"study{n}", descriptions, per_series)
        for path in one
    ]
    return DataSet(f"{studies} st x {series} se x {per_series} img", files)
