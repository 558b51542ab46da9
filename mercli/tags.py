"""Sidecar tag extraction: the flat JSON object that sits next to every instance (SPEC §3).

Every instance `NAME.dcm` in the spool has a sidecar `NAME.tags`; rules are evaluated on it, so
routing never has to parse DICOM again. This module turns a DICOM file (`read_tags`) or a
dataset (`extract_tags`) into that object. `receive` adds its own metadata (SenderAET,
SenderAddress, ReceiverAET, ReceivedAt) on top; nothing here knows about it.

The format, value by value:

- Keys are DICOM keywords, in `SIDECAR_KEYWORDS` order, then the extra tags asked for. An extra
  tag with no keyword in the data dictionary (private tags, repeating groups such as 60xx) is
  keyed `GGGG,EEEE` in upper-case hex.
- Text VRs (AE AS CS DA DT LO LT PN SH ST TM UC UI UR UT) are strings, trimmed as pydicom
  trims them: trailing spaces and NULs of the whole value (AS CS DA DT TM UI, PN), of each value
  (LO SH UC), of the single value (LT ST UT, where a backslash is text); AE loses leading and
  trailing spaces; UR trailing whitespace. LO LT PN SH ST UC UT are decoded from (0008,0005)
  Specific Character Set. PN is its DICOM form `Family^Given^Middle`, ideographic and phonetic
  groups kept after `=` (trailing empty groups dropped). AT is `GGGG,EEEE`.
- Numbers: IS, US, UL, SS, SL, SV, UV are JSON integers. DS, FL and FD are JSON floats, always:
  a DS `5` is `5.0`, so a value's type never depends on how the modality happened to write it.
  FL is written as the shortest decimal that reads back to the same 32-bit float (`0.1`, not
  `0.10000000149011612`). A value that does not parse (IS `abc`, IS `1.5`) or is NaN or
  infinite (DS `NaN`, DS `1e999`) stays the string the file holds.
- Multi-valued elements are lists (each value converted as above; an empty value inside a list
  is `""`). A single value is a scalar.
- Missing elements are absent. Present-but-empty elements (zero length, only padding, or only
  empty values like `\\`) are absent too: rules read a missing keyword as `""`, so absence is
  what an empty value means to them, and the sidecar never holds `""` or `null` for a keyword.
- Sequences (SQ) and binary VRs (OB OD OF OL OV OW UN, and ambiguous VRs that may be binary)
  are skipped, also when asked for as extras; so is a binary number (US, FL, ...) whose length
  is not a whole number of values. `US or SS` (implicit VR) is read as US.

Character sets: decoding is pydicom's. A Specific Character Set pydicom does not know, or bytes
invalid in the declared one, do not fail: pydicom falls back to its default encoding or
replaces the bad bytes, and warns (the `tags` command hides those warnings unless `-v`).

Reading (`read_tags`) is built for `receive`'s hot path. The data set is scanned element by
element with `struct`, keeping only the bytes of the wanted elements (plus Specific Character
Set), and the scan stops at the first top-level tag above the highest tag wanted (by default
NumberOfFrames (0028,0008)): pixel data, the private groups after it and large per-frame
sequences are never read, and a 1 GB multi-frame file costs a 64 KiB read. This relies on the
ascending tag order PS3.5 §7.1 requires. Values are converted from their bytes by rules that
mirror pydicom's converters (`pydicom.values`) and with pydicom's `decode_bytes` for character
sets; the tests hold the result equal to `pydicom.dcmread` on pydicom's whole test corpus.
Anything the fast scan does not handle (no Part 10 header, big endian, deflate, unknown VRs,
a VR encoding that contradicts the transfer syntax, command sets) goes through
`pydicom.filereader.read_partial` with the same tags and the same stop rule.

Errors: anything that is not readable DICOM raises `UnreadableDicom` (exit code 1), never a
pydicom, struct or OS exception. A file cut short inside the part we scan is unreadable; one cut
short after it (say, inside the pixel data) gives the full sidecar, since nothing in the sidecar
is missing or wrong.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cache, lru_cache
from typing import Any, BinaryIO

from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_keyword, dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR, TEXT_VR_DELIMS, PersonName

from mercli.errors import ExitCode, MercliError, UsageError

__all__ = [
    "SIDECAR_KEYWORDS",
    "InvalidTag",
    "UnreadableDicom",
    "extract_tags",
    "parse_tag",
    "read_tags",
]

SIDECAR_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "TransferSyntaxUID",
    "Modality",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "InstanceNumber",
    "AcquisitionNumber",
    "BodyPartExamined",
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "InstitutionName",
    "ReferringPhysicianName",
    "ImageType",
    "SliceThickness",
    "MagneticFieldStrength",
    "SequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ContrastBolusAgent",
    "ImageComments",
    "NumberOfFrames",
)
"""The keywords every sidecar holds when the instance has them (SPEC §3), in output order."""


class UnreadableDicom(MercliError):
    """The input is not readable DICOM: not DICOM at all, truncated, or malformed."""

    exit_code = ExitCode.SOME_FAILED


class InvalidTag(UsageError):
    """An extra tag is neither a known keyword nor written as `(gggg,eeee)` / `ggggeeee`."""


# --- which tags to read ------------------------------------------------------------------------

_CHARSET = 0x00080005
_TRANSFER_SYNTAX = 0x00020010
_PIXEL_TAGS_START = 0x7FE00008  # Float/Double Float Pixel Data, Pixel Data: never read
_HEX_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def parse_tag(spec: str) -> tuple[BaseTag, str]:
    """Return (tag, sidecar key) for a keyword, `(gggg,eeee)`, `gggg,eeee` or `ggggeeee`.

    The key is the keyword when the data dictionary has one for exactly this tag, else the tag
    as `GGGG,EEEE`. Raises `InvalidTag` for anything else.
    """
    text = spec.strip()
    match = _HEX_TAG.match(text)
    if match:
        tag = BaseTag(int(match.group(1) + match.group(2), 16))
        try:
            keyword = dictionary_keyword(tag)
        except KeyError:  # private, or not in pydicom's dictionary
            keyword = ""
        if keyword and tag_for_keyword(keyword) == tag:  # repeating groups (60xx) have none
            return tag, keyword
        return tag, _tag_key(tag)
    if _KEYWORD.match(text):
        found = tag_for_keyword(text)
        if found is not None:
            return BaseTag(found), text
    raise InvalidTag(
        f"unknown tag {spec!r}: use a DICOM keyword (PatientWeight) or a tag ((0010,1030))"
    )


def _tag_key(tag: int) -> str:
    return f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to read and how to key it, resolved once per set of extra tags."""

    fields: tuple[tuple[str, BaseTag], ...]  # (sidecar key, tag), in output order
    raw_fields: tuple[tuple[str, int], ...]  # the same with plain int tags
    wanted: frozenset[int]  # data set tags to keep while scanning (charset included)
    meta_wanted: frozenset[int]  # file meta (group 0002) tags to keep
    max_tag: int  # scanning stops at the first top-level tag above this

    def stop_when(self, tag: int, vr: str | None, length: int) -> bool:
        """pydicom's `stop_when` callback: the same stop rule as the fast scan."""
        return int.__gt__(tag, self.max_tag)


