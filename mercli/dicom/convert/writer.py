"""Writing for `mercli.dicom.convert`: the header's edits, file meta, and the file itself."""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mercli.dicom import part10
from mercli.dicom.convert.pixels import Pixels
from mercli.dicom.convert.syntaxes import (
    DEFLATED_LE,
    IMPLICIT_LE,
    LOSSY,
    LOSSY_SOURCES,
    PIXEL_TAG,
)
from mercli.fsutil import fsync_dir, open_new, unlink_quietly

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# --- header -----------------------------------------------------------------------------------


def mark_lossy_source(ds: Dataset, source_syntax: str) -> None:
    method = LOSSY_SOURCES.get(source_syntax)
    if method and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = method


def _mark_lossy_target(ds: Dataset, target: str, ratio: float) -> None:
    ds.LossyImageCompression = "01"
    methods, ratios = (
        _values(ds, "LossyImageCompressionMethod"),
        _values(ds, "LossyImageCompressionRatio"),
    )
    if len(ratios) != len(methods):  # keep the two lists aligned, as PS3.3 pairs them
        ratios = ratios[: len(methods)] + [0.0] * max(0, len(methods) - len(ratios))
    ds.LossyImageCompressionMethod = [*methods, LOSSY[target][1]]
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"[:16]]


def _values(ds: Dataset, keyword: str) -> list[Any]:
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]


def drop_group_lengths(ds: Dataset) -> None:
    """(gggg,0000) elements are retired and wrong once re-encoded: remove them everywhere."""
    for tag in [element.tag for element in ds if element.tag.element == 0]:
        del ds[tag]
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or ():
                drop_group_lengths(item)


def file_meta(ds: Dataset, syntax: str) -> Any:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    old, meta = ds.file_meta, FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or old.get(
        "MediaStorageSOPInstanceUID"
    )
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(part10.IMPLEMENTATION_CLASS_UID.decode())
    meta.ImplementationVersionName = part10.IMPLEMENTATION_VERSION.decode()
    for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
        if keyword in old:
            setattr(meta, keyword, old.get(keyword))
    return meta


# --- writing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def publishing(destination: Path) -> Iterator[BinaryIO]:
    """A new file beside `destination`, renamed over it when complete, else removed."""
    temp = destination.with_name(f".{destination.name}.{os.getpid()}.transcoding")
    fd = open_new(temp, os.O_RDWR)
    try:
        with os.fdopen(fd, "w+b") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, destination)
    except BaseException:
        unlink_quietly(temp)
        raise
    fsync_dir(destination.parent)


def _deflate(plain: BinaryIO, out: BinaryIO) -> None:
    """Copy `plain` from its start to `out`, deflated raw (PS3.5 A.5), a chunk at a time."""
    plain.seek(0)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    while chunk := plain.read(1024 * 1024):
        out.write(deflater.compress(chunk))
    out.write(deflater.flush())


def write(
    out: BinaryIO, meta: Any, ds: Dataset, syntax: str, pixels: Pixels, scratch: Path
) -> None:
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info

    frames, first = _first_frame(pixels)  # decoding it has made `ds` describe the output
    if pixels.kind == "encapsulated" and syntax in LOSSY:
        encoded = list(frames)  # the ratio goes into the header, before the pixels
        decoded = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * pixels.count
        decoded *= int(ds.BitsAllocated) // 8
        _mark_lossy_target(ds, syntax, decoded / max(1, sum(map(len, encoded))))
        frames = iter(encoded)
    out.write(b"\x00" * 128 + b"DICM")
    fp = DicomFileLike(out)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    with contextlib.ExitStack() as stack:
        # deflate: explicit LE to a temporary file first (pydicom's writer seeks), then deflated
        plain = (
            stack.enter_context(tempfile.TemporaryFile(dir=scratch))
            if syntax == DEFLATED_LE
            else out
        )
        _write_dataset(plain, ds, syntax, pixels, frames, first)
        if plain is not out:
            _deflate(plain, out)


def _write_dataset(
    out: BinaryIO, ds: Dataset, syntax: str, pixels: Pixels, frames: Iterator[bytes], first: int
) -> None:
    from pydicom.filebase import DicomFileLike

    sink = DicomFileLike(out)
    sink.is_little_endian, sink.is_implicit_VR = True, syntax == IMPLICIT_LE
    head, tail = _split(ds, pixels.kind)
    _write_elements(sink, head)
    if pixels.kind == "native":
        vr = b"OB" if int(ds.BitsAllocated) <= 8 else b"OW"
        _write_native(sink, frames, first * pixels.count, None if syntax == IMPLICIT_LE else vr)
    elif pixels.kind == "encapsulated":
        _write_encapsulated(out, frames, pixels.count)
    _write_elements(sink, tail)


def _first_frame(pixels: Pixels) -> tuple[Iterator[bytes], int]:
    """The frames with the first one already produced, and its length."""
    if pixels.kind not in ("native", "encapsulated"):
        return iter(()), 0
    frames = pixels.frames()
    first = next(frames, None)
    if first is None:
        raise ValueError("the pixel data yielded no frame")
    return itertools.chain([first], frames), len(first)


def _split(ds: Dataset, kind: str) -> tuple[Dataset, Dataset]:
    """The elements before Pixel Data (and it, when copied as is), and those after it."""
    from pydicom.dataset import Dataset

    head, tail = Dataset(), Dataset()
    for element in ds:
        if element.tag == PIXEL_TAG and kind not in ("none", "copy"):
            continue
        (tail if element.tag > PIXEL_TAG else head).add(element)
    for part in (head, tail):
        part.set_original_encoding(*_original(ds))
    return head, tail


def _original(ds: Dataset) -> tuple[bool, bool, str | list[str]]:
    implicit, little = ds.original_encoding
    charset = ds.original_character_set
    return bool(implicit), little is not False, charset if isinstance(charset, str) else [*charset]


def _write_elements(sink: Any, ds: Dataset) -> None:
    from pydicom.filewriter import write_dataset

    if len(ds):
        write_dataset(sink, ds)


def _write_native(sink: Any, frames: Iterator[bytes], length: int, vr: bytes | None) -> None:
    """Native Pixel Data of `length` bytes (OB/OW by `vr`; implicit VR without one)."""
    padded = length + length % 2
    if vr is None:
        sink.write(struct.pack("<HHI", 0x7FE0, 0x0010, padded))
    else:
        sink.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, padded))
    written = 0
    for frame in frames:
        sink.write(frame)
        written += len(frame)
    if written != length:
        raise ValueError(f"decoded {written} bytes of pixels, expected {length}")
    if length % 2:
        sink.write(b"\x00")


def _write_encapsulated(out: BinaryIO, frames: Iterator[bytes], count: int) -> None:
    """Encapsulated Pixel Data, one fragment per frame, the Basic Offset Table filled in last."""
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * count))
    table = out.tell()
    out.write(b"\x00" * 4 * count)
    offsets, position = [], 0
    for frame in frames:
        data = frame + b"\x00" if len(frame) % 2 else frame
        offsets.append(position)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)))
        out.write(data)
        position += 8 + len(data)
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    if len(offsets) != count or position > 0xFFFFFFFF:
        raise ValueError(f"{len(offsets)} frames of {count}, {position} bytes encapsulated")
    end = out.tell()
    out.seek(table)
    out.write(struct.pack(f"<{count}I", *offsets))
    out.seek(end)
