"""Sidecar extraction (mercli/tags/__init__.py) and `mercli tags`, on real files only.

pydicom's bundled corpus is the conformance suite: every file gives a sidecar of the documented
shape, and the fast scanner agrees with pydicom's own reader on every one of them.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from mercli.commands.cmd_tags import tags as tags_command
from mercli.errors import ExitCode
from mercli.tags import (
    SIDECAR_KEYWORDS,
    InvalidTag,
    UnreadableDicom,
    extract_tags,
    parse_tag,
    read_tags,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd corpus files

CORPUS = sorted({Path(p) for p in get_testdata_files() + get_charset_files() if Path(p).is_file()})
BY_NAME = {p.name: p for p in CORPUS}
CHARSET_DIR = Path(pydicom.data.__file__).parent / "charset_files"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


# --- building files byte by byte ---------------------------------------------------------------

_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF


def elem(tag: int, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit VR little endian element; text values are padded to even length."""
    if length is None and len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    size = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, size) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), size) + value


def implicit(tag: int, value: bytes, *, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, size) + value


def item(body: bytes, *, undefined: bool = True) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + body + _delimiter(0xE00D)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def _delimiter(elem_number: int) -> bytes:
    return struct.pack("<HHL", 0xFFFE, elem_number, 0)


def sequence(tag: int, *items: bytes) -> bytes:
    """An undefined-length explicit VR sequence."""
    head = struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, UNDEFINED)
    return head + b"".join(items) + _delimiter(0xE0DD)


def part10(body: bytes, syntax: str = EXPLICIT_LE) -> bytes:
    meta = elem(0x00020010, "UI", syntax.encode())
    meta = elem(0x00020000, "UL", struct.pack("<L", len(meta))) + meta
    return b"\0" * 128 + b"DICM" + meta + body


def minimal(*elements: bytes, syntax: str = EXPLICIT_LE) -> bytes:
    """A Part 10 instance with SOP Class and Instance UID plus `elements` (in tag order)."""
    head = elem(0x00080016, "UI", CT_SOP_CLASS.encode())
    head += elem(0x00080018, "UI", b"1.2.3.4")
    return part10(head + b"".join(elements), syntax)


def write(tmp_path: Path, data: bytes, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the documented shape ----------------------------------------------------------------------

_INT_VRS = {"IS", "US", "UL", "SS", "SL", "SV", "UV"}
_FLOAT_VRS = {"DS", "FL", "FD"}


def assert_shape(sidecar: dict[str, Any]) -> None:
    """JSON-able, flat, typed per VR, nothing empty, SIDECAR_KEYWORDS order first."""
    assert sidecar, "an empty sidecar is an error, never a result"
    text = json.dumps(sidecar, ensure_ascii=False, allow_nan=False)
    assert json.loads(text) == sidecar
    known = [key for key in sidecar if key in SIDECAR_KEYWORDS]
    assert known == sorted(known, key=SIDECAR_KEYWORDS.index)
    for key, value in sidecar.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list):
            assert len(value) > 1 and any(v != "" for v in value), key
        else:
            assert value != "", key
        tag = tag_for_keyword(key)
        vr = dictionary_VR(tag) if tag is not None else None
        for v in values:
            assert type(v) in (str, int, float), (key, v)
            if isinstance(v, float):
                assert math.isfinite(v), key
            if vr in _INT_VRS and isinstance(v, str):
                assert v == "" or not _parses_as_int(v), (key, v)
            elif vr in _FLOAT_VRS and isinstance(v, str):
                assert v == "" or not math.isfinite(_float_or_nan(v)), (key, v)
            elif vr == "DS":
                assert isinstance(v, float), key
            elif vr not in _INT_VRS and vr not in _FLOAT_VRS and vr is not None:
                assert isinstance(v, str), (key, v)


