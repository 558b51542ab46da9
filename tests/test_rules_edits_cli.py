"""`mercli rules test` showing what a target's edits (deidentify, modify, transfer_syntax)
would change: on a copy of pydicom's CT_small.dcm, through the real command group."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

from click.testing import CliRunner
from pydicom import dcmread
from pydicom.data import get_testdata_file

from mercli.cli import cli
from tests.kit import EXPLICIT, IMPLICIT, PACS_AND_ARCHIVE

RULES = (
    PACS_AND_ARCHIVE
    + f"""
[targets.research]
type = "folder"
path = "research"
deidentify = "basic"
pseudonym_secret_file = "pseudo.key"
modify = {{ InstitutionName = "RESEARCH" }}
transfer_syntax = "{IMPLICIT}"

[[rules]]
name = "ct"
when = 'Modality == "CT"'
targets = ["pacs", "research"]
"""
)
# The patient of the input file: none of it may reach stdout without --show-phi.
NAME, PATIENT_ID, BIRTH_DATE = "Doe^Jane", "PID-4711", "19450203"


def setup(tmp_path: Path, rules: str = RULES, **values: str) -> tuple[Path, Path]:
    """rules.toml with its secret file, and ct.dcm: CT_small.dcm with our patient."""
    secret = tmp_path / "pseudo.key"
    secret.write_text("a pseudonym secret of 32 bytes..\n")
    secret.chmod(0o600)
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    ct = tmp_path / "ct.dcm"
    shutil.copyfile(str(get_testdata_file("CT_small.dcm")), ct)
    dataset = dcmread(ct)
    dataset.PatientName, dataset.PatientID = NAME, PATIENT_ID
    dataset.PatientBirthDate = BIRTH_DATE
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    dataset.save_as(ct)
    return path, ct


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["rules", "test", *args])
    return result.exit_code, result.stdout, result.stderr


def edit_lines(stdout: str, target: str) -> list[str]:
    """The lines of a target's edits block, its heading included."""
    lines = stdout.splitlines()
    start = lines.index(f"  target {target} edits:")
    block = itertools.takewhile(lambda line: line.startswith("    "), lines[start + 1 :])
    return [lines[start], *block]


def test_deidentify_modify_and_transfer_syntax_masked(tmp_path: Path) -> None:
    path, ct = setup(tmp_path)
    code, stdout, stderr = run(str(path), str(ct))
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[:4] == [
        str(ct),
        '  match      ct  Modality="CT"',
        '  => pacs, research: routed by rule "ct"',
        "  target research edits:",
    ]
    assert lines[4] == (
        "    (0002,0010) TransferSyntaxUID: Explicit VR Little Endian -> "
        f"Implicit VR Little Endian ({IMPLICIT}), transcoded at dispatch"
    )
    assert re.search(
        r'^    \(0010,0010\) PatientName: \*\*\* \(8 chars\) -> "[0-9A-F]{16}"$', stdout, re.M
    )
    assert re.search(
        r'^    \(0010,0020\) PatientID: \*\*\* \(8 chars\) -> "[0-9A-F]{16}"$', stdout, re.M
    )
    assert '    (0010,0030) PatientBirthDate: *** (8 chars) -> ""' in lines
    assert '    (0008,0080) InstitutionName: *** (18 chars) -> "RESEARCH"' in lines
    assert '    (0012,0062) PatientIdentityRemoved: (missing) -> "YES"' in lines
    assert "    (0010,1002) OtherPatientIDsSequence: 2 items -> (removed)" in lines
    assert "    (0009,xxxx) private: 10 elements removed" in lines  # a block, not 10 lines
    assert re.fullmatch(r"    \d+ attributes changed, \d+ removed, \d+ added", lines[-1])
    assert lines[-2] == "    (FFFC,FFFC) DataSetTrailingPadding: *** (126 bytes) -> (removed)"
    for value in (NAME, PATIENT_ID, BIRTH_DATE, "Doe", "JFK IMAGING", "1.3.6.1.4.1.5962"):
        assert value not in stdout
    assert stderr == ""


def test_show_phi_shows_the_old_values(tmp_path: Path) -> None:
    path, ct = setup(tmp_path)
    code, stdout, stderr = run("--show-phi", str(path), str(ct))
    assert code == 0, stderr
    assert re.search(
        r'^    \(0010,0010\) PatientName: "Doe\^Jane" -> "[0-9A-F]{16}"$', stdout, re.M
    )
    assert f'    (0010,0030) PatientBirthDate: "{BIRTH_DATE}" -> ""' in stdout.splitlines()
    assert f'(0010,0020) PatientID: "{PATIENT_ID}" -> ' in stdout
    assert '(0008,0080) InstitutionName: "JFK IMAGING CENTER" -> "RESEARCH"' in stdout
    assert "*** (" not in stdout


