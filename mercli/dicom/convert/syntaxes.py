"""Transfer syntaxes, limits and errors of `mercli.dicom.convert` (its leaf module)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercli.errors import MercliError

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
LOSSLESS = frozenset({RLE_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS})
# Lossy syntax -> (encoder options, Lossy Image Compression Method, PS3.3 C.7.6.1.1.5.1)
LOSSY: dict[str, tuple[dict[str, Any], str]] = {
    JPEG_LS_NEAR_LOSSLESS: ({"jls_error": 2}, "ISO_14495_1"),
    JPEG_2000: ({"j2k_cr": [10.0], "use_mct": False}, "ISO_15444_1"),
    JPEG_BASELINE: ({}, "ISO_10918_1"),  # by DCMTK: DCMTK_ENCODERS
}
SYNTAXES = NATIVE | LOSSLESS | frozenset(LOSSY)
# GDCM's RLE encoder aborts the process on odd sizes (gdcm::Exception, terminate), so never it.
ENCODER_OPTIONS: dict[str, dict[str, Any]] = {JPEG_2000_LOSSLESS: {"use_mct": False}}
RLE_PLUGINS = ("pylibjpeg", "pydicom")
# pydicom tries pylibjpeg-libjpeg first for JPEG-LS; CharLS (pyjpegls) decodes it 4x faster.
DECODING_PLUGINS = {JPEG_LS_LOSSLESS: "pyjpegls", JPEG_LS_NEAR_LOSSLESS: "pyjpegls"}
# Sources whose syntax says the pixels were lossy compressed (JPEG 2000 .91 may be either).
LOSSY_SOURCES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    JPEG_LS_NEAR_LOSSLESS: "ISO_14495_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}
# Syntax -> the DCMTK tool that decompresses it, for what pydicom's plugins cannot decode.
DCMTK_DECODERS = {
    "1.2.840.10008.1.2.4.50": "dcmdjpeg",
    "1.2.840.10008.1.2.4.51": "dcmdjpeg",
    "1.2.840.10008.1.2.4.57": "dcmdjpeg",
    "1.2.840.10008.1.2.4.70": "dcmdjpeg",
    JPEG_LS_LOSSLESS: "dcmdjpls",
    JPEG_LS_NEAR_LOSSLESS: "dcmdjpls",
    RLE_LOSSLESS: "dcmdrle",
}
# Syntax -> the DCMTK command that encodes it from explicit VR little endian (pydicom 3.0 has
# no JPEG encoder). dcmcjpeg writes the offset table, one fragment per frame, and the Lossy
# Image Compression attributes itself; +un keeps the SOP Instance UID, as every syntax here.
DCMTK_ENCODERS = {JPEG_BASELINE: ("dcmcjpeg", "+eb", "+un")}
DCMTK_TIMEOUT = 120.0  # seconds for one file
PIXEL_TAG = 0x7FE00010


@dataclass(frozen=True)
class Limits:
    """What one instance may make us decode (bytes of decoded pixel data)."""

    max_frame_bytes: int = 512 * 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024 * 1024 - 1  # a Basic Offset Table holds 32 bits


class TranscodeError(MercliError):
    """This instance cannot be converted as the target asks; it must not be sent."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot transcode: {reason} ({path.name})")
        self.path = path
        self.reason = reason


class LossyNotAllowed(TranscodeError):
    """A lossy target syntax without `allow_lossy`."""


class UnsupportedTarget(TranscodeError):
    """A target syntax this module does not write."""


class NoCodec(TranscodeError):
    """No installed plugin decodes the source or encodes the target (or the codec failed)."""

    def __init__(self, path: Path, reason: str, source_syntax: str = "") -> None:
        super().__init__(path, reason)
        self.source_syntax = source_syntax  # set when decoding it failed


class UnsupportedImage(TranscodeError):
    """The codec cannot represent this image (photometric interpretation, bit depth, ...)."""


class ImplausibleImage(TranscodeError):
    """The header claims more pixels than the file holds or than `Limits` allow."""


class UnwritableInstance(TranscodeError):
    """The dataset cannot be encoded in the target syntax (a value its VR cannot hold, ...)."""


class UnreadableInstance(TranscodeError):
    """Not a Part 10 file pydicom can parse."""


def syntax_name(syntax: str) -> str:
    """`JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)`, for messages."""
    from pydicom.uid import UID

    name = UID(syntax).name
    return syntax if name == syntax else f"{name} ({syntax})"
