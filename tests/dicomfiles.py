"""DICOM test data: pydicom's bundled corpus and synthetic instances made with pydicom."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.kit import LONG_VRS

PYDICOM_DATA = Path(pydicom.__file__).parent / "data"
CORPUS = sorted(
    p
    for folder in ("test_files", "charset_files")
    for p in (PYDICOM_DATA / folder).iterdir()
    if p.is_file()
)


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file: everything after preamble and file meta."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    offset = 132
    while offset + 8 <= len(data):
        group = struct.unpack_from("<H", data, offset)[0]
        if group != 0x0002:
            break
        vr = data[offset + 4 : offset + 6]
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", data, offset + 8)[0]
            offset += 12 + length
        else:
            length = struct.unpack_from("<H", data, offset + 6)[0]
            offset += 8 + length
    return data[offset:]


def make_instance(
    folder: Path,
    *,
    series: str | None = None,
    study: str | None = None,
    sop: str | None = None,
    modality: str = "CT",
    rows: int = 64,
    columns: int = 64,
    number: int = 1,
    filename: str | None = None,
    **extra: object,
) -> Path:
    """A small valid CT-like Part 10 file with 16-bit pixels; returns its path."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P001"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes((number + i) % 251 for i in range(rows * columns * 2))
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / (filename or f"{ds.SOPInstanceUID}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path
