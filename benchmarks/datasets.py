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
