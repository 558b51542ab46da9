"""A hypothesis strategy for hostile DICOM: valid file meta, then a data set with truncated
elements, lying lengths (0xFFFFFFFF where it does not belong), deep sequence nesting, wrong
VRs, odd lengths, unknown or broken Specific Character Sets, path-like and over-long UIDs,
and garbage after the data set. Encoded by hand, so nothing "fixes" the damage on the way."""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.kit import CT, EXPLICIT, IMPLICIT, LONG_VRS

MARKER = "mercli-escape-marker"  # every path-like UID carries it; no file name ever may
_serial = itertools.count(1)

CHARSETS = [
    b"ISO_IR 100",
    b"ISO_IR 192",
    b"ISO 2022 IR 87",
    b"\\ISO 2022 IR 87",
    b"ISO 2022 IR 6\\ISO 2022 IR 149",
    b"GB18030",
    b"ISO_IR 999",
    b"ISO-IR 100",
    b"\xff\xfe",
    b"\\\\\\",
    b"ISO_IR 13\\ISO_IR 192",
]
HOSTILE_UIDS = [
    f"../../../../tmp/{MARKER}",
    f"/tmp/{MARKER}",
    f"1.2/../../{MARKER}",
    f"1.2.3\x00../{MARKER}",
    "..",
    ".",
    "1.2." + "9" * 300,
    "1.2.3 ",
    "",
]
WRONG_VRS = [b"SQ", b"UN", b"OB", b"US", b"FD", b"AT", b"\x00\x00", b"zz", b"UT", b"DS"]
BAD_LENGTHS = [0xFFFFFFFF, 0xFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0, 1, 3]


@dataclass(frozen=True)
class Element:
    tag: int
    vr: bytes
    value: bytes
    length: int | None = None  # a lie about the value's length, if set


@dataclass(frozen=True)
class Hostile:
    """One hostile file: its bytes, the transfer syntax its meta names, what was done."""

    data: bytes
    syntax: str
    sop: str  # the SOP Instance UID in the meta (a valid one, so senders can send it)
    damage: tuple[str, ...]


def encode(element: Element, implicit: bool) -> bytes:
    group, number = element.tag >> 16, element.tag & 0xFFFF
    length = len(element.value) if element.length is None else element.length
    if implicit:
        return struct.pack("<HHL", group, number, length & 0xFFFFFFFF) + element.value
    if element.vr in LONG_VRS:
        header = struct.pack("<HH2sHL", group, number, element.vr, 0, length & 0xFFFFFFFF)
    else:
        header = struct.pack("<HH2sH", group, number, element.vr, length & 0xFFFF)
    return header + element.value


def nested(depth: int, implicit: bool, delimited: bool) -> bytes:
    """`depth` levels of undefined-length sequences in undefined-length items."""
    item, item_end = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF), b"\xfe\xff\x0d\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    body = encode(Element(0x00081150, b"UI", b"1.2.3\0"), implicit)
    for _ in range(depth):
        inner = encode(Element(0x00081140, b"SQ", b"", 0xFFFFFFFF), implicit)
        body = inner + item + body + (item_end + seq_end if delimited else b"")
    return body


def file_meta(sop: str, syntax: str) -> bytes:
    def ui(tag: int, value: str) -> bytes:
        raw = value.encode() + (b"\0" if len(value) % 2 else b"")
        return encode(Element(tag, b"UI", raw), False)

    body = encode(Element(0x00020001, b"OB", b"\0\1"), False)
    body += ui(0x00020002, CT) + ui(0x00020003, sop) + ui(0x00020010, syntax)
    length = encode(Element(0x00020000, b"UL", struct.pack("<L", len(body))), False)
    return b"\0" * 128 + b"DICM" + length + body