def _parses_as_int(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def pydicom_sidecar(path: Path, extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The sidecar from values pydicom itself read and converted; None if it cannot.

    Touching each element first makes pydicom convert it (its charset handling, its padding
    rules), so extract_tags only maps the converted values: an independent check of the byte
    level conversion read_tags does.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        for keyword in SIDECAR_KEYWORDS + extra:
            tag = parse_tag(keyword)[0]
            (ds.file_meta if tag >> 16 == 2 else ds).get(tag)
        sidecar = extract_tags(ds, extra=extra)
    except Exception:
        return None
    return sidecar or None


# --- the corpus --------------------------------------------------------------------------------


def test_corpus_is_there() -> None:
    assert len(CORPUS) > 150
    assert "CT_small.dcm" in BY_NAME and "chrX1.dcm" in BY_NAME


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_file(path: Path) -> None:
    """Every corpus file is readable with the documented shape, or unreadable by us and
    useless to pydicom too; and the fast scanner agrees with pydicom's reader."""
    expected = pydicom_sidecar(path)
    try:
        sidecar = read_tags(path)
    except UnreadableDicom:
        assert expected is None
        return
    assert_shape(sidecar)
    assert sidecar == expected


def test_most_of_the_corpus_is_readable() -> None:
    readable = 0
    for path in CORPUS:
        try:
            read_tags(path)
        except UnreadableDicom:
            continue
        readable += 1
    assert readable > 140


def test_ct_small() -> None:
    sidecar = read_tags(BY_NAME["CT_small.dcm"])
    assert sidecar["Modality"] == "CT"
    assert sidecar["PatientName"] == "CompressedSamples^CT1"
    assert sidecar["SliceThickness"] == 5.0 and isinstance(sidecar["SliceThickness"], float)
    assert sidecar["SeriesNumber"] == 1 and isinstance(sidecar["SeriesNumber"], int)
    assert sidecar["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert sidecar["TransferSyntaxUID"] == EXPLICIT_LE
    assert sidecar["SOPClassUID"] == CT_SOP_CLASS
    # Present in the file but empty: left out.
    for empty in ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName"):
        assert empty not in sidecar
    assert list(sidecar) == [key for key in SIDECAR_KEYWORDS if key in sidecar]


def test_receive_metadata_is_not_added_here() -> None:
    sidecar = read_tags(BY_NAME["CT_small.dcm"])
    for key in ("SenderAET", "SenderAddress", "ReceiverAET", "ReceivedAt"):
        assert key not in sidecar


@pytest.mark.parametrize(
    ("name", "patient_name"),
    [
        ("chrArab.dcm", "قباني^لنزار"),
        ("chrFren.dcm", "Buc^Jérôme"),
        ("chrGerm.dcm", "Äneas^Rüdiger"),
        ("chrGreek.dcm", "Διονυσιος"),
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        ("chrHbrw.dcm", "שרון^דבורה"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
        ("chrJapMulti.dcm", "やまだ^たろう"),
        ("chrKoreanMulti.dcm", "김희중"),
        # The file really mixes Latin c, e, y, p into the Cyrillic (FileInfo.txt bytes).
        ("chrRuss.dcm", b"\xbb\xee\xdace\xdc\xd1yp\xd3".decode("iso8859_5")),
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
        ("chrX2.dcm", "Wang^XiaoDong=王^小东"),
    ],
)
def test_character_sets(name: str, patient_name: str) -> None:
    sidecar = read_tags(CHARSET_DIR / name)
    assert sidecar["PatientName"] == patient_name
    line = json.dumps(sidecar, ensure_ascii=False)
    assert patient_name in line  # UTF-8 text, not \\u escapes
    line.encode("utf-8")


def test_multi_valued_text_in_a_character_set() -> None:
    sidecar = read_tags(
        CHARSET_DIR / "chrFrenMulti.dcm", extra=["OtherPatientNames", "OtherPatientIDs"]
    )
    assert sidecar["OtherPatientNames"] == ["Buc^Jérôme", "Buc^Jérôme"]
    assert sidecar["OtherPatientIDs"] == ["eggs", "spam"]
    assert sidecar["ReferringPhysicianName"] == "^^^^"  # empty components, not an empty value


def test_japanese_study_description() -> None:
    assert read_tags(CHARSET_DIR / "chrJapMulti.dcm")["StudyDescription"] == "Chest"


def test_raw_data_sets_without_header() -> None:
    little = read_tags(BY_NAME["rtstruct.dcm"])
    assert little["Modality"] == "RTSTRUCT" and "TransferSyntaxUID" not in little
    big = read_tags(BY_NAME["ExplVR_BigEndNoMeta.dcm"])
    assert big["Modality"] == "RTPLAN"
    assert big == read_tags(BY_NAME["ExplVR_LitEndNoMeta.dcm"])


def test_big_endian_and_deflate() -> None:
    assert read_tags(BY_NAME["MR_small_bigendian.dcm"])["SeriesNumber"] == 1
    deflated = read_tags(BY_NAME["image_dfl.dcm"])
    assert deflated["TransferSyntaxUID"] == "1.2.840.10008.1.2.1.99"
    assert deflated["Modality"] == "OT"


def test_truncated_in_pixel_data_gives_the_full_sidecar() -> None:
    # MR_truncated.dcm ends inside Pixel Data, which the sidecar never reads.
    assert read_tags(BY_NAME["MR_truncated.dcm"]) == read_tags(BY_NAME["MR_small.dcm"])


def test_file_object_and_path_give_the_same(tmp_path: Path) -> None:
    path = BY_NAME["CT_small.dcm"]
    assert read_tags(io.BytesIO(path.read_bytes())) == read_tags(path)
    assert read_tags(str(path)) == read_tags(path)
    with path.open("rb") as fp:
        assert read_tags(fp) == read_tags(path)


def test_extract_tags_from_a_dataset() -> None:
    ds = pydicom.dcmread(BY_NAME["CT_small.dcm"])
    assert extract_tags(ds) == read_tags(BY_NAME["CT_small.dcm"])
    assert extract_tags(ds, transfer_syntax="1.2.840.10008.1.2")["TransferSyntaxUID"] == (
        "1.2.840.10008.1.2"
    )


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_extract_tags_from_a_c_store_data_set(implicit_vr: bool) -> None:
    """What receive does: the data set as pynetdicom decodes it, syntax from the context."""
    from pynetdicom.dsutils import decode, encode

    for path in (BY_NAME["CT_small.dcm"], CHARSET_DIR / "chrH32.dcm"):
        original = pydicom.dcmread(path)
        encoded = encode(original, implicit_vr, True)
        assert encoded is not None
        ds = decode(io.BytesIO(encoded), implicit_vr, True)
        syntax = ImplicitVRLittleEndian if implicit_vr else EXPLICIT_LE
        sidecar = extract_tags(ds, transfer_syntax=syntax)
        assert sidecar == read_tags(path) | {"TransferSyntaxUID": syntax}


def test_extract_tags_from_a_dataset_built_in_memory() -> None:
    ds = Dataset()
    ds.PatientName = "Müller^Jörg"
    ds.SeriesNumber = 7
    ds.SliceThickness = "2.5"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.StudyDescription = ""
    sidecar = extract_tags(ds)
    assert sidecar == {
        "PatientName": "Müller^Jörg",
        "SeriesNumber": 7,
        "ImageType": ["DERIVED", "SECONDARY"],
        "SliceThickness": 2.5,
    }
    assert list(sidecar) == ["PatientName", "SeriesNumber", "ImageType", "SliceThickness"]


# --- numbers, empties, multiple values ---------------------------------------------------------

SERIES_NUMBER, INSTANCE_NUMBER, SLICE_THICKNESS = 0x00200011, 0x00200013, 0x00180050


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"12", 12),
        (b" 12 ", 12),
        (b"-3", -3),
        (b"1.0", 1),
        (b"abc", "abc"),
        (b"1.5", "1.5"),
        (b"1\\abc\\3", [1, "abc", 3]),
        (b"1\\\\3", [1, "", 3]),
    ],
)
def test_integer_strings(tmp_path: Path, raw: bytes, expected: object) -> None:
    path = write(tmp_path, minimal(elem(SERIES_NUMBER, "IS", raw)))
    assert read_tags(path)["SeriesNumber"] == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"5", 5.0),
        (b"5.000000", 5.0),
        (b"2.50", 2.5),
        (b" 0.625 ", 0.625),
        (b"-1e2", -100.0),
        (b"abc", "abc"),
        (b"nan", "nan"),
        (b"Inf", "Inf"),
        (b"1e400", "1e400"),
        (b"1\\2.5", [1.0, 2.5]),
    ],
)
def test_decimal_strings(tmp_path: Path, raw: bytes, expected: object) -> None:
    path = write(tmp_path, minimal(elem(SLICE_THICKNESS, "DS", raw)))
    value = read_tags(path)["SliceThickness"]
    assert value == expected
    assert type(value) is type(expected)