@lru_cache(maxsize=64)
def _plan(extra: tuple[str, ...]) -> _Plan:
    fields: dict[str, BaseTag] = {}
    for keyword in SIDECAR_KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        fields[keyword] = BaseTag(tag)
    seen = set(fields.values())
    for spec in extra:
        tag, key = parse_tag(spec)
        if tag not in seen:
            fields[key] = tag
            seen.add(tag)
    # Plain ints: BaseTag compares in Python code, which the scan loop cannot afford.
    data_tags = {int(tag) for tag in seen if tag >> 16 != 2}
    return _Plan(
        fields=tuple(fields.items()),
        raw_fields=tuple((key, int(tag)) for key, tag in fields.items()),
        wanted=frozenset(data_tags | {_CHARSET}),
        meta_wanted=frozenset(int(tag) for tag in seen if tag >> 16 == 2),
        max_tag=min(max(data_tags), _PIXEL_TAGS_START - 1),
    )


# --- values ------------------------------------------------------------------------------------

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
def _kind(vr: str) -> str | None:
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
def _dictionary_vr(tag: int) -> str:
    """The VR of an element read without one (implicit VR, or UN), as pydicom picks it."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        if tag >> 16 & 1 and 0x0010 <= tag & 0xFFFF <= 0x00FF:
            return "LO"  # private creator
        return "UL" if tag & 0xFFFF == 0 else "UN"  # group length; else unknowable


@lru_cache(maxsize=256)
def _python_encodings(charset: bytes) -> tuple[str, ...]:
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


def _convert_raw(vr: str, data: bytes, encodings: Sequence[str]) -> Any:
    """The sidecar form of a little-endian encoded value; None means leave it out.

    Mirrors pydicom's converters (`pydicom.values`) for each VR, including what padding they
    strip, and uses pydicom's `decode_bytes` for text in the Specific Character Set.
    """
    kind = _kind(vr)
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
        return _pack([_tag_key(g << 16 | e) for g, e in struct.iter_unpack("<HH", data)])
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


def _convert_element(vr: str, value: Any) -> Any:
    """The sidecar form of a value pydicom has already converted; None means leave it out."""
    kind = _kind(vr)
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
        return _tag_key(value)
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


def extract_tags(
    ds: Dataset, *, transfer_syntax: str | None = None, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """The sidecar object (SPEC §3) for a dataset, e.g. the one a C-STORE request carries.

    TransferSyntaxUID is `transfer_syntax` when given, else the one in `ds.file_meta`.
    `extra` adds keywords or tags (`PatientWeight`, `(0019,100A)`, `0019100A`); an unknown one
    raises `InvalidTag`. An element that cannot be decoded at all raises `UnreadableDicom`.
    Elements pydicom has not converted yet are converted from their bytes, which is several
    times faster than letting pydicom do it and gives the same result.
    """
    meta = getattr(ds, "file_meta", None)
    return _extract(ds, meta, transfer_syntax, _plan(tuple(extra)))


def _extract(
    ds: Dataset, meta: Dataset | None, transfer_syntax: str | None, plan: _Plan
) -> dict[str, Any]:
    sidecar: dict[str, Any] = {}
    present = ds.keys()
    meta_present = meta.keys() if meta is not None else set()
    for key, tag in plan.fields:
        if transfer_syntax and key == "TransferSyntaxUID":
            sidecar[key] = str(transfer_syntax)
            continue
        if tag in present:
            source = ds
        elif tag in meta_present and meta is not None:
            source = meta
        else:
            continue
        try:
            value = _value(source, tag)
        except UnreadableDicom:
            raise
        except Exception as exc:  # a third-party decoder fed untrusted bytes; see module doc
            raise UnreadableDicom(f"cannot decode {key} {tag}: {exc}") from exc
        if value is not None:
            sidecar[key] = value
    return sidecar


def _value(ds: Dataset, tag: BaseTag) -> Any:
    element = ds.get_item(tag)
    if isinstance(element, RawDataElement) and element.is_little_endian:
        vr = element.VR
        if vr is None or vr == "UN":
            vr = _dictionary_vr(tag)
        return _convert_raw(vr, element.value or b"", _encodings(ds))
    converted = ds[tag]
    return _convert_element(converted.VR, converted.value)


def _encodings(ds: Dataset) -> Sequence[str]:
    """The Python codecs pydicom would decode `ds`'s text with."""
    charset = ds.original_character_set
    if not charset:
        specific = ds.get("SpecificCharacterSet")
        charset = convert_encodings(specific) if specific else default_encoding
    return [charset] if isinstance(charset, str) else charset


