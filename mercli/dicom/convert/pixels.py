"""Pixel data for `mercli.dicom.convert`: sizes checked, frames decoded and encoded one by one."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercli.dicom.convert.syntaxes import (
    DECODING_PLUGINS,
    ENCODER_OPTIONS,
    LOSSY,
    NATIVE,
    RLE_LOSSLESS,
    RLE_PLUGINS,
    ImplausibleImage,
    Limits,
    NoCodec,
    UnsupportedImage,
    syntax_name,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


@dataclass
class Pixels:
    """How the Pixel Data element of the output is produced."""

    kind: str  # "none" | "copy" | "native" | "encapsulated"
    frames: Callable[[], Iterator[bytes]] = lambda: iter(())
    count: int = 0  # number of frames


def pixel_plan(
    source: Path, ds: Dataset, source_syntax: str, target: str, limits: Limits
) -> Pixels:
    from pydicom.uid import UID

    if "PixelData" not in ds:
        if {"FloatPixelData", "DoubleFloatPixelData"} & set(ds.dir()) and target not in NATIVE:
            raise UnsupportedImage(source, "float pixel data cannot be compressed")
        return Pixels("none")
    compressed = UID(source_syntax).is_compressed
    frames = _checked_size(source, ds, compressed, limits)
    if not compressed and target in NATIVE:
        return Pixels("copy")
    decoded = _decoder(source, ds, source_syntax)
    if target in NATIVE:
        return Pixels("native", decoded, frames)
    if int(ds.BitsAllocated) not in (8, 16):  # pydicom 3.0's encoders: RLE too
        raise UnsupportedImage(
            source, f"{syntax_name(target)} needs 8 or 16 bits allocated, not {ds.BitsAllocated}"
        )
    return Pixels("encapsulated", _encoder(source, ds, target, decoded), frames)


def _checked_size(source: Path, ds: Dataset, compressed: bool, limits: Limits) -> int:
    """The number of frames, after checking the decoded size against the file and limits."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImplausibleImage(source, f"image pixel module incomplete: {exc}") from exc
    if min(rows, columns, samples, bits, frames) < 1:
        raise ImplausibleImage(source, "image dimensions must be positive")
    frame_bytes = (rows * columns * samples * bits + 7) // 8
    total = frame_bytes * frames
    claim = f"{rows}x{columns}x{samples} at {bits} bits, {frames} frames"
    if frame_bytes > limits.max_frame_bytes or total > limits.max_total_bytes:
        raise ImplausibleImage(source, f"header claims {total} bytes of pixels ({claim})")
    value = ds["PixelData"].value
    if not compressed:
        needed = (rows * columns * samples * bits * frames + 7) // 8
        if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            needed = needed * 2 // 3  # two chroma samples for every two pixels
        if len(value) < needed:
            raise ImplausibleImage(
                source, f"pixel data holds {len(value)} bytes, the header claims {claim}"
            )
        return frames
    fragments = _count_fragments(value)
    if fragments < frames:
        raise ImplausibleImage(
            source, f"{fragments} pixel data fragments cannot hold {frames} frames ({claim})"
        )
    return frames


def _count_fragments(value: bytes) -> int:
    """Items after the Basic Offset Table, by their headers only (PS3.5 A.4)."""
    offset, count = 0, -1
    while offset + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHI", value, offset)
        if (group, element) != (0xFFFE, 0xE000):
            break
        count += 1
        offset += 8 + length
    return max(count, 0)