def test_ds_is_always_a_float(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(elem(SLICE_THICKNESS, "DS", b"3")))
    assert json.dumps(read_tags(path)["SliceThickness"]) == "3.0"


def test_binary_numbers(tmp_path: Path) -> None:
    rows, frame_rate, t1, time_range = 0x00280010, 0x00089459, 0x00180013, 0x00081163
    data = minimal(
        elem(frame_rate, "FL", struct.pack("<f", 0.1)),
        elem(time_range, "FD", struct.pack("<2d", 1.5, math.nan)),
        elem(t1, "FL", struct.pack("<f", math.inf)),
        elem(rows, "US", struct.pack("<H", 512)),
    )
    extra = ["Rows", "RecommendedDisplayFrameRateInFloat", "TimeRange", "(0018,0013)"]
    sidecar = read_tags(write(tmp_path, data), extra=extra)
    assert sidecar["Rows"] == 512
    assert sidecar["RecommendedDisplayFrameRateInFloat"] == 0.1  # shortest float32 decimal
    assert sidecar["TimeRange"] == [1.5, "nan"]
    assert sidecar["ContrastBolusT1Relaxivity"] == "inf"
    assert_shape(sidecar)


def test_float32_extremes(tmp_path: Path) -> None:
    biggest = struct.unpack("<f", struct.pack("<f", 3.4028234663852886e38))[0]
    values = struct.pack("<4f", biggest, -biggest, 1e-45, 16777217)
    data = minimal(elem(0x00089459, "FL", values))
    sidecar = read_tags(write(tmp_path, data), extra=["RecommendedDisplayFrameRateInFloat"])
    assert sidecar["RecommendedDisplayFrameRateInFloat"] == [
        3.4028235e38,
        -3.4028235e38,
        1e-45,
        16777216.0,
    ]


