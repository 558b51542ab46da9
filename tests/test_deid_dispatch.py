"""`deidentify = "basic"` on a target (SPEC §5.1, issue 20): dispatch sends a private,
de-identified copy of each job, keyed by the target's secret; the received files and another
target's copies stay byte-identical; a burned-in instance fails the job, naming it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from mercli.deid.model import Profile
from mercli.dicom.modify import parse_modify
from mercli.dispatch.edits import DEFER_SIZE, EditPlan, save
from mercli.errors import ConfigError
from mercli.rules.config import load_rules
from mercli.spool import ERROR, SUCCESS, Spool
from mercli.tags import read_tags
from tests.test_dispatch import dispatch_once, routed

STUDY = "1.2.9"  # what tests.test_dispatch.routed gives every series
RULES = """
[targets.research]
type = "folder"
path = "research"
deidentify = "basic"
deidentify_options = {options}
pseudonym_secret_file = "pseudo.key"

[targets.clear]
type = "folder"
path = "clear"

[[rules]]
name = "all"
targets = ["research", "clear"]
"""


def rules_file(tmp_path: Path, options: str = '["retain-longitudinal-dates"]') -> Path:
    key = tmp_path / "pseudo.key"
    key.write_bytes(b"a-secret-of-more-than-16-bytes\n")
    key.chmod(0o600)
    path = tmp_path / "rules.toml"
    path.write_text(RULES.format(options=options))
    return path


def delivered(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def test_the_research_target_gets_a_deidentified_copy_and_nothing_else_changes(
    tmp_path: Path, spool: Spool
) -> None:
    files = routed(tmp_path, spool, rules_file(tmp_path), {"1.2.40": 3})
    originals = {p.name: p.read_bytes() for p in files}
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    research, clear = delivered(tmp_path / "research"), delivered(tmp_path / "clear")
    assert len(research) == len(clear) == 3
    assert sorted(p.read_bytes() for p in clear) == sorted(originals.values())
    for item in spool.items(SUCCESS):  # the spool's copies: never edited
        for path in item.path.glob("*.dcm"):
            assert path.read_bytes() in originals.values()
    old_uids = {str(dcmread(p).SOPInstanceUID) for p in files}
    for path in research:
        ds = dcmread(path)
        assert str(ds.SOPInstanceUID) not in old_uids and path.stem == str(ds.SOPInstanceUID)
        assert str(ds.StudyInstanceUID) != STUDY and ds.PatientIdentityRemoved == "YES"
        assert "Test^Patient" not in str(ds.PatientName) and ds.PatientID != "P001"
        sidecar = json.loads(path.with_suffix(".tags").read_text())
        assert sidecar["SOPInstanceUID"] == str(ds.SOPInstanceUID)
        raw = path.read_bytes() + path.with_suffix(".tags").read_bytes()
        assert b"Test^Patient" not in raw and b"P001" not in raw
        assert not any(uid.encode() in raw for uid in old_uids)


def test_the_same_study_gets_the_same_new_uids_in_every_job(tmp_path: Path, spool: Spool) -> None:
    routed(tmp_path, spool, rules_file(tmp_path), {"1.2.41": 1, "1.2.42": 1})
    assert dispatch_once(spool).returncode == 0
    studies = {str(dcmread(p).StudyInstanceUID) for p in delivered(tmp_path / "research")}
    assert len(studies) == 1 and STUDY not in studies


def test_a_burned_in_instance_fails_the_job_naming_it(tmp_path: Path, spool: Spool) -> None:
    rules = rules_file(tmp_path)
    files = routed(tmp_path, spool, rules, {"1.2.43": 1})
    ds = dcmread(files[0])
    ds.BurnedInAnnotation = "YES"
    for item in Spool(spool.root).items("outgoing"):
        job = json.loads((item.path / "job.json").read_text())
        if job["target"]["name"] == "research":
            (instance,) = item.path.glob("*.dcm")
            instance.unlink()
            ds.save_as(instance)
    assert dispatch_once(spool).returncode == 1
    (failed,) = spool.items(ERROR)
    reason = json.loads((failed.path / "error.json").read_text())["reason"]
    assert "BurnedInAnnotation" in reason or "burned" in reason.lower()
    assert not delivered(tmp_path / "research")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('["retain-everything"]', 'unknown option "retain-everything"'),
        (
            '["retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"]',
            "full and modified dates exclude each other",
        ),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_rules(rules_file(tmp_path, options))


def test_deidentify_needs_a_secret_and_options_need_deidentify(tmp_path: Path) -> None:
    path = rules_file(tmp_path)
    path.write_text(path.read_text().replace('pseudonym_secret_file = "pseudo.key"\n', ""))
    with pytest.raises(ConfigError, match='needs "pseudonym_secret_file"'):
        load_rules(path)
    path.write_text(path.read_text().replace('deidentify = "basic"\n', ""))
    with pytest.raises(ConfigError, match='"deidentify_options" needs deidentify = "basic"'):
        load_rules(path)
    ok = load_rules(rules_file(tmp_path)).targets["research"]
    assert ok.deidentify_options == ("retain-longitudinal-full-dates",)  # the SPEC's alias


# -- the writer that copies pixel data unread (mercli.dispatch.edits.save) ---------------------

PROFILE_SECRET = b"a-secret-of-more-than-16-bytes\n"


def edited_both_ways(
    source: Path, tmp_path: Path, plan: EditPlan, defer: int
) -> tuple[bytes, bytes, bytes | None] | None:
    """(what `save_as` writes of the fully read, edited instance; what `save` writes of it
    read with `defer`; the header `save` gave), or None if the full path cannot edit it."""
    try:
        full = dcmread(source)
        plan.edit(full)
        full.save_as(tmp_path / "full.dcm", enforce_file_format=True)
    except Exception:  # not one the current path handles: nothing to compare
        return None
    deferred = dcmread(source, defer_size=defer)
    plan.edit(deferred)
    header = save(deferred, source, tmp_path / "fast.dcm")
    found = ((tmp_path / "full.dcm").read_bytes(), (tmp_path / "fast.dcm").read_bytes(), header)
    (tmp_path / "full.dcm").unlink()
    (tmp_path / "fast.dcm").unlink()
    return found


@pytest.mark.parametrize("defer", [256, DEFER_SIZE])
def test_copying_pixel_data_unread_writes_what_save_as_writes_for_the_corpus(
    tmp_path: Path, defer: int
) -> None:
    plan = EditPlan(profile=Profile(secret=PROFILE_SECRET, allow_burned_in=True))
    copied = compared = 0
    for path in sorted(get_testdata_files("*")):
        if not path.endswith((".dcm", ".DCM")) and "." in Path(path).name:
            continue
        found = edited_both_ways(Path(path), tmp_path, plan, defer)
        if found is None:
            continue
        full, fast, header = found
        assert fast == full, path
        compared += 1
        if header is not None:
            copied += 1
            assert fast.startswith(header)
            assert read_tags(io.BytesIO(header)) == read_tags(io.BytesIO(fast)), path
    assert compared > 50
    assert copied > (30 if defer == 256 else 3)


def with_trailing_elements(tmp_path: Path) -> Path:
    """A CT with identifying private and public elements after a large Pixel Data."""
    ds = dcmread(get_testdata_file("CT_small.dcm", read=False) or "")
    ds.PixelData = bytes(range(256)) * 1024  # 256 KiB: deferred
    ds.add_new(0x7FE10010, "LO", "CREATOR")
    ds.add_new(0x7FE11001, "LO", "Test^Patient")
    ds.add_new(0xFFFAFFFA, "SQ", [])
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)
    path = tmp_path / "trailing.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_elements_after_pixel_data_are_deidentified_and_written(
    tmp_path: Path, syntax: str
) -> None:
    source = with_trailing_elements(tmp_path)
    ds = dcmread(source)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(source, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    plan = EditPlan(profile=Profile(secret=PROFILE_SECRET))
    found = edited_both_ways(source, tmp_path, plan, DEFER_SIZE)
    assert found is not None
    full, fast, header = found
    assert header is not None and fast == full
    assert b"Test^Patient" not in fast and b"CREATOR" not in fast
    assert bytes(range(256)) * 1024 in fast


def test_a_modified_instance_is_written_as_save_as_writes_it(tmp_path: Path) -> None:
    source = with_trailing_elements(tmp_path)
    modifications = parse_modify({"InstitutionName": "Elsewhere", "StationName": ""})
    plan = EditPlan(profile=Profile(secret=PROFILE_SECRET), modifications=modifications)
    found = edited_both_ways(source, tmp_path, plan, DEFER_SIZE)
    assert found is not None and found[2] is not None and found[0] == found[1]


def test_a_big_endian_instance_goes_through_save_as(tmp_path: Path) -> None:
    source = Path(get_testdata_file("MR_small_bigendian.dcm") or "")
    plan = EditPlan(profile=Profile(secret=PROFILE_SECRET))
    found = edited_both_ways(source, tmp_path, plan, 256)
    assert found is not None
    full, fast, header = found
    assert header is None and fast == full


def test_the_deidentification_walk_leaves_deferred_pixel_data_in_the_file(
    tmp_path: Path,
) -> None:
    source = with_trailing_elements(tmp_path)
    ds = dcmread(source, defer_size=DEFER_SIZE)
    EditPlan(profile=Profile(secret=PROFILE_SECRET)).edit(ds)
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    assert isinstance(element, RawDataElement) and element.value is None


def test_the_method_codes_are_pydicoms_cid_7050() -> None:
    from pydicom.sr.codedict import codes

    from mercli.deid.core import CODE_NAMES, CODES, PROFILE_CODE_NAME

    assert set(CODES) == {PROFILE_CODE_NAME, *CODE_NAMES.values()}
    for name, code in CODES.items():
        found = getattr(codes.cid7050, name)
        assert code == (found.value, found.scheme_designator, found.meaning)
