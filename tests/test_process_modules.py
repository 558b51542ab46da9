"""The example modules in examples/modules/, run as mercure would run them (no `mercli process`).

Each test prepares an in/ exactly as the mercure contract describes it (`task.json` in mercure's
task layout, `<SeriesInstanceUID>#<SOPInstanceUID>.dcm` files, `.tags` sidecars), runs the
module as a subprocess with MERCURE_IN_DIR/MERCURE_OUT_DIR, and checks what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from mercli.tags import read_tags
from tests.dicomfiles import make_instance

MODULES = Path(__file__).resolve().parent.parent / "examples" / "modules"


def task_json(in_dir: Path, uid: str, module: str, settings: dict[str, Any]) -> None:
    task = {
        "id": "0f1e2d3c-0000-4000-8000-000000000001",
        "info": {
            "action": "process",
            "uid": uid,
            "uid_type": "series",
            "triggered_rules": {"test-rule": True},
            "applied_rule": "test-rule",
            "patient_name": "Test^Patient",
            "mrn": "P001",
            "acc": "",
            "mercure_version": "mercli",
            "mercure_appliance": "mercli",
            "mercure_server": "test",
        },
        "dispatch": {},
        "process": {
            "module_name": module,
            "module_config": None,
            "settings": settings,
            "retain_input_images": False,
        },
        "study": {},
    }
    (in_dir / "task.json").write_text(json.dumps(task), encoding="utf-8")


def series_in(in_dir: Path, count: int, *, sidecars: bool = True, **extra: object) -> str:
    """`count` instances of one new series in in_dir, mercure-named; returns the series UID."""
    series, study = generate_uid(), generate_uid()
    for number in range(1, count + 1):
        sop = generate_uid()
        path = make_instance(
            in_dir,
            series=series,
            study=study,
            sop=sop,
            number=number,
            filename=f"{series}#{sop}.dcm",
            **extra,
        )
        if sidecars:
            tags = read_tags(path)
            path.with_suffix(".tags").write_text(json.dumps(tags), encoding="utf-8")
    return series


def run_module(name: str, in_dir: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MERCURE_IN_DIR": str(in_dir), "MERCURE_OUT_DIR": str(out_dir)}
    script = MODULES / name / f"{name}.py"
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    return in_dir, out_dir


def pixels(raw: bytes) -> list[int]:
    values = array("H")
    values.frombytes(raw)
    return list(values)


def test_invert_derives_a_new_series_with_inverted_pixels(tmp_path: Path) -> None:
    in_dir, out_dir = dirs(tmp_path)
    first = series_in(in_dir, 3, SeriesDescription="Chest", SeriesNumber=4)
    second = series_in(in_dir, 2, SeriesDescription="Abdomen", SeriesNumber=5)
    task_json(in_dir, first, "invert", {})
    done = run_module("invert", in_dir, out_dir)
    assert done.returncode == 0, done.stderr
    assert "5 instance(s)" in done.stdout

    originals = {}
    for path in in_dir.glob("*.dcm"):
        ds = dcmread(path)
        originals[(str(ds.SeriesInstanceUID), int(ds.InstanceNumber))] = ds
    outputs = sorted(out_dir.iterdir())
    assert len(outputs) == 5 and all(p.suffix == ".dcm" for p in outputs)

    new_series: dict[str, set[str]] = {first: set(), second: set()}
    sops = set()
    for path in outputs:
        ds = dcmread(path)
        assert path.name == f"{ds.SeriesInstanceUID}#{ds.SOPInstanceUID}.dcm"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        old_series = first if ds.SeriesDescription == "INVERTED Chest" else second
        original = originals[(old_series, int(ds.InstanceNumber))]
        new_series[old_series].add(str(ds.SeriesInstanceUID))
        sops.add(str(ds.SOPInstanceUID))
        assert ds.SeriesInstanceUID != old_series
        assert ds.SOPInstanceUID != original.SOPInstanceUID
        assert ds.StudyInstanceUID == original.StudyInstanceUID
        assert ds.SeriesNumber == original.SeriesNumber + 1000
        assert ds.SeriesDescription == "INVERTED " + original.SeriesDescription
        assert ds.ImageType[0] == "DERIVED"
        before, after = pixels(original.PixelData), pixels(ds.PixelData)
        top = max(before)
        assert after == [top - value for value in before] and after != before
    # one new series per input series, all SOP UIDs new and distinct
    assert all(len(uids) == 1 for uids in new_series.values())
    assert new_series[first] != new_series[second] and len(sops) == 5

    # deterministic: a re-run (mercli retries from a clean out/) writes the same UIDs
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    assert run_module("invert", in_dir, rerun).returncode == 0
    assert sorted(p.name for p in rerun.iterdir()) == [p.name for p in outputs]


def test_invert_reads_its_settings_from_task_json(tmp_path: Path) -> None:
    in_dir, out_dir = dirs(tmp_path)
    uid = series_in(in_dir, 1, SeriesDescription="Head")
    task_json(in_dir, uid, "invert", {"prefix": "NEG ", "series_number_offset": 50})
    assert run_module("invert", in_dir, out_dir).returncode == 0
    (path,) = out_dir.iterdir()
    ds = dcmread(path)
    assert ds.SeriesDescription == "NEG Head" and ds.SeriesNumber == 50


def test_invert_signed_pixels_stay_in_range_and_colour_is_kept(tmp_path: Path) -> None:
    in_dir, out_dir = dirs(tmp_path)
    signed = array("h", [-1000, -5, 0, 7, 2000, 300]).tobytes()
    series_in(in_dir, 1, rows=2, columns=3, PixelRepresentation=1, PixelData=signed)
    colour = bytes(range(2 * 2 * 3))
    series_in(
        in_dir,
        1,
        rows=2,
        columns=2,
        PhotometricInterpretation="RGB",
        SamplesPerPixel=3,
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelData=colour,
    )
    assert run_module("invert", in_dir, out_dir).returncode == 0
    outputs = {str(dcmread(p).PhotometricInterpretation): dcmread(p) for p in out_dir.iterdir()}
    after = array("h")
    after.frombytes(outputs["MONOCHROME2"].PixelData)
    assert list(after) == [2000 - 1000 - v for v in (-1000, -5, 0, 7, 2000, 300)]
    assert outputs["RGB"].PixelData == colour  # not MONOCHROME: pixels unchanged
    assert outputs["RGB"].SeriesDescription.startswith("INVERTED")


def test_invert_fails_with_a_status_on_garbage(tmp_path: Path) -> None:
    in_dir, out_dir = dirs(tmp_path)
    uid = generate_uid()
    (in_dir / f"{uid}#{generate_uid()}.dcm").write_bytes(b"not dicom at all")
    task_json(in_dir, uid, "invert", {})
    done = run_module("invert", in_dir, out_dir)
    assert done.returncode == 1 and "invert:" in done.stderr


def test_finding_writes_only_result_json(tmp_path: Path) -> None:
    in_dir, out_dir = dirs(tmp_path)
    uid = series_in(in_dir, 3, SeriesDescription="Chest", SliceThickness="1.25")
    thick = make_instance(
        in_dir, series=uid, number=4, SeriesDescription="Chest", SliceThickness="7.5"
    )
    sop = str(dcmread(thick).SOPInstanceUID)
    thick = thick.rename(in_dir / f"{uid}#{sop}.dcm")  # no sidecar: read from the header
    task_json(in_dir, uid, "finding", {"max_slice_thickness": 5})
    done = run_module("finding", in_dir, out_dir)
    assert done.returncode == 0, done.stderr

    assert [p.name for p in out_dir.iterdir()] == ["result.json"]
    result = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    assert result["__mercure_notification"] == {"text": "4 instances of CT series Chest checked"}
    assert result["max_slice_thickness"] == 5.0
    assert result["series"] == [
        {
            "SeriesInstanceUID": uid,
            "Modality": "CT",
            "SeriesDescription": "Chest",
            "instances": 4,
            "flagged": 1,
        }
    ]
    assert result["findings"] == [
        {
            "SeriesInstanceUID": uid,
            "SOPInstanceUID": sop,
            "file": thick.name,
            "SliceThickness": 7.5,
            "finding": "slice thickness 7.5 mm > 5 mm",
        }
    ]


def test_finding_without_sidecars_or_task_uses_headers_and_defaults(tmp_path: Path) -> None:
    in_dir, out_dir = dirs(tmp_path)
    series_in(in_dir, 2, sidecars=False, modality="MR", SeriesDescription="T1", SliceThickness=6)
    series_in(in_dir, 1, sidecars=False, modality="MR", SeriesDescription="T2", SliceThickness=3)
    done = run_module("finding", in_dir, out_dir)
    assert done.returncode == 0, done.stderr
    result = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    text = result["__mercure_notification"]["text"]
    assert sorted(text.split("; ")) == [
        "1 instances of MR series T2 checked",
        "2 instances of MR series T1 checked",
    ]
    assert result["max_slice_thickness"] == 5.0
    assert len(result["findings"]) == 2
    assert {f["finding"] for f in result["findings"]} == {"slice thickness 6 mm > 5 mm"}