def test_binary_number_of_the_wrong_length_is_left_out(tmp_path: Path) -> None:
    data = minimal(
        elem(0x00280010, "US", b"\x01\x02\x03", length=3),
        elem(0x00280011, "US", b"\x01\x02\x03\x04"),
    )
    sidecar = read_tags(write(tmp_path, data), extra=["Rows", "Columns"])
    assert "Rows" not in sidecar
    assert sidecar["Columns"] == [513, 1027]


@pytest.mark.parametrize("raw", [b"", b"  ", b"\0\0", b"\\", b"\\\\ "])
def test_empty_values_are_absent(tmp_path: Path, raw: bytes) -> None:
    data = minimal(
        elem(0x00080008, "CS", raw),
        elem(0x00081030, "LO", raw),
        elem(0x00100010, "PN", raw),
        elem(SLICE_THICKNESS, "DS", raw),
        elem(SERIES_NUMBER, "IS", raw),
    )
    sidecar = read_tags(write(tmp_path, data))
    assert list(sidecar) == ["SOPClassUID", "SOPInstanceUID", "TransferSyntaxUID"]


def test_multi_valued_image_type_is_a_list(tmp_path: Path) -> None:
    data = minimal(elem(0x00080008, "CS", b"ORIGINAL\\PRIMARY\\LOCALIZER"))
    assert read_tags(write(tmp_path, data))["ImageType"] == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    data = minimal(elem(0x00080008, "CS", b"ORIGINAL"))
    assert read_tags(write(tmp_path, data))["ImageType"] == "ORIGINAL"
    data = minimal(elem(0x00080008, "CS", b"ORIGINAL\\\\AXIAL"))
    assert read_tags(write(tmp_path, data))["ImageType"] == ["ORIGINAL", "", "AXIAL"]