def test_json_edits(tmp_path: Path) -> None:
    path, ct = setup(tmp_path)
    for show_phi in ([], ["--show-phi"]):
        code, stdout, stderr = run("--json", *show_phi, str(path), str(ct))
        assert code == 0, stderr
        (report,) = json.loads(stdout)["files"]
        assert list(report) == ["file", "rules", "decision", "edits"]
        assert list(report["edits"]) == ["research"]  # pacs does not edit
        edits = report["edits"]["research"]
        assert edits["error"] is None
        assert edits["transfer_syntax"] == {"old": EXPLICIT, "new": IMPLICIT}
        changes = {change["keyword"]: change for change in edits["changes"]}
        name = changes["PatientName"]
        assert list(name) == ["tag", "keyword", "vr", "kind", "old", "new", "masked"]
        assert name["tag"] == "(0010,0010)" and name["vr"] == "PN" and name["kind"] == "changed"
        assert re.fullmatch("[0-9A-F]{16}", name["new"])
        assert changes["InstitutionName"]["new"] == "RESEARCH"
        added = changes["PatientIdentityRemoved"]
        assert (added["kind"], added["old"], added["new"]) == ("added", None, "YES")
        removed = changes["DataSetTrailingPadding"]
        assert (removed["kind"], removed["new"]) == ("removed", None)
        if show_phi:
            assert (name["old"], name["masked"]) == (NAME, False)
            assert changes["PatientBirthDate"]["old"] == BIRTH_DATE
            assert all(not change["masked"] for change in edits["changes"])
        else:
            assert (name["old"], name["masked"]) == ("*** (8 chars)", True)
            assert changes["DataSetTrailingPadding"]["old"] == "*** (126 bytes)"
            assert changes["InstitutionName"]["old"] == "*** (18 chars)"
            for value in (NAME, PATIENT_ID, BIRTH_DATE, "Doe", "JFK IMAGING"):
                assert value not in stdout


def test_target_option_shows_a_target_the_rules_do_not_use(tmp_path: Path) -> None:
    path, ct = setup(tmp_path, RULES.replace('["pacs", "research"]', '["pacs"]'))
    code, stdout, stderr = run(str(path), str(ct))
    assert code == 0, stderr
    assert stdout.splitlines() == [
        str(ct),
        '  match      ct  Modality="CT"',
        '  => pacs: routed by rule "ct"',
    ]
    code, stdout, stderr = run("--json", str(path), str(ct))
    assert (
        json.loads(stdout)["files"][0]["edits"] == {}
    )  # a rules file with edits: the key is there
    code, stdout, stderr = run("--target", "research", "--target", "pacs", str(path), str(ct))
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[3] == "  target research edits:"
    assert '    (0008,0080) InstitutionName: *** (18 chars) -> "RESEARCH"' in lines
    assert lines[-1] == "  target pacs edits: none"  # named, but it sends files as they are


def test_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    path, ct = setup(tmp_path)
    code, stdout, stderr = run("--target", "reserch", str(path), str(ct))
    assert code == 2 and stdout == ""
    assert 'unknown target "reserch" (targets: pacs, archive, research)' in stderr


def test_burned_in_file_cannot_be_edited_exit_1(tmp_path: Path) -> None:
    path, ct = setup(tmp_path, BurnedInAnnotation="YES")
    code, stdout, stderr = run(str(path), str(ct))
    assert code == 1
    reason = "burned-in: BurnedInAnnotation is YES"
    assert stdout.splitlines()[-1] == f"  target research: cannot edit: {reason}"
    assert stderr == f"Error: target research: cannot edit: {reason} ({ct})\n"
    code, stdout, stderr = run("--json", str(path), str(ct))
    assert code == 1
    edits = json.loads(stdout)["files"][0]["edits"]["research"]
    assert edits == {"changes": [], "transfer_syntax": None, "error": reason}


def test_unreadable_secret_file_is_reported_per_file(tmp_path: Path) -> None:
    path, ct = setup(tmp_path)
    (tmp_path / "pseudo.key").unlink()
    code, stdout, stderr = run(str(path), str(ct), str(ct))
    assert code == 1
    errors = [line for line in stdout.splitlines() if "cannot edit" in line]
    assert len(errors) == 2 and "pseudonym_secret_file" in errors[0]
    assert errors[0].startswith("  target research: cannot edit: ")
    assert len(stderr.splitlines()) == 2


def test_modify_only_target_and_study_rule_targets(tmp_path: Path) -> None:
    rules = (
        PACS_AND_ARCHIVE
        + """
[targets.relabel]
type = "folder"
path = "relabel"
modify = { InstitutionName = "RESEARCH", StationName = "delete", ImageComments = "" }

[[rules]]
name = "ct-study"
trigger = "study"
when = 'Modality == "CT"'
targets = ["relabel"]
"""
    )
    path, ct = setup(tmp_path, rules)
    code, stdout, stderr = run(str(path), str(ct))
    assert code == 0, stderr
    assert edit_lines(stdout, "relabel") == [
        "  target relabel edits:",
        '    (0008,0080) InstitutionName: *** (18 chars) -> "RESEARCH"',
        "    (0008,1010) StationName: *** (8 chars) -> (removed)",
        '    (0020,4000) ImageComments: *** (12 chars) -> ""',
        "    2 attributes changed, 1 removed, 0 added",
    ]
