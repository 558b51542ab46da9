"""Damaged files that `read_tags` and `build/getdcmtags` once read differently, one small
hand-made file per class of damage (the classes tests/reliability/test_hostile_input.py found).

The rule both tools follow: a file whose header (everything up to NumberOfFrames) can be read
to its end is readable, whatever comes after (a cut in the pixel data, trailing garbage); damage
inside the header makes the file unreadable, in both tools, whichever reader (the fast scan or
pydicom) read it. Each test asserts the expected outcome in both tools, not only that they agree.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mercli.tags import UnreadableDicom, read_tags
from tests.kit import GETDCMTAGS
from tests.reliability.hostile import EXPLICIT, IMPLICIT, Element, encode, file_meta, nested

SOP = "1.2.826.0.1.3680043.9.77.1"
SERIES, STUDY = f"{SOP}.1", f"{SOP}.2"
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def header(charset: Element | None = None, name: Element | None = None) -> list[Element]:
    """The elements of a small CT header, in tag order."""
    elements = [
        Element(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
        Element(0x00080018, b"UI", SOP.encode()),
        Element(0x00080060, b"CS", b"CT"),
        name or Element(0x00100010, b"PN", b"Doe^John"),
        Element(0x0020000D, b"UI", STUDY.encode()),
        Element(0x0020000E, b"UI", SERIES.encode()),
        Element(0x00200013, b"IS", b"7 "),
    ]
    return ([charset] if charset else []) + elements


def write(
    tmp_path: Path, elements: list[Element], *, syntax: str = EXPLICIT, implicit: bool | None = None
) -> Path:
    """A Part 10 file whose meta names `syntax`; the data set is encoded implicit or not as
    `implicit` says (default: as the syntax says), then 64 bytes of pixel data."""
    implicit = syntax == IMPLICIT if implicit is None else implicit
    data = b"".join(encode(e, implicit) for e in elements)
    data += encode(Element(0x7FE00010, b"OW", bytes(64)), implicit)
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm"
    path.write_bytes(file_meta(SOP, syntax) + data)
    return path


def both(path: Path) -> dict[str, Any] | None:
    """The sidecar both tools print, or None when both say unreadable; fails if they differ."""
    try:
        ours: dict[str, Any] | None = read_tags(path)
    except UnreadableDicom:
        ours = None
    printed = subprocess.run(
        [str(GETDCMTAGS), str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert printed.returncode in (0, 1), printed.stderr
    theirs = json.loads(printed.stdout) if printed.returncode == 0 else None
    assert ours == theirs, (ours, printed.stderr)
    return ours


@pytest.fixture(autouse=True)
def _built(getdcmtags: Path) -> None:
    """Every test here runs the C++ helper: fail at once when it is not built."""


# --- a value or header that runs past the end of the data --------------------------------------


def test_value_past_the_end_read_by_pydicom_is_unreadable(tmp_path: Path) -> None:
    # A VR that is not two upper-case letters makes pydicom (and DCMTK) switch to implicit
    # VR: `zz` and the 2-byte length become a 4-byte length far past the end of the file.
    # pydicom used to return the short bytes as the value; the fast scan rejects such files.
    elements = header()
    elements[3] = Element(0x00100010, b"zz", b"Doe^John")
    assert both(write(tmp_path, elements)) is None


def test_lying_length_after_an_encoding_switch_is_unreadable(tmp_path: Path) -> None:
    elements = header()
    elements[3] = Element(0x00100010, b"PN", b"Doe^John", length=0xFFFF)
    assert both(write(tmp_path, elements, syntax=IMPLICIT, implicit=False)) is None


def test_cut_inside_the_header_is_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path, header(), syntax=IMPLICIT, implicit=False)
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.index(STUDY.encode()) + 5])
    assert both(path) is None


def test_cut_after_the_header_is_readable(tmp_path: Path) -> None:
    path = write(tmp_path, header(), syntax=IMPLICIT, implicit=False)
    path.write_bytes(path.read_bytes()[:-30])  # inside the pixel data
    sidecar = both(path)
    assert sidecar is not None and sidecar["SeriesInstanceUID"] == SERIES


# --- the data set's encoding contradicts the transfer syntax ----------------------------------


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_encoding_contradicting_the_meta_is_detected(tmp_path: Path, syntax: str) -> None:
    # As pydicom does: the first element tells implicit from explicit VR. DCMTK read the data
    # as the meta said and failed; it now detects too (dcmAutoDetectDatasetXfer).
    path = write(tmp_path, header(), syntax=syntax, implicit=syntax == EXPLICIT)
    sidecar = both(path)
    assert sidecar is not None
    assert sidecar["PatientName"] == "Doe^John" and sidecar["InstanceNumber"] == 7
    assert sidecar["TransferSyntaxUID"] == syntax


# --- sequences -------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize(("depth", "readable"), [(1, True), (64, True), (65, False), (500, False)])
def test_nesting_limit_is_64_sequences(
    tmp_path: Path, syntax: str, depth: int, readable: bool
) -> None:
    # read_tags rejected more than 33 levels (it counted items as levels), getdcmtags had no
    # limit at all: now both stop at 64 undefined-length sequences inside one another.
    implicit = syntax == IMPLICIT
    elements = header()
    data = b"".join(encode(e, implicit) for e in elements[:3])
    data += nested(depth, implicit, True)
    data += b"".join(encode(e, implicit) for e in elements[3:])
    path = tmp_path / "nested.dcm"
    path.write_bytes(file_meta(SOP, syntax) + data)
    sidecar = both(path)
    assert (sidecar is not None) == readable
    if sidecar is not None:
        assert sidecar["InstanceNumber"] == 7


def test_defined_length_sequence_that_is_not_items_is_unreadable(tmp_path: Path) -> None:
    # Modality written as SQ: its two bytes cannot be an item. DCMTK parses the sequence and
    # fails; the fast scan skipped it and so read the file without Modality.
    elements = header()
    elements[2] = Element(0x00080060, b"SQ", b"CT")
    assert both(write(tmp_path, elements)) is None
    elements[2] = Element(0x00080060, b"SQ", b"1.2.3.4.5.6.7.8.9.10")
    assert both(write(tmp_path, elements)) is None


def test_defined_length_sequence_of_items_is_skipped(tmp_path: Path) -> None:
    item = struct.pack("<HHL", ITEM >> 16, ITEM & 0xFFFF, 8) + b"\x08\x00\x50\x11\x00\x00\x00\x00"
    elements = header()
    elements.insert(3, Element(0x00081140, b"SQ", item))
    sidecar = both(write(tmp_path, elements))
    assert sidecar is not None and sidecar["Modality"] == "CT"


def test_undefined_length_text_is_unreadable(tmp_path: Path) -> None:
    # Text cannot have an undefined length; pydicom read PatientName up to the next sequence
    # delimiter it found (here the one after a later sequence), DCMTK rejects the file.
    elements = header()
    elements[3] = Element(0x00100010, b"PN", b"Doe^John", length=0xFFFFFFFF)
    seq_end = struct.pack("<HHL", SEQ_END >> 16, SEQ_END & 0xFFFF, 0)
    elements.insert(4, Element(0x00180015, b"CS", b"HEAD" + seq_end))
    assert both(write(tmp_path, elements, syntax=IMPLICIT)) is None


# --- character sets ------------------------------------------------------------------------------


def test_charset_with_a_wrong_vr_still_decodes(tmp_path: Path) -> None:
    # (0008,0005) written with VR AT: its bytes still name the character set. pydicom failed
    # on it, getdcmtags ignored it (decoding as ISO 8859-1); both now take the bytes as stored.
    charset = Element(0x00080005, b"AT", b"ISO_IR 192")
    name = Element(0x00100010, b"PN", "Müller^Jörg".encode())
    sidecar = both(write(tmp_path, header(charset, name)))
    assert sidecar is not None and sidecar["PatientName"] == "Müller^Jörg"
