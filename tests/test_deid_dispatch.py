"""`deidentify = "basic"` on a target (SPEC §5.1, issue 20): dispatch sends a private,
de-identified copy of each job, keyed by the target's secret; the received files and another
target's copies stay byte-identical; a burned-in instance fails the job, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from mercli.errors import ConfigError
from mercli.rules.config import load_rules
from mercli.spool import ERROR, SUCCESS, Spool
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
