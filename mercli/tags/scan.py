"""The fast element scanner behind `read_tags` (mercli/tags/read.py): a Part 10 file in explicit or
implicit VR little endian, held in one buffer, read element by element with `struct`.

Only the bytes of the wanted elements are kept (`Raw`: tag to VR as written and value bytes);
everything else is skipped without decoding, undefined-length values item by item, and the scan
stops at the first top-level tag above the plan's last one. `Short` means the scan needs bytes
past the end of the buffer (read more, or the file is truncated); `Fallback` means the input is
something this scanner leaves to pydicom (big endian, deflate, unknown VRs, command sets).
Damage both readers and DCMTK reject raises `UnreadableDicom` directly.
"""

from __future__ import annotations

import struct

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

from mercli.tags.spec import TRANSFER_SYNTAX, Plan, UnreadableDicom

__all__ = ["MAX_DEPTH", "UNDEFINED", "VR_NAMES", "Fallback", "Raw", "Short", "scan_part10"]

MAX_DEPTH = 64  # undefined-length sequences nested deeper than this: malformed
UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(vr.encode() for vr in STANDARD_VR) - _LONG_VRS
VR_NAMES = {str(vr).encode(): str(vr) for vr in STANDARD_VR}
_TAG_LENGTH = struct.Struct("<HHL")  # implicit VR element header; also every item header
_EXPLICIT = struct.Struct("<HH2sH")
_UINT32 = struct.Struct("<L")
Raw = dict[int, tuple[bytes | None, bytes]]  # tag: (VR as written, or None; value)


class Short(Exception):
    """The scan needs bytes past the end of the buffer (truncated, or read more)."""


class Fallback(Exception):
    """Something the fast scan leaves to pydicom."""


def scan_part10(buf: bytes, plan: Plan, *, complete: bool = True) -> Raw:
    """The fast path: a Part 10 file, explicit or implicit VR little endian, in `buf`.

    `complete` says `buf` holds the whole file; if not, a scan that reaches the end of `buf`
    without passing the last tag wanted raises `Short` (read more), even when `buf` happens to
    end exactly between two elements: that is where the buffer ends, not the data set.
    """
    elements, pos = _scan_meta(buf, plan.meta_wanted)
    syntax = elements.get(TRANSFER_SYNTAX, (None, b""))[1].decode("ascii", "replace")
    syntax = syntax.strip(" \0")
    if not syntax or syntax in _SLOW_SYNTAXES or syntax in PrivateTransferSyntaxes:
        raise Fallback  # pydicom guesses, swaps bytes, inflates
    implicit = _data_set_is_implicit(buf, pos, syntax == ImplicitVRLittleEndian)
    elements.update(_scan_data_set(buf, pos, implicit, plan, complete))
    return elements


# Transfer syntaxes whose data set is not little endian as stored (every other one is).
_SLOW_SYNTAXES = frozenset({ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian})


def _data_set_is_implicit(buf: bytes, pos: int, implicit: bool) -> bool:
    """Whether the data set is implicit VR: as the transfer syntax says, unless its first
    element says otherwise (two upper-case letters where a VR goes, or not), which is how
    pydicom and DCMTK (`dcmAutoDetectDatasetXfer`) read such files too. Command sets go to
    pydicom."""
    if pos + 8 > len(buf):
        return implicit
    if buf[pos : pos + 2] == b"\0\0":
        raise Fallback
    return not (0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B)


def _explicit_value(buf: bytes, pos: int, vr: bytes, short_length: int) -> tuple[int, int]:
    """Length and start of the value of the explicit-VR element header at `pos`, given the
    2-byte length that follows a short VR (the hot loops inline this)."""
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise Short
        return _UINT32.unpack_from(buf, pos + 8)[0], pos + 12
    if vr in _SHORT_VRS:
        return short_length, pos + 8
    raise Fallback