def test_backslash_in_long_text_is_not_a_delimiter(tmp_path: Path) -> None:
    data = minimal(elem(0x00204000, "LT", b"C:\\scans\\today  "))
    assert read_tags(write(tmp_path, data))["ImageComments"] == "C:\\scans\\today"


def test_sequences_and_binary_are_skipped(tmp_path: Path) -> None:
    data = minimal(
        elem(0x00080060, "CS", b"MR"),
        sequence(0x00081140, item(elem(0x00081150, "UI", b"1.2"))),
        elem(0x00100010, "PN", b"Doe^Jane"),
        elem(0x00191010, "OB", b"\x00\x01\x02\x03"),
    )
    extra = ["ReferencedImageSequence", "(0019,1010)"]
    sidecar = read_tags(write(tmp_path, data), extra=extra)
    assert sidecar["Modality"] == "MR" and sidecar["PatientName"] == "Doe^Jane"
    assert "ReferencedImageSequence" not in sidecar and "0019,1010" not in sidecar


def test_undefined_length_sequences_are_skipped(tmp_path: Path) -> None:
    nested = sequence(0x00400275, item(elem(0x00321060, "LO", b"inner")), item(b""))
    defined = item(elem(0x00081150, "UI", b"1.2") + nested, undefined=False)
    data = minimal(
        elem(0x00080060, "CS", b"CT"),
        sequence(0x00081140, item(elem(0x00081150, "UI", b"1.2") + nested), defined),
        elem(0x00100010, "PN", b"After^Sequence"),
        elem(0x00100020, "LO", b"ID42"),
    )
    sidecar = read_tags(write(tmp_path, data))
    assert sidecar["PatientName"] == "After^Sequence"
    assert sidecar["PatientID"] == "ID42"
    assert sidecar == pydicom_sidecar(tmp_path / "x.dcm")


def test_implicit_vr(tmp_path: Path) -> None:
    body = (
        implicit(0x00080016, CT_SOP_CLASS.encode())
        + implicit(0x00080018, b"1.2.3.4\0")
        + implicit(0x00080060, b"MR")
        + implicit(
            0x00081140, item(implicit(0x00081150, b"1.2\0")) + _delimiter(0xE0DD), length=UNDEFINED
        )
        + implicit(0x00100010, b"Doe^John")
        + implicit(SERIES_NUMBER, b"3 ")
        + implicit(0x00191001, b"\x01\x02")  # private: no VR known, skipped
    )
    path = write(tmp_path, part10(body, ImplicitVRLittleEndian))
    sidecar = read_tags(path, extra=["(0019,1001)"])
    assert sidecar["Modality"] == "MR"
    assert sidecar["PatientName"] == "Doe^John"
    assert sidecar["SeriesNumber"] == 3
    assert sidecar["TransferSyntaxUID"] == ImplicitVRLittleEndian
    assert "0019,1001" not in sidecar
    assert sidecar == pydicom_sidecar(path)


def test_pydicom_written_files(tmp_path: Path) -> None:
    for syntax in (ImplicitVRLittleEndian, EXPLICIT_LE, ExplicitVRBigEndian):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT_SOP_CLASS
        ds.SOPInstanceUID = "1.2.3"
        ds.PatientName = "Ωμέγα^Ἀλφα"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesNumber = 12
        ds.MagneticFieldStrength = 1.5
        path = tmp_path / f"{syntax}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sidecar = read_tags(path)
        assert sidecar == {
            "SOPClassUID": CT_SOP_CLASS,
            "SOPInstanceUID": "1.2.3",
            "TransferSyntaxUID": syntax,
            "PatientName": "Ωμέγα^Ἀλφα",
            "SeriesNumber": 12,
            "ImageType": ["DERIVED", "SECONDARY"],
            "MagneticFieldStrength": 1.5,
        }