@st.composite
def hostile_files(draw: st.DrawFn) -> Hostile:
    serial = next(_serial)
    sop = f"1.2.826.0.1.3680043.9.99.{serial:08d}"  # fixed width: replays draw alike
    series, study = f"{sop}.1", f"{sop}.2"
    damage: list[str] = []
    text = st.binary(max_size=40)
    elements = [
        Element(0x00080016, b"UI", CT.encode() + b"\0"),
        Element(0x00080018, b"UI", sop.encode()),
        Element(0x00080060, b"CS", b"CT"),
        Element(0x00081030, b"LO", draw(text)),
        Element(0x00100010, b"PN", draw(text)),
        Element(0x00100020, b"LO", draw(text)),
        Element(0x0020000D, b"UI", study.encode()),
        Element(0x0020000E, b"UI", series.encode()),
        Element(
            0x00200013, b"IS", draw(st.sampled_from([b"1", b"x", b"1.5", b"", b"99999999999"]))
        ),
        Element(0x00280010, b"US", struct.pack("<H", 2)),
    ]
    if draw(st.booleans()):
        charset = draw(st.sampled_from(CHARSETS))
        elements.insert(0, Element(0x00080005, b"CS", charset))
        damage.append(f"charset {charset!r}")
    if draw(st.integers(0, 3)) == 0:
        uid = draw(st.sampled_from(HOSTILE_UIDS))
        where = draw(st.sampled_from([0x0020000E, 0x0020000D, 0x00080018]))
        elements = [Element(e.tag, e.vr, uid.encode()) if e.tag == where else e for e in elements]
        damage.append(f"uid {where:08X}={uid[:20]!r}")
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(elements) - 1))
        if draw(st.booleans()):
            vr = draw(st.sampled_from(WRONG_VRS))
            elements[i] = Element(elements[i].tag, vr, elements[i].value, elements[i].length)
            damage.append(f"vr {elements[i].tag:08X}={vr!r}")
        else:
            lie = draw(st.sampled_from([*BAD_LENGTHS, len(elements[i].value) + 1]))
            elements[i] = Element(elements[i].tag, elements[i].vr, elements[i].value, lie)
            damage.append(f"length {elements[i].tag:08X}={lie:#x}")
    syntax = draw(st.sampled_from([EXPLICIT, IMPLICIT]))
    implicit = syntax == IMPLICIT
    if draw(st.booleans()) and draw(st.booleans()):
        implicit = not implicit  # the data set contradicts the meta
        damage.append("encoding contradicts meta")
    data = b"".join(encode(e, implicit) for e in sorted(elements, key=lambda e: e.tag))
    if draw(st.integers(0, 3)) == 0:
        depth = draw(st.sampled_from([1, 10, 63, 65, 200, 2000]))
        delimited = draw(st.booleans())
        sequence = nested(depth, implicit, delimited)
        data = data[: len(data) // 2] + sequence + data[len(data) // 2 :]
        damage.append(f"nesting {depth} delimited={delimited}")
    pixels = encode(Element(0x7FE00010, b"OW", bytes(64)), implicit)
    data += pixels
    if draw(st.integers(0, 3)) == 0:
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
        damage.append(f"truncated at {cut}")
    if draw(st.integers(0, 3)) == 0:
        data += draw(st.binary(min_size=1, max_size=64))
        damage.append("garbage after")
    return Hostile(file_meta(sop, syntax) + data, syntax, sop, tuple(damage))


# Many elements: DCMTK keeps an item's elements and a sequence's items in linked lists, where
# reaching the i-th by index costs i steps; a reader that indexes them is quadratic in their
# number (getdcmtags once took a minute over a 3 MB header of small elements).
ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)  # an undefined-length item
ITEM_END, SEQ_END = b"\xfe\xff\x0d\xe0\0\0\0\0", b"\xfe\xff\xdd\xe0\0\0\0\0"


def _instance(sop: str, extra: list[tuple[int, bytes]]) -> tuple[bytes, set[int]]:
    """An explicit VR Little Endian CT file: its UIDs and a few text elements, the encoded
    `extra` (tag, bytes) merged in tag order, then 64 bytes of pixel data; and the file
    offsets where its top-level elements end."""
    elements = [
        Element(0x00080016, b"UI", CT.encode() + b"\0"),
        Element(0x00080018, b"UI", sop.encode()),
        Element(0x00080060, b"CS", b"CT"),
        Element(0x00100010, b"PN", b"Doe^John"),
        Element(0x0020000D, b"UI", f"{sop}.2".encode()),
        Element(0x0020000E, b"UI", f"{sop}.1".encode()),
        Element(0x00200013, b"IS", b"7 "),
        Element(0x7FE00010, b"OW", bytes(64)),
    ]
    parts = [part for _, part in sorted([(e.tag, encode(e, False)) for e in elements] + extra)]
    meta = file_meta(sop, EXPLICIT)
    ends = set(itertools.accumulate(map(len, parts), initial=len(meta)))
    return meta + b"".join(parts), ends


def many_elements(sop: str, count: int, *, split_at: int = 65536, between: bool = False) -> bytes:
    """A file whose header holds `count` small private elements (UL, 12 bytes each) in tag
    order, (gggg,1000) to (gggg,FFFF) of the odd groups from 0009 with a private creator for
    block 10 of each: between the meta and the Study and Series UIDs. The first creator is
    padded so that file offset `split_at` (where a reader's first read may end; read_tags'
    is 64 KiB) falls inside an element, or, if `between`, exactly between two of them."""
    extra: list[tuple[int, bytes]] = []
    for group in range(0x0009, 0x0020, 2):
        left = count - len(extra)
        if left <= 0:
            break
        creator = Element(group << 16 | 0x0010, b"LO", b"MERCLI MANY ")
        extra.append((creator.tag, encode(creator, False)))
        for number in range(0x1000, 0x1000 + min(left - 1, 0xF000)):
            value = Element(group << 16 | number, b"UL", struct.pack("<L", number))
            extra.append((value.tag, encode(value, False)))
    if len(extra) < count:
        raise ValueError(f"{count} elements do not fit in the odd groups below 0020")
    data, ends = _instance(sop, extra)
    # Padding the first creator by 2 bytes moves every later element by 2.
    pad = next((p for p in range(0, 12, 2) if (split_at - p in ends) == between), None)
    if pad is None:
        raise ValueError(f"no padding puts offset {split_at} where asked (odd-length UIDs?)")
    if pad:
        creator = Element(0x00090010, b"LO", b"MERCLI MANY " + b" " * pad)
        extra[0] = (creator.tag, encode(creator, False))
        data, ends = _instance(sop, extra)
    assert (split_at in ends) == between
    return data


def many_items(sop: str, count: int) -> bytes:
    """A file whose header holds one undefined-length sequence (0008,1140) of `count`
    undefined-length items of one UI element each."""
    item = ITEM + encode(Element(0x00081150, b"UI", b"1.2\0"), False) + ITEM_END
    sequence = encode(Element(0x00081140, b"SQ", b"", 0xFFFFFFFF), False)
    return _instance(sop, [(0x00081140, sequence + item * count + SEQ_END)])[0]