def _decoder(source: Path, ds: Dataset, source_syntax: str) -> Callable[[], Iterator[bytes]]:
    """Frames of decoded pixel data, little endian; updates `ds` to describe them."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    uid = UID(ds.file_meta.TransferSyntaxUID)  # native sources: explicit LE by now
    decoder = get_decoder(uid)
    if decoder is None or not decoder.is_available:
        raise NoCodec(source, f"no decoder for {syntax_name(source_syntax)}", source_syntax)

    preferred = DECODING_PLUGINS.get(str(uid), "")
    plugins = [preferred, ""] if preferred in decoder.available_plugins else [""]

    def frames() -> Iterator[bytes]:
        for attempt, plugin in enumerate(plugins, 1):
            iterator = decoder.iter_buffer(ds, transfer_syntax_uid=uid, decoding_plugin=plugin)
            count = 0
            while True:
                try:
                    buffer, image = next(iterator)
                except StopIteration:
                    return
                except Exception as exc:  # a broken codestream or an unsupported variant
                    if count == 0 and attempt < len(plugins):
                        break  # the preferred plugin refused: every plugin, from the start
                    reason = f"cannot decode {syntax_name(source_syntax)}: {exc}"
                    raise NoCodec(source, reason, source_syntax) from exc
                _describe(ds, image, uid.is_compressed)
                count += 1
                yield bytes(buffer)

    return frames


def _describe(ds: Dataset, image: dict[str, Any], compressed: bool) -> None:
    """The Image Pixel attributes of what the decoder yielded."""
    photometric = image["photometric_interpretation"]
    if compressed and photometric == "YBR_FULL_422":
        photometric = "YBR_FULL"  # JPEG decoders upsample; pydicom 3.0 still says 4:2:2
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = int(image.get("bits_allocated", ds.BitsAllocated))
    if int(image.get("samples_per_pixel", 1)) > 1:
        ds.PlanarConfiguration = int(image.get("planar_configuration", 0))


def _encoder(
    source: Path, ds: Dataset, target: str, decoded: Callable[[], Iterator[bytes]]
) -> Callable[[], Iterator[bytes]]:
    from pydicom.pixels.encoders.base import get_encoder
    from pydicom.uid import UID

    encoder = get_encoder(UID(target))
    if encoder is None or not encoder.is_available:
        raise NoCodec(source, f"no encoder installed for {syntax_name(target)}")
    options = {**ENCODER_OPTIONS.get(target, {}), **LOSSY.get(target, ({}, ""))[0]}
    if target == RLE_LOSSLESS:
        plugins = encoder.available_plugins
        options["encoding_plugin"] = next(p for p in RLE_PLUGINS if p in plugins)

    def frames() -> Iterator[bytes]:
        image: dict[str, Any] = {}
        by_plane = False
        for frame in decoded():
            if not image:  # the first decoded frame has set what the frames are like
                image = _image(ds)
                by_plane = image["samples_per_pixel"] > 1 and image["planar_configuration"]
                image["planar_configuration"] = 0  # the encoders take colour by pixel only
                if image["samples_per_pixel"] > 1:
                    ds.PlanarConfiguration = 0
            if by_plane:
                frame = _interleave(frame, image["samples_per_pixel"], image["bits_allocated"])
            try:
                yield encoder.encode(frame, **image, **options)
            except Exception as exc:  # the plugins' ValueError/RuntimeError on what they refuse
                raise UnsupportedImage(
                    source,
                    f"{syntax_name(target)} cannot encode {image['photometric_interpretation']} "
                    f"{image['bits_stored']}/{image['bits_allocated']}-bit "
                    f"{'signed' if image['pixel_representation'] else 'unsigned'}: {exc}",
                ) from exc

    return frames


def _interleave(frame: bytes, samples: int, bits: int) -> bytes:
    """Colour-by-plane samples (RRR...GGG...BBB...) as colour-by-pixel (RGBRGB...)."""
    import numpy

    planes = numpy.frombuffer(frame, dtype=f"<u{bits // 8}").reshape(samples, -1)
    return planes.T.tobytes()


def _image(ds: Dataset) -> dict[str, Any]:
    return {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": int(ds.SamplesPerPixel),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation),
        "photometric_interpretation": str(ds.PhotometricInterpretation),
        "planar_configuration": int(ds.get("PlanarConfiguration") or 0),
        "number_of_frames": 1,
    }