# --- reading files -----------------------------------------------------------------------------

_FIRST_READ = 64 * 1024  # enough for the header of nearly every instance
_MAX_IN_MEMORY = 16 * 1024 * 1024  # past this, a header that does not fit goes to pydicom
_MAX_DEPTH = 64  # sequence nesting; deeper input is treated as malformed
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_RAW_START_GROUPS = frozenset({0x0000, 0x0002, 0x0008})  # how a data set without header begins
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(vr.encode() for vr in STANDARD_VR) - _LONG_VRS
_VR_NAMES = {str(vr).encode(): str(vr) for vr in STANDARD_VR}
_TAG_LENGTH = struct.Struct("<HHL")  # implicit VR element header; also every item header
_EXPLICIT = struct.Struct("<HH2sH")
_UINT32 = struct.Struct("<L")


_Raw = dict[int, tuple[bytes | None, bytes]]  # tag: (VR as written, or None; value)


class _Short(Exception):
    """The scan needs bytes past the end of the buffer (truncated, or read more)."""


class _Fallback(Exception):
    """Something the fast scan leaves to pydicom."""


def read_tags(
    source: str | os.PathLike[str] | BinaryIO, *, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """The sidecar object (SPEC §3) of a DICOM file, read as little of the file as possible.

    `source` is a path or a binary file object positioned at the start of the DICOM data: a
    Part 10 file, or a bare data set (no preamble) beginning with group 0000, 0002 or 0008.
    Raises `UnreadableDicom` for anything that is not readable DICOM, including an empty
    sidecar; `InvalidTag` for a bad `extra`.
    """
    plan = _plan(tuple(extra))
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as fp:
                sidecar = _read(fp, plan)
        else:
            sidecar = _read(source, plan)
    except OSError as exc:
        raise UnreadableDicom(exc.strerror or str(exc)) from exc
    if not sidecar:
        raise UnreadableDicom("no DICOM attributes found")
    return sidecar


def _read(fp: BinaryIO, plan: _Plan) -> dict[str, Any]:
    start = fp.tell()
    size = fp.seek(0, io.SEEK_END) - start
    fp.seek(start)
    buf = fp.read(min(size, _FIRST_READ))
    size = size if len(buf) == min(size, _FIRST_READ) else len(buf)
    if buf[128:132] != b"DICM":
        if not _looks_like_data_set(buf):
            raise UnreadableDicom("not a DICOM file: no DICM prefix and no data set")
        return _read_with_pydicom(_whole(fp, start, buf, size), plan, force=True)
    while True:
        try:
            return _sidecar(_scan_part10(buf, plan), plan)
        except _Fallback:
            return _read_with_pydicom(_whole(fp, start, buf, size), plan, force=False)
        except _Short:
            if len(buf) >= size:
                message = f"truncated: the data ends inside an element (at byte {size})"
                raise UnreadableDicom(message) from None
            if len(buf) >= _MAX_IN_MEMORY:  # a huge header: let pydicom stream it
                fp.seek(start)
                return _read_with_pydicom(fp, plan, force=False)
            fp.seek(start)
            buf = fp.read(min(size, _MAX_IN_MEMORY))


def _whole(fp: BinaryIO, start: int, buf: bytes, size: int) -> BinaryIO:
    """A stream for pydicom: the whole input in memory when small, else the file itself."""
    if size <= _MAX_IN_MEMORY:
        return io.BytesIO(buf + fp.read(size - len(buf)))
    fp.seek(start)
    return fp


def _looks_like_data_set(buf: bytes) -> bool:
    if len(buf) < 8:
        return False
    little, big = struct.unpack_from("<H", buf)[0], struct.unpack_from(">H", buf)[0]
    return little in _RAW_START_GROUPS or big in _RAW_START_GROUPS


def _read_with_pydicom(fp: BinaryIO, plan: _Plan, *, force: bool) -> dict[str, Any]:
    specific: list[BaseTag | int] = list(plan.wanted)
    try:
        ds = read_partial(fp, plan.stop_when, force=force, specific_tags=specific)
    except Exception as exc:  # pydicom raises a dozen types on bad input; see module doc
        raise UnreadableDicom(f"cannot parse DICOM data ({type(exc).__name__}: {exc})") from exc
    return _extract(ds, ds.file_meta, None, plan)


def _scan_part10(buf: bytes, plan: _Plan) -> _Raw:
    """The fast path: a Part 10 file, explicit or implicit VR little endian, all in `buf`."""
    elements, pos = _scan_meta(buf, plan.meta_wanted)
    syntax = elements.get(_TRANSFER_SYNTAX, (None, b""))[1].decode("ascii", "replace")
    syntax = syntax.strip(" \0")
    if not syntax or syntax in _SLOW_SYNTAXES or syntax in PrivateTransferSyntaxes:
        raise _Fallback  # pydicom guesses, swaps bytes, inflates
    implicit = syntax == ImplicitVRLittleEndian
    _check_first_element(buf, pos, implicit)
    elements.update(_scan_data_set(buf, pos, implicit, plan))
    return elements


def _sidecar(elements: _Raw, plan: _Plan) -> dict[str, Any]:
    """Convert the scanned raw elements, in sidecar order."""
    charset = elements.get(_CHARSET)
    try:
        encodings = _python_encodings(charset[1]) if charset else (default_encoding,)
    except Exception as exc:  # only with pydicom's reading_validation_mode = RAISE
        raise UnreadableDicom(f"cannot decode SpecificCharacterSet: {exc}") from exc
    sidecar: dict[str, Any] = {}
    for key, tag in plan.raw_fields:
        found = elements.get(tag)
        if found is None:
            continue
        written, data = found
        vr = _VR_NAMES.get(written) if written is not None else None
        if vr is None or vr == "UN":
            vr = _dictionary_vr(tag)
        try:
            value = _convert_raw(vr, data, encodings)
        except Exception as exc:  # pydicom's decoder fed untrusted bytes; see module doc
            raise UnreadableDicom(f"cannot decode {key} {_tag_key(tag)}: {exc}") from exc
        if value is not None:
            sidecar[key] = value
    return sidecar


# Transfer syntaxes whose data set is not little endian as stored (every other one is).
_SLOW_SYNTAXES = frozenset({ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})


def _check_first_element(buf: bytes, pos: int, implicit: bool) -> None:
    """Leave command sets and a VR encoding that contradicts the transfer syntax to pydicom."""
    if pos + 8 > len(buf):
        return
    if buf[pos : pos + 2] == b"\0\0":
        raise _Fallback
    looks_explicit = 0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B
    if looks_explicit == implicit:
        raise _Fallback


def _scan_meta(buf: bytes, wanted: frozenset[int]) -> tuple[_Raw, int]:
    found: _Raw = {}
    pos, n = 132, len(buf)
    while pos + 8 <= n and buf[pos : pos + 2] == b"\x02\x00":
        group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise _Short
            length = _UINT32.unpack_from(buf, pos + 8)[0]
            start = pos + 12
        elif vr in _SHORT_VRS:
            start = pos + 8
        else:
            raise _Fallback
        if length == _UNDEFINED:
            raise _Fallback
        end = start + length
        if end > n:
            raise _Short
        tag = group << 16 | elem
        if tag in wanted:
            found[tag] = (vr, buf[start:end])
        pos = end
    if pos < n < pos + 8:
        raise _Short
    return found, pos


def _scan_data_set(buf: bytes, pos: int, implicit: bool, plan: _Plan) -> _Raw:
    """Collect the wanted top-level elements, skipping the rest without decoding it.

    The hot loop of `receive`: one unpack and a few int compares per element. A value that
    runs past the buffer is caught by the next unpack failing, or by the check at the end.
    """
    scan = _scan_implicit if implicit else _scan_explicit
    found: _Raw = {}
    try:
        pos = scan(buf, pos, plan.wanted, plan.max_tag, found)
    except struct.error:
        raise _Short from None
    if pos > len(buf):
        raise _Short
    return found


def _scan_explicit(buf: bytes, pos: int, wanted: frozenset[int], max_tag: int, found: _Raw) -> int:
    n, unpack, unpack_length = len(buf), _EXPLICIT.unpack_from, _UINT32.unpack_from
    short_vrs, long_vrs = _SHORT_VRS, _LONG_VRS
    while pos < n:
        group, elem, vr, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag > max_tag:
            return pos
        if vr in short_vrs:
            start = pos + 8
        elif vr in long_vrs:
            length = unpack_length(buf, pos + 8)[0]
            start = pos + 12
            if length == _UNDEFINED:
                pos = _skip_items(buf, start, vr == b"UN", 0)
                continue
        else:
            raise _Fallback  # pydicom guesses: implicit VR switch, unknown VR
        pos = start + length
        if tag in wanted:
            found[tag] = (vr, buf[start:pos])
    return pos


def _scan_implicit(buf: bytes, pos: int, wanted: frozenset[int], max_tag: int, found: _Raw) -> int:
    n, unpack = len(buf), _TAG_LENGTH.unpack_from
    while pos < n:
        group, elem, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag > max_tag:
            return pos
        if length == _UNDEFINED:
            pos = _skip_items(buf, pos + 8, True, 0)
            continue
        start, pos = pos + 8, pos + 8 + length
        if tag in wanted:
            found[tag] = (None, buf[start:pos])
    return pos


def _skip_items(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip an undefined-length value (sequence or encapsulated): items up to the delimiter."""
    if depth > _MAX_DEPTH:
        raise UnreadableDicom("sequences nested too deeply")
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise _Short
        group, elem, length = _TAG_LENGTH.unpack_from(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Fallback
        if length == _UNDEFINED:
            pos = _skip_item(buf, pos, implicit, depth + 1)
        else:
            pos += length


def _skip_item(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item up to its delimiter."""
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise _Short
        group, elem, length = _TAG_LENGTH.unpack_from(buf, pos)
        if (group << 16 | elem) == _ITEM_END:
            return pos + 8
        vr, start = b"", pos + 8
        if not implicit:
            vr = buf[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    raise _Short
                length = _UINT32.unpack_from(buf, pos + 8)[0]
                start = pos + 12
            elif vr in _SHORT_VRS:
                length = length >> 16  # the 2-byte length after the VR
            else:
                raise _Fallback
        if length == _UNDEFINED:
            pos = _skip_items(buf, start, implicit or vr == b"UN", depth + 1)
        else:
            pos = start + length
