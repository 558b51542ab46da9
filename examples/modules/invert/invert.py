"""invert: a processing module that derives an inverted copy of every input series.

Written against mercure's module contract only, so it runs under mercure and under mercli:
the DICOM files are in $MERCURE_IN_DIR, named `<SeriesInstanceUID>#<SOPInstanceUID>.dcm`, with
`task.json` beside them; the derived files go to $MERCURE_OUT_DIR. Per input series it writes
one new series: a new SeriesInstanceUID (derived deterministically from the input one, so a
re-run writes the same UIDs), new SOPInstanceUIDs, SeriesDescription prefixed, SeriesNumber +
1000, ImageType DERIVED. Pixel data of uncompressed MONOCHROME1/2 images with 8 or 16 bits
allocated and one sample is inverted: `max - value` (unsigned; `max + min - value` for signed
pixels), with max/min taken over the instance. Other images keep their pixels.

Settings (task.json `process.settings`): `prefix` (default "INVERTED "), `series_number_offset`
(default 1000). Needs only pydicom (>= 3); the pixel change is done with the standard
library's `array`, so numpy is not required. Exit status 0 on success, 1 on any error.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, generate_uid

DEFAULTS: dict[str, Any] = {"prefix": "INVERTED ", "series_number_offset": 1000}
TYPECODES = {(8, 0): "B", (8, 1): "b", (16, 0): "H", (16, 1): "h"}


def settings(in_dir: Path) -> dict[str, Any]:
    """The module's settings from task.json (`process` is one step, or a list in a chain)."""
    merged = dict(DEFAULTS)
    task_file = in_dir / "task.json"
    if task_file.exists():
        process = json.loads(task_file.read_text(encoding="utf-8")).get("process") or {}
        steps = process if isinstance(process, list) else [process]
        for step in steps[:1]:
            merged.update(step.get("settings") or {})
    return merged


def invertible(ds: Dataset) -> bool:
    return (
        "PixelData" in ds
        and not ds.file_meta.TransferSyntaxUID.is_compressed
        and str(ds.get("PhotometricInterpretation", "")) in ("MONOCHROME1", "MONOCHROME2")
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and (int(ds.get("BitsAllocated", 0)), int(ds.get("PixelRepresentation", 0))) in TYPECODES
    )


def invert_pixels(ds: Dataset) -> None:
    code = TYPECODES[(int(ds.BitsAllocated), int(ds.PixelRepresentation))]
    pixels = array(code)
    raw = bytes(ds.PixelData)
    usable = len(raw) - len(raw) % pixels.itemsize
    pixels.frombytes(raw[:usable])
    swap = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian and pixels.itemsize > 1
    if swap:
        pixels.byteswap()
    if not pixels:
        return
    top, bottom = max(pixels), min(pixels)
    base = top if ds.PixelRepresentation == 0 else top + bottom
    inverted = array(code, (base - value for value in pixels))
    if swap:
        inverted.byteswap()
    ds.PixelData = inverted.tobytes() + raw[usable:]


def derive(ds: Dataset, config: dict[str, Any]) -> Dataset:
    old_series, old_sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    new_series = generate_uid(entropy_srcs=["mercli-example-invert", old_series])
    new_sop = generate_uid(entropy_srcs=["mercli-example-invert", old_series, old_sop])
    ds.SeriesInstanceUID, ds.SOPInstanceUID = new_series, new_sop
    ds.file_meta.MediaStorageSOPInstanceUID = new_sop
    ds.SeriesDescription = f"{config['prefix']}{ds.get('SeriesDescription', '')}"[:64]
    ds.SeriesNumber = int(ds.get("SeriesNumber") or 0) + int(config["series_number_offset"])
    image_type = list(ds.get("ImageType", [])) or ["DERIVED", "SECONDARY"]
    ds.ImageType = ["DERIVED", *image_type[1:]]
    if invertible(ds):
        invert_pixels(ds)
    return ds


def main() -> int:
    in_dir = Path(os.environ.get("MERCURE_IN_DIR", "/tmp/data"))
    out_dir = Path(os.environ.get("MERCURE_OUT_DIR", "/tmp/output"))
    config = settings(in_dir)
    files = sorted(in_dir.glob("*.dcm"))
    for path in files:
        ds = derive(dcmread(path), config)
        name = f"{ds.SeriesInstanceUID}#{ds.SOPInstanceUID}.dcm"
        ds.save_as(out_dir / name, enforce_file_format=True)
    print(f"invert: {len(files)} instance(s) written to {out_dir}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # any failure: reported by the exit status
        print(f"invert: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
