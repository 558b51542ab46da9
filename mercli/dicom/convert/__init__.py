"""Transcoding one Part 10 file into another transfer syntax, for a target's `transfer_syntax`.

`transcode_file(source, destination, syntax)` reads `source`, decodes its pixel data frame by
frame with pydicom's decoders (RLE natively; JPEG and JPEG-LS through pylibjpeg-libjpeg, JPEG
2000 through pylibjpeg-openjpeg; what those cannot decode, DCMTK's dcmdjpeg, dcmdjpls or
dcmdrle may, run on the file with a timeout), encodes each frame for the target (RLE through
pylibjpeg-rle, JPEG-LS through pyjpegls, JPEG 2000 through pylibjpeg-openjpeg; JPEG baseline,
which pydicom 3.0 cannot encode, by DCMTK's dcmcjpeg from an explicit VR little endian copy)
and publishes `destination` by a rename, so the destination is either the whole converted
file or absent.

The package: `syntaxes` (the syntaxes, limits and errors; a leaf), `pixels` (size checks,
decoding and encoding frames), `writer` (header edits, file meta, writing) and this module,
which puts them together. What it guarantees:

- The target syntax is one of `SYNTAXES`; a lossy one (`LOSSY`) only with `allow_lossy`.
  Anything it cannot do raises a `TranscodeError` subclass naming the file and why; a file is
  never copied unconverted.
- Before any pixel is decoded, Rows x Columns x SamplesPerPixel x BitsAllocated x
  NumberOfFrames is checked against `Limits` and against what the file holds (native data
  must be all there; encapsulated data needs at least one fragment per frame), so a header
  claiming gigapixels fails fast instead of allocating.
- Memory: the source is parsed whole (its stored pixel data, as big as the file, is read),
  but only one decoded frame is held at a time; encapsulated output is streamed to the
  destination, one fragment per frame, its Basic Offset Table filled in afterwards (so the
  output is limited to 4 GiB: `Limits.max_total_bytes`). Lossy output is collected first: the
  compression ratio goes into the header, ahead of the pixels.
- File meta is rewritten (TransferSyntaxUID, MediaStorage* from the dataset, mercli's
  implementation UID) with a correct group length; retired group lengths of other groups are
  dropped, since re-encoding changes them. The SOP Instance UID is kept.
- Lossy output gets LossyImageCompression "01", the method and the ratio appended; a lossy
  source keeps (or gets) LossyImageCompression "01" whatever the target.

Native -> native conversions never decode pixels: the values are re-encoded as they are (big
endian words swapped), which also keeps 1-bit and odd bit depths intact.
"""

from __future__ import annotations

import array
import contextlib
import os
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mercli.dicom.convert.pixels import pixel_plan
from mercli.dicom.convert.syntaxes import (
    DCMTK_DECODERS,
    DCMTK_ENCODERS,
    DCMTK_TIMEOUT,
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    LOSSLESS,
    LOSSY,
    NATIVE,
    PIXEL_TAG,
    RLE_LOSSLESS,
    SYNTAXES,
    ImplausibleImage,
    Limits,
    LossyNotAllowed,
    NoCodec,
    TranscodeError,
    UnreadableInstance,
    UnsupportedImage,
    UnsupportedTarget,
    UnwritableInstance,
    syntax_name,
)
from mercli.dicom.convert.writer import (
    drop_group_lengths,
    file_meta,
    mark_lossy_source,
    publishing,
    write,
)
from mercli.fsutil import fsync_dir, fsync_file

_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_CODE = {2: "H", 4: "I", 8: "Q"}

if TYPE_CHECKING:  # pydicom is imported by the functions that convert, not at start-up
    from pydicom.dataset import Dataset

__all__ = [
    "DCMTK_DECODERS",
    "DEFLATED_LE",
    "EXPLICIT_BE",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "JPEG_2000",
    "JPEG_2000_LOSSLESS",
    "JPEG_BASELINE",
    "JPEG_LS_LOSSLESS",
    "JPEG_LS_NEAR_LOSSLESS",
    "LOSSLESS",
    "LOSSY",
    "NATIVE",
    "RLE_LOSSLESS",
    "SYNTAXES",
    "ImplausibleImage",
    "Limits",
    "LossyNotAllowed",
    "NoCodec",
    "TranscodeError",
    "UnreadableInstance",
    "UnsupportedImage",
    "UnsupportedTarget",
    "UnwritableInstance",
    "transcode_file",
]


def transcode_file(
    source: Path,
    destination: Path,
    target_syntax: str,
    *,
    allow_lossy: bool = False,
    limits: Limits | None = None,
) -> None:
    """Write `source` converted to `target_syntax` as `destination` (replaced atomically).

    What pydicom's decoders cannot decode, DCMTK's command-line tools may (`DCMTK_DECODERS`):
    they decompress the file to a temporary one, which is then converted as usual."""
    _check_target(source, target_syntax, allow_lossy)
    limits = limits or Limits()
    if target_syntax in DCMTK_ENCODERS:
        _dcmtk_encode(source, destination, target_syntax, limits)
        return
    try:
        _transcode(source, destination, target_syntax, limits, None)
    except NoCodec as exc:
        syntax = exc.source_syntax
        if syntax not in DCMTK_DECODERS:
            raise
        with _dcmtk_decoded(source, destination.parent, syntax, exc) as plain:
            _transcode(plain, destination, target_syntax, limits, (source, syntax))


