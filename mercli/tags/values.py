"""Sidecar values: DICOM element values to JSON-ready Python values (rules: `mercli.tags`).

`convert_raw` converts little-endian encoded bytes, mirroring pydicom's converters
(`pydicom.values`) VR by VR, with pydicom's `decode_bytes` for text in the Specific Character
Set (`python_encodings` names the codecs); `convert_element` maps a value pydicom has already
converted. Both return None for a value the sidecar leaves out.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from decimal import Decimal
from functools import cache, lru_cache
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

from mercli.tags.spec import tag_key

__all__ = ["convert_element", "convert_raw", "dictionary_vr", "python_encodings", "vr_kind"]

_TEXT_VRS = frozenset(
    ["AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
)


_CHARSET_VRS = frozenset(["LO", "LT", "PN", "SH", "ST", "UC", "UT"])  # the others are ASCII
_SINGLE_VALUE_VRS = frozenset(["LT", "ST", "UT", "UR"])  # a backslash is text, not a delimiter
_INT_VRS = frozenset(["IS", "US", "UL", "SS", "SL", "SV", "UV"])
_FLOAT_VRS = frozenset(["DS", "FD", "FL"])
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "UV": "Q", "SV": "q"}
_BINARY_FORMATS |= {"FL": "f", "FD": "d"}


@cache
def vr_kind(vr: str) -> str | None:
    """How to convert values of a VR: text, int, a float VR, tag; None to skip (SQ, binary).

    Ambiguous VRs (`US or SS`) convert when every alternative converts the same way.
    """
    choices = set(str(vr).split(" or "))
    if choices <= _INT_VRS:
        return "int"
    if len(choices) > 1:
        return None
    (single,) = choices
    if single in _TEXT_VRS:
        return "text"
    if single in _FLOAT_VRS:
        return single
    if single == "AT":
        return "tag"
    return None


@cache
def dictionary_vr(tag: int) -> str:
    """The VR of an element read without one (implicit VR, or UN), as pydicom picks it."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        if tag >> 16 & 1 and 0x0010 <= tag & 0xFFFF <= 0x00FF:
            return "LO"  # private creator
        return "UL" if tag & 0xFFFF == 0 else "UN"  # group length; else unknowable


@lru_cache(maxsize=256)
def python_encodings(charset: bytes) -> tuple[str, ...]:
    """Python codecs for a raw (0008,0005) value; pydicom warns about and replaces bad ones."""
    values = charset.decode(default_encoding).rstrip(" \0").split("\\")
    return tuple(convert_encodings(values[0] if len(values) == 1 else values))


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, PersonName):
        return str(value)
    original = getattr(value, "original_string", None)  # DA/TM/DT objects, DSfloat
    return original if isinstance(original, str) else str(value)


def _int_from_text(text: str) -> int | str:
    """IS as pydicom reads it: an integer, or a float that is one (`1.0`); else the text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else text


def _float_from_text(text: str) -> float | str:
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _binary_float(number: float, vr: str) -> float | str:
    if not math.isfinite(number):
        return repr(number)  # "nan", "inf", "-inf"
    return _shortest_float32(number) if vr == "FL" else number


def _shortest_float32(number: float) -> float:
    try:
        exact = struct.pack("<f", number)
    except OverflowError:
        return number
    for digits in range(1, 10):
        candidate = float(f"{number:.{digits}g}")
        try:
            if struct.pack("<f", candidate) == exact:
                return candidate
        except OverflowError:  # rounded past the float32 range
            continue
    return number  # pragma: no cover - 9 significant digits always round-trip a float32


def _pack(values: list[Any]) -> Any:
    """One value as a scalar, several as a list; None (absent) when all are empty."""
    if len(values) == 1:
        return None if values[0] == "" else values[0]
    if all(value == "" for value in values):
        return None
    return values


def convert_raw(vr: str, data: bytes, encodings: Sequence[str]) -> Any:
    """The sidecar form of a little-endian encoded value; None means leave it out.

    Mirrors pydicom's converters (`pydicom.values`) for each VR, including what padding they
    strip, and uses pydicom's `decode_bytes` for text in the Specific Character Set.
    """
    kind = vr_kind(vr)
    if kind is None or not data:
        return None
    if kind == "text":
        return _pack(_decode_text(vr, data, encodings))
    if vr == "IS":
        text = data.decode(default_encoding).rstrip(" \0")
        return _pack([_int_from_text(item) for item in text.split("\\")])
    if vr == "DS":
        text = data.decode(default_encoding).strip().rstrip(" \0")
        return _pack([_float_from_text(item) for item in text.split("\\")])
    if kind == "tag":
        if len(data) % 4:
            return None
        return _pack([tag_key(g << 16 | e) for g, e in struct.iter_unpack("<HH", data)])
    code = _BINARY_FORMATS[vr.split(" or ")[0]]  # `US or SS`: read as US, like pydicom
    size = struct.calcsize(f"<{code}")
    if len(data) % size:
        return None  # not a whole number of values: unparseable binary, skipped
    numbers = struct.unpack(f"<{len(data) // size}{code}", data)
    if kind == "int":
        return _pack(list(numbers))
    return _pack([_binary_float(number, vr) for number in numbers])


def _decode_text(vr: str, data: bytes, encodings: Sequence[str]) -> list[str]:
    if vr not in _CHARSET_VRS:
        text = data.decode(default_encoding)
        if vr == "AE":
            return [item.strip() for item in text.split("\\")]
        if vr == "UR":
            return [text.rstrip()]
        return text.rstrip(" \0").split("\\")
    if vr == "PN":
        text = decode_bytes(data.rstrip(b"\0 "), encodings, TEXT_VR_DELIMS)
        return [str(PersonName(item)) for item in text.split("\\")]
    text = decode_bytes(data, encodings, TEXT_VR_DELIMS)
    if vr in _SINGLE_VALUE_VRS:
        return [text.rstrip("\0 ")]
    return [item.rstrip("\0 ") for item in text.split("\\")]


def convert_element(vr: str, value: Any) -> Any:
    """The sidecar form of a value pydicom has already converted; None means leave it out."""
    kind = vr_kind(vr)
    if kind is None or value is None:
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if not items:
        return None
    converted = [_from_element(kind, item) for item in items]
    return None if None in converted else _pack(converted)


def _from_element(kind: str, value: Any) -> Any:
    if value is None or value == "":
        return ""
    if isinstance(value, bytes):
        return None
    if kind == "text":
        return _text(value)
    if kind == "tag":
        return tag_key(value)
    if kind == "int":
        if isinstance(value, int):
            return int(value)
        return _int_from_text(_text(value))
    if isinstance(value, float | int | Decimal) and kind != "DS":
        return _binary_float(float(value), kind)
    if isinstance(value, float | int | Decimal):
        number = float(value)
        return number if math.isfinite(number) else _text(value)
    return _float_from_text(_text(value))
