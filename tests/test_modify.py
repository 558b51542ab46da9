"""Per-target `modify` tables (SPEC §5.1): parsed when rules are checked, applied at dispatch."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from mercli.dicom.modify import (
    MAX_ENTRIES,
    Modification,
    ModifyError,
    apply_modify,
    parse_modify,
    vm_allows,
)

ROOT = Path(__file__).resolve().parent.parent


def read_testdata(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return pydicom.dcmread(path)


def ct() -> Dataset:
    return read_testdata("CT_small.dcm")


def modified(tmp_path: Path, dataset: Dataset, table: dict[str, object]) -> Dataset:
    """`dataset` with `table` applied, written with save_as and read back."""
    apply_modify(dataset, parse_modify(table))
    dataset.save_as(tmp_path / "out.dcm")
    return pydicom.dcmread(tmp_path / "out.dcm")


def test_set_blank_delete_by_keyword_and_tag(tmp_path: Path) -> None:
    dataset = ct()
    dataset.add_new(0x001910B0, "LO", "private")
    table = {
        "InstitutionName": "RESEARCH",
        "(0019,10B0)": "delete",
        "StationName": "",
        "(0008,1030)": "Study X",
        "WindowCenter": [40, 400],
        "OperatorsName": "delete",
    }
    changes = apply_modify(dataset, parse_modify(table))
    assert changes == [
        "InstitutionName set",
        "(0019,10B0) deleted",
        "StationName blanked",
        "StudyDescription set",
        "WindowCenter set",
    ]  # OperatorsName is absent from CT_small: nothing to delete, nothing listed
    dataset.save_as(tmp_path / "out.dcm")
    back = pydicom.dcmread(tmp_path / "out.dcm")
    assert back.InstitutionName == "RESEARCH"
    assert back.StudyDescription == "Study X"
    assert back["StationName"].VR == "SH" and back.StationName == ""
    assert back.WindowCenter == [40, 400]
    assert 0x001910B0 not in back
    assert back.PatientID == ct().PatientID  # untouched
    assert back.pixel_array.shape == (128, 128)


@pytest.mark.parametrize("key", ["(0008,1030)", "0008,1030", "00081030", "( 0008 , 1030 )"])
def test_tag_spellings(key: str) -> None:
    (modification,) = parse_modify({key: "Study X"})
    assert (modification.tag, modification.keyword, modification.vr) == (
        0x00081030,
        "StudyDescription",
        "LO",
    )


def test_lower_case_hex_and_private_delete() -> None:
    (modification,) = parse_modify({"(0019,10b0)": "delete"})
    assert modification == Modification(0x001910B0, "", "", "delete")
    assert modification.name == "(0019,10B0)"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("WindowCenter", [40, 400.5], ["40", "400.5"]),
        ("PixelSpacing", [0.5, 1 / 3], ["0.5", "0.33333333333333"]),
        ("ImageOrientationPatient", [1, 0, 0, 0, 1, 0], ["1", "0", "0", "0", "1", "0"]),
        ("ImageType", ["DERIVED", "SECONDARY"], ["DERIVED", "SECONDARY"]),
        ("OtherPatientIDs", ["A"], "A"),
        ("Rows", 128, 128),
        ("AcquisitionMatrix", [0, 256, 256, 0], [0, 256, 256, 0]),
        ("SimpleFrameList", [1, 2, 4_000_000_000], [1, 2, 4_000_000_000]),
        ("ReferencePixelX0", -5, -5),
        ("NumberOfFrames", 3, "3"),
        ("NumberOfFrames", "3", "3"),
        ("PatientWeight", 70, "70"),
        ("PatientWeight", "70.5", "70.5"),
        ("DiffusionBValue", 1000, 1000.0),
        ("RecommendedDisplayFrameRateInFloat", 2.5, 2.5),
        ("FrameIncrementPointer", "(0018,1063)", 0x00181063),
        ("LargestImagePixelValue", 4095, 4095),
        ("PatientAge", "042Y", "042Y"),
        ("AcquisitionDateTime", "20240131123000.5", "20240131123000.5"),
        ("StudyDate", "20240131", "20240131"),
        ("ImageComments", "line one\r\nline two \\ three", "line one\r\nline two \\ three"),
    ],
)
def test_values_by_vr(key: str, value: object, expected: object) -> None:
    (modification,) = parse_modify({key: value})
    assert modification.action == "set"
    assert modification.value == expected


def test_numeric_and_multivalued_round_trip(tmp_path: Path) -> None:
    table: dict[str, object] = {
        "PixelSpacing": [0.5, 0.25],
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "RescaleSlope": 2.5,
        "RescaleIntercept": -1024,
        "DiffusionBValue": 1000,
        "RecommendedDisplayFrameRateInFloat": 2.5,
        "ReferencePixelX0": -5,
        "SimpleFrameList": [1, 2, 3],
        "FrameIncrementPointer": ["(0018,1063)", "00181065"],
        "LargestImagePixelValue": 4095,
        "NumberOfFrames": 1,
    }
    back = modified(tmp_path, ct(), table)
    assert back.PixelSpacing == [0.5, 0.25]
    assert back.ImageType == ["DERIVED", "SECONDARY", "AXIAL"]
    assert (back.RescaleSlope, back.RescaleIntercept) == (2.5, -1024)
    assert back.DiffusionBValue == 1000.0
    assert back.RecommendedDisplayFrameRateInFloat == 2.5
    assert back.ReferencePixelX0 == -5
    assert back.SimpleFrameList == [1, 2, 3]
    assert back.FrameIncrementPointer == [0x00181063, 0x00181065]
    assert back.NumberOfFrames == 1
    element = back["LargestImagePixelValue"]
    assert (element.VR, element.value) == ("SS", 4095)  # CT_small: PixelRepresentation 1


def test_blank_creates_an_absent_attribute_and_empties_sequences(tmp_path: Path) -> None:
    dataset = ct()
    assert "OperatorsName" not in dataset and "ContentSequence" not in dataset
    dataset.ContentSequence = [Dataset()]
    table = {"OperatorsName": "", "ContentSequence": "", "Rows": ""}
    assert apply_modify(dataset, parse_modify(table)) == [
        "OperatorsName blanked",
        "ContentSequence blanked",
        "Rows blanked",
    ]
    dataset.save_as(tmp_path / "out.dcm")
    back = pydicom.dcmread(tmp_path / "out.dcm")
    assert back["OperatorsName"].VR == "PN" and back.OperatorsName == ""
    assert back["ContentSequence"].VR == "SQ" and len(back.ContentSequence) == 0
    assert back["Rows"].VR == "US" and back["Rows"].is_empty


def test_deleting_absent_attributes_is_a_no_op() -> None:
    dataset = ct()
    original = copy.deepcopy(dataset)
    table = {"OperatorsName": "delete", "(0019,10B0)": "delete", "(6000,3000)": "delete"}
    assert apply_modify(dataset, parse_modify(table)) == []
    assert dataset == original


def test_only_the_top_level_is_edited(tmp_path: Path) -> None:
    dataset = ct()
    item = Dataset()
    item.InstitutionName = "INNER"
    dataset.ReferencedImageSequence = [item]
    back = modified(tmp_path, dataset, {"InstitutionName": "delete"})
    assert "InstitutionName" not in back
    assert back.ReferencedImageSequence[0].InstitutionName == "INNER"


def test_changes_name_attributes_never_values() -> None:
    dataset = ct()
    changes = apply_modify(dataset, parse_modify({"PatientName": "Secret^Person"}))
    assert changes == ["PatientName set"]
    assert not any("Secret" in change for change in changes)


def test_sop_instance_uid_is_kept_in_step_with_the_file_meta(tmp_path: Path) -> None:
    back = modified(tmp_path, ct(), {"SOPInstanceUID": "1.2.3.4"})
    assert back.SOPInstanceUID == "1.2.3.4"
    assert back.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"


def test_un_and_implicit_attributes_take_the_dictionary_vr(tmp_path: Path) -> None:
    dataset = ct()
    dataset["InstitutionName"] = DataElement(0x00080080, "UN", b"OLD NAME")
    apply_modify(dataset, parse_modify({"InstitutionName": "NEW"}))
    assert dataset["InstitutionName"].VR == "LO"
    implicit = read_testdata("MR_small_implicit.dcm")
    back = modified(tmp_path, implicit, {"InstitutionName": "NEW", "StationName": ""})
    assert back["InstitutionName"].value == "NEW"
    assert back["StationName"].value == ""


def test_another_explicit_vr_is_kept_when_the_value_fits_it() -> None:
    dataset = ct()
    dataset["StudyDescription"] = DataElement(0x00081030, "SH", "short")
    apply_modify(dataset, parse_modify({"StudyDescription": "still short"}))
    assert dataset["StudyDescription"].VR == "SH"
    apply_modify(dataset, parse_modify({"StudyDescription": "longer than sixteen chars"}))
    assert dataset["StudyDescription"].VR == "LO"


def test_non_ascii_values_follow_the_specific_character_set(tmp_path: Path) -> None:
    dataset = ct()  # ISO_IR 100, Latin-1
    back = modified(tmp_path, dataset, {"InstitutionName": "Klinik München"})
    assert back.InstitutionName == "Klinik München"
    with pytest.raises(ModifyError, match=r"'InstitutionName': .*SpecificCharacterSet"):
        apply_modify(ct(), parse_modify({"InstitutionName": "東京病院"}))
    del dataset.SpecificCharacterSet  # the default repertoire: ASCII only
    with pytest.raises(ModifyError, match="SpecificCharacterSet"):
        apply_modify(dataset, parse_modify({"PatientName": "Müller^Anna"}))
    dataset.SpecificCharacterSet = "ISO_IR 192"
    back = modified(tmp_path, dataset, {"InstitutionName": "東京病院"})
    assert back.InstitutionName == "東京病院"


REFUSED = [
    ("InstitutonName", "X", "unknown keyword; did you mean InstitutionName"),
    ("institutionname", "X", "did you mean InstitutionName?"),
    ("OverlayRows", 5, "repeating-group attribute: give its tag, e.g. (6000,0010)"),
    ("(zzzz,0000)", "X", "not a keyword or a tag"),
    ("../", "X", "not a keyword or a tag"),
    ("Pätient", "X", "not a keyword or a tag"),
    ("(0008,103)", "X", "not a keyword or a tag"),
    ("TransferSyntaxUID", "1.2.840.10008.1.2", "file meta group (0002)"),
    ("(0002,0010)", "delete", "file meta group (0002)"),
    ("(0000,0900)", "delete", "command group (0000)"),
    ("(FFFE,E000)", "delete", "item delimitation group (FFFE)"),
    ("(0008,0000)", "delete", "group lengths"),
    ("(0019,0000)", "delete", "group lengths"),
    ("PixelData", "delete", "pixel data"),
    ("(7FE0,0010)", "", "pixel data"),
    ("FloatPixelData", "delete", "pixel data"),
    ("(7FE0,0001)", "delete", "pixel data"),
    ("(7F00,0010)", "delete", "pixel data"),
    ("ReferencedImageSequence", "x", 'a SQ attribute cannot be set, only "delete" or ""'),
    ("ContentSequence", ["x"], "a SQ attribute cannot be set"),
    ("RedPaletteColorLookupTableData", "x", "a OW attribute cannot be set"),
    ("LUTData", [1, 2], "a US or OW attribute cannot be set"),
    ("(0019,10B0)", "X", 'a private attribute: only "delete" is allowed'),
    ("(0019,10B0)", "", 'a private attribute: only "delete" is allowed'),
    ("(0009,0010)", "delete", "private creators cannot be edited"),
    ("(0009,00FF)", "delete", "private creators cannot be edited"),
    ("(0008,FFF0)", "X", 'not in the DICOM dictionary: only "delete" is allowed'),
    ("SpecificCharacterSet", "ISO_IR 192", "how every other text is encoded"),
    ("SOPInstanceUID", "delete", "cannot be removed"),
    ("SOPClassUID", "", "cannot be blanked"),
    ("StationName", True, "a boolean is not a value"),
    ("Rows", False, "a boolean is not a value"),
    ("WindowCenter", [40, True], "a boolean is not a value"),
    ("StationName", {"a": 1}, "a nested table is not a value"),
    ("WindowCenter", [[40], [400]], "a list is not a value"),
    ("StationName", None, "a NoneType is not a value"),
    ("WindowCenter", [], "an empty list"),
    ("Rows", [1, 2], "2 value(s), but the dictionary's VM is 1"),
    ("PixelSpacing", 0.5, "1 value(s), but the dictionary's VM is 2"),
    ("ImageOrientationPatient", [1, 0, 0], "VM is 6"),
    ("ImageType", ["ORIGINAL"], "VM is 2-n"),
    ("StationName", "S" * 17, "exceeds the maximum length of 16"),
    ("InstitutionName", "I" * 65, "exceeds the maximum length of 64"),
    ("PatientName", "A" * 65, "component length (65) exceeds"),
    ("Modality", "ct", "Invalid value for VR CS"),
    ("Modality", "C-T", "Invalid value for VR CS"),
    ("SOPInstanceUID", "1.02.3", "Invalid value for VR UI"),
    ("SOPInstanceUID", "1.2.3.", "Invalid value for VR UI"),
    ("StudyInstanceUID", "1." + "2" * 70, "exceeds the maximum length of 64"),
    ("StudyDate", "2024-01-31", "VR DA"),
    ("StudyDate", "20241331", "VR DA"),
    ("StudyTime", "256000", "VR TM"),
    ("AcquisitionDateTime", "2024x", "VR DT"),
    ("PatientAge", "42Y", "VR AS"),
    ("NumberOfFrames", "1.5", "VR IS"),
    ("NumberOfFrames", 1.5, "an integer is needed"),
    ("NumberOfFrames", 2**31, "out of the range of a 32-bit integer"),
    ("PatientWeight", "seventy", "VR DS"),
    ("PatientWeight", "1e400", "not a finite number"),
    ("PatientWeight", float("nan"), "not a finite number"),
    ("RecommendedDisplayFrameRateInFloat", 1e300, "not a valid FL value"),
    ("DiffusionBValue", float("inf"), "not a finite number"),
    ("DiffusionBValue", "1000", "a number is needed"),
    ("Rows", 70000, "between 0 and 65535"),
    ("Rows", -1, "between 0 and 65535"),
    ("Rows", "128", "an integer is needed"),
    ("Rows", 1.0, "an integer is needed"),
    ("LargestImagePixelValue", 40000, "between -32768 and 32767"),
    ("StationName", 5, "a number; give it as a string"),
    ("FrameIncrementPointer", "PixelData", "a tag, written (gggg,eeee), is needed"),
    ("WindowCenter", "40\\400", "give several values as a list"),
    ("StationName", "A\\B", "give several values as a list"),
    ("StationName", "line\nbreak", "character '\\n' is not allowed"),
    ("ImageComments", "nul\x00", "character '\\x00' is not allowed"),
    ("InstitutionName", "esc\x1b$B", "character '\\x1b' is not allowed"),
]


@pytest.mark.parametrize(("key", "value", "reason"), REFUSED)
def test_refused_entries_name_the_key(key: str, value: object, reason: str) -> None:
    with pytest.raises(ModifyError) as caught:
        parse_modify({key: value})
    message = str(caught.value)
    assert message.startswith(f"{key!r}: "), message
    assert reason in message, message
    assert "Please see" not in message  # pydicom's link to the standard is trimmed
    assert isinstance(caught.value, ValueError)


def test_keys_given_twice_in_different_spellings() -> None:
    with pytest.raises(ModifyError) as caught:
        parse_modify({"StudyDescription": "a", "(0008,1030)": "b"})
    assert str(caught.value) == "'(0008,1030)': the same attribute as 'StudyDescription'"
    with pytest.raises(ModifyError) as caught:
        parse_modify({"0019,10B0": "delete", "(0019,10b0)": "delete"})
    assert str(caught.value) == "'(0019,10b0)': the same attribute as '0019,10B0'"


def test_not_a_table() -> None:
    with pytest.raises(ModifyError, match="must be a table"):
        parse_modify(["InstitutionName"])  # type: ignore[arg-type]
    with pytest.raises(ModifyError, match="a key must be a keyword"):
        parse_modify({5: "x"})  # type: ignore[dict-item]


def test_an_empty_table_changes_nothing() -> None:
    assert parse_modify({}) == ()
    assert apply_modify(ct(), ()) == []


def fast(call: object) -> ModifyError:
    """The ModifyError of `call()`, which must come within a second."""
    assert callable(call)
    started = time.monotonic()
    with pytest.raises(ModifyError) as caught:
        call()
    assert time.monotonic() - started < 1.0
    assert len(str(caught.value)) < 300
    return caught.value


def test_hostile_tables_are_refused_fast_and_clearly() -> None:
    error = fast(lambda: parse_modify({"InstitutionName": "x" * 10_000_000}))
    assert str(error) == "'InstitutionName': 10000000 characters; at most 10240 are allowed"
    error = fast(lambda: parse_modify({"TextValue": ["x"] * 100_000}))
    assert "100000 values; at most 256" in str(error)
    error = fast(lambda: parse_modify({f"Key{n}": "x" for n in range(1000)}))
    assert str(error) == f"1000 entries; at most {MAX_ENTRIES} are allowed"
    error = fast(lambda: parse_modify({"K" * 10_000_000: "x"}))
    assert "too long for a keyword or a tag" in str(error)
    assert str(error).endswith("'...: too long for a keyword or a tag")
    error = fast(lambda: parse_modify({"Institution\x1b[31mName": "x"}))
    assert "\x1b" not in str(error) and "\\x1b" in str(error)  # escaped, for terminals
    for key in ["(zzzz,0000)", "../../etc/passwd", "名前", "", " ", "(0008,0080", "0x00080080"]:
        fast(lambda key=key: parse_modify({key: "x"}))
    fast(lambda: parse_modify({f"(0008,{n:04X})": "delete" for n in range(MAX_ENTRIES + 1)}))


def test_a_full_table_is_accepted() -> None:
    table = {f"(0019,{0x1000 + n:04X})": "delete" for n in range(MAX_ENTRIES)}
    assert len(parse_modify(table)) == MAX_ENTRIES


@pytest.mark.parametrize(
    ("vm", "allowed", "refused"),
    [
        ("1", [1], [0, 2]),
        ("2", [2], [1, 3]),
        ("1-3", [1, 2, 3], [0, 4]),
        ("1-n", [1, 2, 100], [0]),
        ("2-n", [2, 5], [1]),
        ("2-2n", [2, 4, 6], [1, 3, 5]),
        ("3-3n", [3, 6, 9], [1, 4, 8]),
    ],
)
def test_vm_allows(vm: str, allowed: list[int], refused: list[int]) -> None:
    assert all(vm_allows(vm, count) for count in allowed)
    assert not any(vm_allows(vm, count) for count in refused)


def test_importing_the_module_does_not_import_pydicom() -> None:
    code = "import mercli.dicom.modify, sys; print('pydicom' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