def test_unknown_character_set_does_not_fail(tmp_path: Path) -> None:
    data = part10(
        elem(0x00080005, "CS", b"ISO_IR 999")
        + elem(0x00080016, "UI", CT_SOP_CLASS.encode())
        + elem(0x00100010, "PN", "Jérôme".encode("latin-1"))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_tags(write(tmp_path, data))["PatientName"] == "Jérôme"  # pydicom's default


def test_bytes_invalid_in_the_character_set_are_replaced(tmp_path: Path) -> None:
    data = part10(
        elem(0x00080005, "CS", b"ISO_IR 192")
        + elem(0x00080016, "UI", CT_SOP_CLASS.encode())
        + elem(0x00100010, "PN", b"Bad\xff^Name")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert read_tags(write(tmp_path, data))["PatientName"] == "Bad\ufffd^Name"


# --- extra tags --------------------------------------------------------------------------------


def test_extra_tags() -> None:
    path = BY_NAME["CT_small.dcm"]
    extra = ["PatientWeight", "(0019,1002)", "00191003", "(0019,101a)"]
    sidecar = read_tags(path, extra=extra)
    assert sidecar["PatientWeight"] == 0.0
    assert sidecar["0019,1002"] == 912  # private SL
    assert sidecar["0019,1003"] == 373.75  # private DS
    assert sidecar["0019,101A"] == "I"
    assert list(sidecar)[-4:] == ["PatientWeight", "0019,1002", "0019,1003", "0019,101A"]
    assert sidecar == pydicom_sidecar_with(path, extra)


def pydicom_sidecar_with(path: Path, extra: list[str]) -> dict[str, Any] | None:
    return pydicom_sidecar(path, tuple(extra))


def test_extra_tags_past_the_usual_stop_are_read() -> None:
    path = BY_NAME["CT_small.dcm"]
    ds = pydicom.dcmread(path)
    late = next(e.tag for e in ds if e.tag.group == 0x0043 and e.VR in ("SS", "DS", "LO"))
    key = f"{late.group:04X},{late.element:04X}"
    sidecar = read_tags(path, extra=[key, "Rows", "BitsStored"])
    assert sidecar["Rows"] == 128 and sidecar["BitsStored"] == 16
    assert key in sidecar
    assert sidecar == pydicom_sidecar_with(path, [key, "Rows", "BitsStored"])


def test_extra_tag_from_the_file_meta() -> None:
    extra = ["SourceApplicationEntityTitle", "ImplementationVersionName"]
    sidecar = read_tags(CHARSET_DIR / "chrFrenMulti.dcm", extra=extra)
    assert sidecar["SourceApplicationEntityTitle"] == "CLUNIE1"
    assert sidecar["ImplementationVersionName"] == "DCTOOL100"


def test_extra_tag_that_repeats_a_default_is_not_doubled() -> None:
    sidecar = read_tags(BY_NAME["CT_small.dcm"], extra=["Modality", "(0010,0010)"])
    assert list(sidecar) == list(read_tags(BY_NAME["CT_small.dcm"]))


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("PatientWeight", "PatientWeight"),
        ("(0010,1030)", "PatientWeight"),
        ("0010,1030", "PatientWeight"),
        ("00101030", "PatientWeight"),
        (" (0010, 1030) ", "PatientWeight"),
        ("(0019,10a0)", "0019,10A0"),
        ("(6000,0010)", "6000,0010"),  # repeating group: no single keyword
        ("FrameIncrementPointer", "FrameIncrementPointer"),
    ],
)
def test_parse_tag(spec: str, key: str) -> None:
    assert parse_tag(spec)[1] == key


@pytest.mark.parametrize("spec", ["Bogus", "", "(0010,10300)", "0010-1030", "PatientWeight!"])
def test_parse_tag_rejects(spec: str) -> None:
    with pytest.raises(InvalidTag) as caught:
        parse_tag(spec)
    assert caught.value.exit_code == ExitCode.USAGE
    with pytest.raises(InvalidTag):
        read_tags(BY_NAME["CT_small.dcm"], extra=[spec])