def _transcode(
    source: Path,
    destination: Path,
    target: str,
    limits: Limits,
    original: tuple[Path, str] | None,
) -> None:
    """`original`: the file and syntax `source` was decompressed from (by DCMTK), if any."""
    try:
        ds = _read(source)
        source_syntax = str(ds.file_meta.TransferSyntaxUID)
        _normalise_encoding(ds, source_syntax)
        pixels = pixel_plan(source, ds, source_syntax, target, limits)
        mark_lossy_source(ds, original[1] if original else source_syntax)
        drop_group_lengths(ds)
        meta = file_meta(ds, target)
        with publishing(destination) as out:
            try:
                write(out, meta, ds, target, pixels, destination.parent)
            except (ValueError, TypeError, AttributeError, OverflowError, struct.error) as exc:
                # pydicom's writer on a value the target encoding cannot hold, or frames
                # that do not add up to what the header says
                raise UnwritableInstance(
                    source, f"cannot write {syntax_name(target)}: {exc}"
                ) from exc
    except TranscodeError as exc:
        if original:  # name the file the caller gave, not DCMTK's temporary one
            raise type(exc)(original[0], exc.reason) from exc
        raise


@contextlib.contextmanager
def _dcmtk_decoded(source: Path, scratch: Path, syntax: str, cause: NoCodec) -> Iterator[Path]:
    """`source` decompressed by DCMTK into a temporary file (explicit VR little endian)."""
    tool = DCMTK_DECODERS[syntax]
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".dcmtk-") as folder:
        plain = Path(folder) / "decoded.dcm"
        command = [tool, "--write-xfer-little", str(source), str(plain)]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=DCMTK_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NoCodec(source, f"{cause.reason}; {tool}: {exc}") from exc
        if result.returncode != 0 or not plain.is_file():
            said = " ".join(result.stderr.split())[:300]
            raise NoCodec(source, f"{cause.reason}; {tool} failed too: {said}") from cause
        yield plain


def _dcmtk_encode(source: Path, destination: Path, target: str, limits: Limits) -> None:
    """Explicit VR little endian by `transcode_file`, then DCMTK's encoder, then the rename."""
    from pydicom import dcmread

    command = DCMTK_ENCODERS[target]
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".dcmtk-") as folder:
        plain, encoded = Path(folder) / "plain.dcm", Path(folder) / "encoded.dcm"
        transcode_file(source, plain, EXPLICIT_LE, limits=limits)
        ds = dcmread(plain, stop_before_pixels=True)
        if "BitsStored" in ds and (int(ds.BitsStored) > 8 or int(ds.BitsAllocated) != 8):
            raise UnsupportedImage(
                source, f"{syntax_name(target)} holds 8 bits, not {ds.BitsStored}"
            )
        try:
            result = subprocess.run(
                [*command, str(plain), str(encoded)],
                capture_output=True,
                text=True,
                timeout=DCMTK_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NoCodec(source, f"{command[0]}: {exc}") from exc
        if result.returncode != 0 or not encoded.is_file():
            said = " ".join(result.stderr.split())[:300]
            raise NoCodec(source, f"{command[0]} cannot encode {syntax_name(target)}: {said}")
        fsync_file(encoded)
        os.replace(encoded, destination)
    fsync_dir(destination.parent)


def _check_target(source: Path, syntax: str, allow_lossy: bool) -> None:
    if syntax in LOSSY and not allow_lossy:
        raise LossyNotAllowed(source, f"{syntax_name(syntax)} is lossy and allow_lossy is not set")
    if syntax not in SYNTAXES:
        raise UnsupportedTarget(source, f"target syntax {syntax_name(syntax)} is not supported")


def _read(source: Path) -> Dataset:
    from pydicom import dcmread

    try:
        ds = dcmread(source)
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise UnreadableInstance(source, f"not a readable DICOM file: {exc}") from exc
    if not ds.file_meta.get("TransferSyntaxUID"):
        raise UnreadableInstance(source, "file meta lacks TransferSyntaxUID")
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not (ds.get(keyword) or ds.file_meta.get(f"MediaStorage{keyword}")):
            raise UnreadableInstance(source, f"neither dataset nor file meta has {keyword}")
    return ds


def _normalise_encoding(ds: Dataset, source_syntax: str) -> None:
    """Big endian words to little endian, so every native source decodes as explicit LE."""
    from pydicom.uid import UID

    if not UID(source_syntax).is_compressed:
        ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)  # for the decoder; meta is rewritten
    if source_syntax != EXPLICIT_BE:
        return
    for element in ds.iterall():
        width = _SWAP_WIDTH.get(str(element.VR))
        if element.tag == PIXEL_TAG and width and int(ds.get("BitsAllocated") or 0) > 16:
            width = int(ds.BitsAllocated) // 8  # pydicom's reading of 32/64-bit OW pixels
        value = element.value
        if width and isinstance(value, bytes) and value and len(value) % width == 0:
            words = array.array(_ARRAY_CODE[width], value)
            words.byteswap()
            element.value = words.tobytes()
