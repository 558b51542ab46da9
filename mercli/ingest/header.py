"""What the head of a file says before it is streamed into the spool.

`read_header` looks at the first bytes of a file (or of a zip member): is it DICOM at all, where
does its data set start, in which transfer syntax, and which SOP Class and Instance does it
name. Only what a C-STORE request would carry is read, never decoded further: the data set is
then copied byte for byte behind receive's own Part 10 header (`mercli.receive.handler`), and
receive's sidecar reader parses the result exactly as it parses a received instance.

- A Part 10 file: 128-byte preamble, `DICM`, group 0002 (explicit VR little endian).
- A bare data set (what storescu's `+f`/DCMTK call "data set format"): its first element is in
  group 0000, 0002 (a meta header without preamble) or 0008. Its transfer syntax is the one the
  meta header names, else what the bytes show: explicit VR if the first element carries a VR,
  little or big endian by which reading gives a plausible group.
- The SOP Class and Instance are the data set's (0008,0016)/(0008,0018), as storescu sends
  them, else the meta header's; empty when neither is found (receive's reader then finds the
  UIDs missing and the instance is quarantined, as receive would).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PREAMBLE = 128
HEAD_SIZE = 64 * 1024  # read before deciding anything; the rest is streamed
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_RAW_START_GROUPS = frozenset({0x0000, 0x0002, 0x0008})
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_UNDEFINED = 0xFFFFFFFF


class NotDicom(Exception):
    """Nothing in the head looks like DICOM: the file is skipped, not quarantined."""


class BadHeader(Exception):
    """It looks like DICOM but its header cannot be read (the instance is quarantined)."""


@dataclass(frozen=True)
class Header:
    """Where the data set starts, its transfer syntax, and the SOP it names."""

    dataset_offset: int
    transfer_syntax: str
    sop_class: bytes
    sop_instance: bytes
    meta_sop_class: str = ""  # MediaStorageSOPClassUID (tells a DICOMDIR)

    @property
    def is_dicomdir(self) -> bool:
        return self.meta_sop_class == MEDIA_STORAGE_DIRECTORY


def looks_like_zip(head: bytes) -> bool:
    """A local file header or an empty archive's end record at the start."""
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def read_header(head: bytes) -> Header:
    """The header of the file whose first bytes are `head` (NotDicom, BadHeader)."""
    if head[PREAMBLE : PREAMBLE + 4] == b"DICM":
        return _with_meta(head, PREAMBLE + 4)
    if len(head) < 8:
        raise NotDicom("not DICOM: too short")
    little, big = struct.unpack_from("<H", head)[0], struct.unpack_from(">H", head)[0]
    if little == 0x0002:
        return _with_meta(head, 0)
    if (little in _RAW_START_GROUPS or big in _RAW_START_GROUPS) and _plausible(head):
        return _finish(head, 0, _sniff_syntax(head, 0), {})
    raise NotDicom("not DICOM: no DICM prefix and no data set")


def _plausible(head: bytes) -> bool:
    """Whether the first element of a bare data set looks like one: a known VR, or an
    implicit VR length that fits (an ICC profile or a text file starting with two zero
    bytes is not a data set)."""
    if head[4:6] in _VRS:
        return True
    little, big = struct.unpack_from("<I", head, 4)[0], struct.unpack_from(">I", head, 4)[0]
    return min(little, big) <= len(head) or _UNDEFINED in (little, big)


def _with_meta(head: bytes, start: int) -> Header:
    meta, offset = _read_meta(head, start)
    syntax = meta.get(0x00020010, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    return _finish(head, offset, syntax or _sniff_syntax(head, offset), meta)


def _read_meta(head: bytes, offset: int) -> tuple[dict[int, bytes], int]:
    """Group 0002 elements (explicit VR little endian) and where the data set starts."""
    meta: dict[int, bytes] = {}
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        vr = head[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                break
            length = struct.unpack_from("<I", head, offset + 8)[0]
            start = offset + 12
        else:
            length = struct.unpack_from("<H", head, offset + 6)[0]
            start = offset + 8
        if length == _UNDEFINED or start + length > len(head):
            raise BadHeader(f"file meta element (0002,{element:04X}) runs past the header")
        meta[group << 16 | element] = head[start : start + length]
        offset = start + length
    return meta, offset


def _sniff_syntax(head: bytes, offset: int) -> str:
    """The transfer syntax the data set's first element shows (as pydicom and DCMTK read it)."""
    first = head[offset : offset + 6]
    if len(first) < 6:
        return EXPLICIT_LE
    explicit = first[4:6].isalpha() and first[4:6].isupper()
    little, big_group = struct.unpack_from("<H", first)[0], struct.unpack_from(">H", first)[0]
    big = little not in _RAW_START_GROUPS and big_group in _RAW_START_GROUPS
    if big and explicit:
        return EXPLICIT_BE
    return EXPLICIT_LE if explicit else IMPLICIT_LE


def _finish(head: bytes, offset: int, syntax: str, meta: dict[int, bytes]) -> Header:
    found = {} if syntax in DEFLATED else _dataset_uids(head, offset, syntax)
    meta_class = meta.get(0x00020002, b"").rstrip(b"\x00 ")
    meta_instance = meta.get(0x00020003, b"").rstrip(b"\x00 ")
    return Header(
        dataset_offset=offset,
        transfer_syntax=syntax,
        sop_class=found.get(_SOP_CLASS) or meta_class,
        sop_instance=found.get(_SOP_INSTANCE) or meta_instance,
        meta_sop_class=meta_class.decode("ascii", "replace"),
    )


def _dataset_uids(head: bytes, offset: int, syntax: str) -> dict[int, bytes]:
    """(0008,0016) and (0008,0018) from the top level of the data set, if in the head."""
    order = ">" if syntax == EXPLICIT_BE else "<"
    explicit = _sniff_syntax(head, offset) != IMPLICIT_LE
    found: dict[int, bytes] = {}
    while offset + 8 <= len(head):
        group, element = struct.unpack_from(order + "HH", head, offset)
        tag = group << 16 | element
        if tag > _SOP_INSTANCE:
            break
        if explicit and head[offset + 4 : offset + 6] in _LONG_VRS:
            if offset + 12 > len(head):
                break
            length, start = struct.unpack_from(order + "I", head, offset + 8)[0], offset + 12
        elif explicit:
            length, start = struct.unpack_from(order + "H", head, offset + 6)[0], offset + 8
        else:
            length, start = struct.unpack_from(order + "I", head, offset + 4)[0], offset + 8
        if length == _UNDEFINED or start + length > len(head):
            break
        if tag in (_SOP_CLASS, _SOP_INSTANCE):
            found[tag] = head[start : start + length].rstrip(b"\x00 ")
        offset = start + length
    return found