def test_attribute_tag_values(tmp_path: Path) -> None:
    data = minimal(elem(0x00280009, "AT", struct.pack("<HHHH", 0x0018, 0x1063, 0x0018, 0x1065)))
    sidecar = read_tags(write(tmp_path, data), extra=["FrameIncrementPointer"])
    assert sidecar["FrameIncrementPointer"] == ["0018,1063", "0018,1065"]


# --- what is not DICOM -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a DICOM file"),
        (b"hello world\n" * 20, "not a DICOM file"),
        (b"\0" * 128 + b"DICM", "no DICOM attributes found"),
        (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI", "truncated"),
    ],
)
def test_not_dicom(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(UnreadableDicom, match=reason) as caught:
        read_tags(write(tmp_path, data))
    assert caught.value.exit_code == ExitCode.SOME_FAILED


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UnreadableDicom, match="No such file or directory"):
        read_tags(tmp_path / "nope.dcm")
    with pytest.raises(UnreadableDicom, match="Is a directory"):
        read_tags(tmp_path)


def test_truncated_inside_the_header(tmp_path: Path) -> None:
    data = BY_NAME["CT_small.dcm"].read_bytes()
    name_at = data.index(b"CompressedSamples^CT1")
    for cut in (name_at + 5, name_at - 3, 200, 140):
        with pytest.raises(UnreadableDicom, match="truncated"):
            read_tags(io.BytesIO(data[:cut]))


def test_truncated_inside_a_sequence(tmp_path: Path) -> None:
    data = minimal(
        sequence(0x00081140, item(elem(0x00081150, "UI", b"1.2.3.4.5.6"))),
        elem(0x00100010, "PN", b"Doe^Jane"),
    )
    cut_at = data.index(b"1.2.3.4.5.6") + 4
    with pytest.raises(UnreadableDicom, match="truncated"):
        read_tags(io.BytesIO(data[:cut_at]))


def test_deeply_nested_sequences(tmp_path: Path) -> None:
    body = elem(0x00100020, "LO", b"ID")
    for _ in range(500):
        body = sequence(0x00081140, item(body))
    data = minimal(elem(0x00080060, "CS", b"CT"), body)
    with pytest.raises(UnreadableDicom, match="nested too deeply"):
        read_tags(write(tmp_path, data))


def test_garbage_after_the_header_prefix(tmp_path: Path) -> None:
    data = b"\0" * 128 + b"DICM" + bytes(range(256)) * 4
    with pytest.raises(UnreadableDicom):
        read_tags(write(tmp_path, data))


# --- big files ---------------------------------------------------------------------------------