def _scan_meta(buf: bytes, wanted: frozenset[int]) -> tuple[Raw, int]:
    found: Raw = {}
    pos, n = 132, len(buf)
    while pos + 8 <= n and buf[pos : pos + 2] == b"\x02\x00":
        group, elem, vr, short_length = _EXPLICIT.unpack_from(buf, pos)
        length, start = _explicit_value(buf, pos, vr, short_length)
        if length == UNDEFINED:
            raise Fallback
        end = start + length
        if end > n:
            raise Short
        tag = group << 16 | elem
        if tag in wanted:
            found[tag] = (vr, buf[start:end])
        pos = end
    if pos < n < pos + 8:
        raise Short
    return found, pos


def _scan_data_set(buf: bytes, pos: int, implicit: bool, plan: Plan, complete: bool) -> Raw:
    """Collect the wanted top-level elements, skipping the rest without decoding it.

    The hot loop of `receive`: one unpack and a few int compares per element. A value that
    runs past the buffer is caught by the next unpack failing, or by the check at the end.
    """
    scan = _scan_implicit if implicit else _scan_explicit
    found: Raw = {}
    try:
        pos = scan(buf, pos, plan.wanted, plan.max_tag, found)
    except struct.error:
        raise Short from None
    if pos > len(buf) or (pos == len(buf) and not complete):
        raise Short
    return found


def _scan_explicit(buf: bytes, pos: int, wanted: frozenset[int], max_tag: int, found: Raw) -> int:
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
            if length == UNDEFINED:
                pos = _skip_items(buf, start, vr == b"UN", 0)
                continue
        else:
            raise Fallback  # pydicom guesses: implicit VR switch, unknown VR
        pos = start + length
        if vr == b"SQ":
            _check_items(buf, start, pos)
        if tag in wanted:
            found[tag] = (vr, buf[start:pos])
    return pos


def _scan_implicit(buf: bytes, pos: int, wanted: frozenset[int], max_tag: int, found: Raw) -> int:
    n, unpack = len(buf), _TAG_LENGTH.unpack_from
    while pos < n:
        group, elem, length = unpack(buf, pos)
        tag = group << 16 | elem
        if tag > max_tag:
            return pos
        if length == UNDEFINED:
            pos = _skip_items(buf, pos + 8, True, 0)
            continue
        start, pos = pos + 8, pos + 8 + length
        if tag in wanted:
            found[tag] = (None, buf[start:pos])
    return pos


def _skip_items(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip an undefined-length value (sequence or encapsulated): items up to the delimiter.

    `depth` counts the undefined-length sequences this one is nested in (0 at top level)."""
    if depth >= MAX_DEPTH:
        raise UnreadableDicom("sequences nested too deeply")
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise Short
        group, elem, length = _TAG_LENGTH.unpack_from(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise Fallback
        if length == UNDEFINED:
            pos = _skip_item(buf, pos, implicit, depth)
        else:
            pos += length


def _check_items(buf: bytes, pos: int, end: int) -> None:
    """A defined-length sequence holds items and nothing else.

    Their contents are not read (neither tool needs them); DCMTK rejects a sequence whose
    value is not items, so the scan does too.
    """
    if end > len(buf):
        raise Short
    while pos + 8 <= end:  # an item longer than its sequence: DCMTK reads on, so do we
        group, elem, length = _TAG_LENGTH.unpack_from(buf, pos)
        if (group << 16 | elem) != _ITEM:
            raise UnreadableDicom("malformed sequence: its value is not items")
        if length == UNDEFINED:
            raise Fallback  # an undefined-length item in a defined-length sequence
        pos += 8 + length
    if pos < end:  # a value too short for an item header: DCMTK finds no items, no delimiter
        raise UnreadableDicom("malformed sequence: its value is not items")


def _skip_item(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item up to its delimiter."""
    n = len(buf)
    while True:
        if pos + 8 > n:
            raise Short
        group, elem, length = _TAG_LENGTH.unpack_from(buf, pos)
        if (group << 16 | elem) == _ITEM_END:
            return pos + 8
        vr, start = b"", pos + 8
        if not implicit:
            vr = buf[pos + 4 : pos + 6]
            length, start = _explicit_value(buf, pos, vr, length >> 16)  # 2-byte length after VR
        if length == UNDEFINED:
            pos = _skip_items(buf, start, implicit or vr == b"UN", depth + 1)
        else:
            pos = start + length