def test_a_1gb_file_is_not_read_into_memory(tmp_path: Path) -> None:
    header = minimal(
        elem(0x00080060, "CS", b"MR"),
        elem(0x00280008, "IS", b"4000"),
        elem(0x00280010, "US", struct.pack("<H", 512)),
    )
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, (1 << 30) - 1024)
    path = tmp_path / "big.dcm"
    with path.open("wb") as fp:
        fp.write(header + pixel_header)
        fp.truncate(1 << 30)  # sparse: costs no disk
    tracemalloc.start()
    try:
        sidecar = read_tags(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sidecar["NumberOfFrames"] == 4000 and sidecar["Modality"] == "MR"
    assert peak < 2 * 1024 * 1024


def test_a_huge_element_before_the_wanted_tags(tmp_path: Path) -> None:
    """A 20 MB private blob in the header: read in part, then streamed by pydicom."""
    blob = 20 * 1024 * 1024
    head = minimal(elem(0x00080060, "CS", b"US"))
    blob_header = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, blob)
    tail = elem(0x00100010, "PN", b"After^Blob") + elem(0x00280008, "IS", b"2")
    path = tmp_path / "blob.dcm"
    with path.open("wb") as fp:
        fp.write(head + blob_header)
        fp.seek(blob, io.SEEK_CUR)
        fp.write(tail)
    tracemalloc.start()
    try:
        sidecar = read_tags(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sidecar["PatientName"] == "After^Blob" and sidecar["NumberOfFrames"] == 2
    assert peak < 40 * 1024 * 1024


# --- robustness: never anything but UnreadableDicom, never a hang -------------------------------

SAMPLES = [
    BY_NAME[name].read_bytes()
    for name in (
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "rtplan.dcm",
        "rtstruct.dcm",
        "image_dfl.dcm",
        "chrH31.dcm",
        "nested_priv_SQ.dcm",
        "UN_sequence.dcm",
        "JPEG2000.dcm",
    )
]
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def outcome(data: bytes) -> dict[str, Any] | None:
    """read_tags's result, checked; None when it (properly) raised UnreadableDicom."""
    try:
        sidecar = read_tags(io.BytesIO(data))
    except UnreadableDicom as exc:
        assert str(exc)
        return None
    json.loads(json.dumps(sidecar, ensure_ascii=False, allow_nan=False))
    return sidecar


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    outcome(data)


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_after_a_valid_header(data: bytes) -> None:
    outcome(part10(data))
    outcome(part10(data, ImplicitVRLittleEndian))


@pytest.mark.timeout(60)
@FUZZ
@given(st.sampled_from(SAMPLES), st.floats(min_value=0, max_value=1))
def test_truncated_real_files(data: bytes, fraction: float) -> None:
    outcome(data[: int(len(data) * fraction)])


@pytest.mark.timeout(60)
@FUZZ
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 8000), st.binary(min_size=1, max_size=4)), max_size=8),
)
def test_corrupted_real_files(data: bytes, patches: list[tuple[int, bytes]]) -> None:
    mutable = bytearray(data)
    for offset, patch in patches:
        offset %= len(mutable)
        mutable[offset : offset + len(patch)] = patch
    outcome(bytes(mutable))


# --- the command -------------------------------------------------------------------------------


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(tags_command, [str(a) for a in args])


def test_command_prints_ndjson() -> None:
    files = [BY_NAME["CT_small.dcm"], CHARSET_DIR / "chrGreek.dcm", BY_NAME["MR_small.dcm"]]
    result = run(*files)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line, path in zip(lines, files, strict=True):
        expected = read_tags(path)
        assert line == json.dumps(expected, ensure_ascii=False, separators=(",", ":"))
    assert "Διονυσιος" in lines[1]  # UTF-8, not \\u escapes


def test_command_indent() -> None:
    path = BY_NAME["CT_small.dcm"]
    result = run("--indent", "2", path)
    assert result.exit_code == 0
    assert result.stdout == json.dumps(read_tags(path), ensure_ascii=False, indent=2) + "\n"


def test_command_extra() -> None:
    path = BY_NAME["CT_small.dcm"]
    result = run("--extra", "PatientWeight", "--extra", "(0019,1002)", path)
    assert result.exit_code == 0
    sidecar = json.loads(result.stdout)
    assert list(sidecar)[-2:] == ["PatientWeight", "0019,1002"]


def test_command_keeps_going_and_exits_1(tmp_path: Path) -> None:
    text = write(tmp_path, b"just text\n" * 30, "notes.txt")
    missing = tmp_path / "missing.dcm"
    good = BY_NAME["CT_small.dcm"]
    result = run(text, good, missing, good)
    assert result.exit_code == 1
    assert result.stdout.count("\n") == 2
    assert result.stderr == (
        f"Error: not a DICOM file: no DICM prefix and no data set ({text})\n"
        f"Error: No such file or directory ({missing})\n"
    )


def test_command_verbose_shows_the_traceback(tmp_path: Path) -> None:
    text = write(tmp_path, b"just text\n" * 30, "notes.txt")
    result = run("-v", text)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "UnreadableDicom" in result.stderr


def test_command_usage_errors() -> None:
    assert run().exit_code == ExitCode.USAGE
    result = run("--extra", "Bogus", BY_NAME["CT_small.dcm"])
    assert result.exit_code == ExitCode.USAGE
    assert "unknown tag 'Bogus'" in result.stderr
    assert run("--indent", "-1", BY_NAME["CT_small.dcm"]).exit_code == ExitCode.USAGE


def test_command_help() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "sidecar" in result.stdout and "NAME.tags" in result.stdout
    assert "receive" in result.stdout
