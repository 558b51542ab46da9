"""`mercli rules check|test` through the real command group: output, JSON and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mercli.cli import cli
from tests.dicomfiles import make_instance
from tests.kit import PACS_AND_ARCHIVE

RULES = (
    PACS_AND_ARCHIVE
    + """
[[rules]]
name = "ct-to-pacs"
when = 'tags.Modality == "CT" and "CHEST" in @StudyDescription@.upper()'
targets = ["pacs", "archive"]
final = true

[[rules]]
name = "thin"
when = 'float(SliceThickness) < 2'
targets = ["pacs"]

[[rules]]
name = "from-ct01"
when = 'SenderAET == "CT01"'
targets = ["archive"]

[[rules]]
name = "rest"
fallback = true
action = "discard"
"""
)


def setup(tmp_path: Path, rules: str = RULES) -> tuple[Path, Path, Path]:
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    ct = make_instance(
        tmp_path, filename="ct.dcm", StudyDescription="Chest", PatientName="Doe^Jane"
    )
    mr = make_instance(tmp_path, filename="mr.dcm", modality="MR", SeriesDescription="T1")
    return path, ct, mr


def test_check_ok(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path)
    result = CliRunner().invoke(cli, ["rules", "check", str(path)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"ok: {path}: 2 targets, 4 rules",
        "  ct-to-pacs: -> pacs, archive (final)",
        "  thin: -> pacs",
        "  from-ct01: -> archive",
        "  rest: discard (fallback)",
    ]
    assert result.stderr == ""


def test_check_error_exits_3_with_file_line_and_rule(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path, RULES.replace('"archive"]', '"archiv"]'))
    result = CliRunner().invoke(cli, ["rules", "check", str(path)])
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr == (
        f'Error: {path}:14: rule "ct-to-pacs": unknown target "archiv" (did you mean "archive"?)\n'
    )


def test_check_bad_expression_and_missing_file(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path, RULES.replace("Modality ==", "Modalty =="))
    result = CliRunner().invoke(cli, ["rules", "check", str(path)])
    assert result.exit_code == 3
    assert (
        f'{path}:13: rule "ct-to-pacs": bad expression: unknown keyword "Modalty"' in result.stderr
    )
    result = CliRunner().invoke(cli, ["rules", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 3 and "cannot read rules" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert CliRunner().invoke(cli, ["rules", "check"]).exit_code == 2
    path, ct, _ = setup(tmp_path)
    assert CliRunner().invoke(cli, ["rules", "test", str(path)]).exit_code == 2
    result = CliRunner().invoke(cli, ["rules", "test", "--set", "oops", str(path), str(ct)])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.stderr


def test_test_explains_each_rule(tmp_path: Path) -> None:
    path, ct, mr = setup(tmp_path)
    result = CliRunner().invoke(cli, ["rules", "test", str(path), str(ct), str(mr)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        str(ct),
        '  match      ct-to-pacs  Modality="CT", StudyDescription="Chest"',
        '  skipped    thin        after final rule "ct-to-pacs"',
        '  skipped    from-ct01   after final rule "ct-to-pacs"',
        "  not-needed rest        fallback; another rule matched",
        '  => pacs, archive: routed by rule "ct-to-pacs"',
    ]
    assert lines[6:11] == [
        str(mr),
        '  false      ct-to-pacs  Modality="MR", StudyDescription=(missing)',
        "  error      thin        float() of text that is not a number; SliceThickness=(missing)",
        "  false      from-ct01   SenderAET=(missing)",
        "  match      rest        no condition",
    ]
    assert lines[11] == '  => discard: discarded by rule "rest"'
    assert lines[12].startswith('  warning: rule "thin": series 1.2.')
    assert "Doe" not in result.stdout  # no rule reads PatientName


def test_test_json_and_set(tmp_path: Path) -> None:
    path, _, mr = setup(
        tmp_path, RULES.replace("SenderAET ==", 'PatientName != "x" and SenderAET ==')
    )
    result = CliRunner().invoke(
        cli, ["rules", "test", "--json", "--set", "SenderAET=CT01", str(path), str(mr)]
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["rules"] == str(path)
    (report,) = document["files"]
    assert report["file"] == str(mr)
    assert [(r["rule"], r["result"]) for r in report["rules"]] == [
        ("ct-to-pacs", "false"),
        ("thin", "error"),
        ("from-ct01", "match"),
        ("rest", "not-needed"),
    ]
    assert report["rules"][2]["values"] == {"PatientName": "Test^Patient", "SenderAET": "CT01"}
    assert report["decision"]["targets"] == ["archive"]
    assert report["decision"]["discarded"] is False
    assert report["decision"]["matched"] == ["from-ct01"]
    assert len(report["decision"]["warnings"]) == 1


def test_test_unreadable_file_exits_1_and_continues(tmp_path: Path) -> None:
    path, ct, _ = setup(tmp_path)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = CliRunner().invoke(cli, ["rules", "test", str(path), str(junk), str(ct)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and f"({junk})" in result.stderr
    assert str(ct) in result.stdout


def test_test_with_bad_rules_exits_3(tmp_path: Path) -> None:
    path, ct, _ = setup(tmp_path, RULES + "[[rules]]\nname = 'x'\nfoo = 1\n")
    result = CliRunner().invoke(cli, ["rules", "test", str(path), str(ct)])
    assert result.exit_code == 3
    assert result.stderr.startswith(f'Error: {path}:33: rule #5: unknown key "foo"')


def test_help_texts() -> None:
    for args in (["rules"], ["rules", "check"], ["rules", "test"]):
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.stdout


STUDY_RULES = (
    '[route]\nstudy_settle = "5s"\nstudy_timeout = "10m"\n\n'
    + PACS_AND_ARCHIVE
    + """
[[rules]]
name = "brain-study"
trigger = "study"
when = 'Modality == "MR"'
require = ['"T1" in SeriesDescription.upper()', '"FLAIR" in SeriesDescription.upper()']
on_timeout = "discard"
targets = ["archive"]

[[rules]]
name = "all-to-pacs"
targets = ["pacs"]
"""
)
STUDY = "1.2.826.0.1.3680043.8.498.7"
T1, FLAIR, DWI = (
    "1.2.826.0.1.3680043.8.498.7.1",
    "1.2.826.0.1.3680043.8.498.7.2",
    "1.2.826.0.1.3680043.8.498.7.3",
)
T1_NEED, FLAIR_NEED = '"T1" in SeriesDescription.upper()', '"FLAIR" in SeriesDescription.upper()'


def study_setup(tmp_path: Path, rules: str = STUDY_RULES) -> tuple[Path, Path]:
    """Rules, and a folder with three series of one MR study: t1/ (2 files), flair/, dwi/."""
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "rules.toml"
    path.write_text(rules)
    folder = tmp_path / "study"
    for name, series, description, count in (
        ("t1", T1, "T1 MPRAGE", 2),
        ("flair", FLAIR, "FLAIR ax", 1),
        ("dwi", DWI, "DWI", 1),
    ):
        (folder / name).mkdir(parents=True)
        for number in range(1, count + 1):
            make_instance(
                folder / name,
                series=series,
                study=STUDY,
                modality="MR",
                number=number,
                filename=f"{number}.dcm",
                SeriesDescription=description,
            )
    return path, folder


def test_test_study_from_a_directory_is_complete(tmp_path: Path) -> None:
    path, folder = study_setup(tmp_path)
    result = CliRunner().invoke(cli, ["rules", "test", str(path), str(folder)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("/")] == [
        str(folder / "dwi" / "1.dcm"),
        str(folder / "flair" / "1.dcm"),
        str(folder / "t1" / "1.dcm"),
        str(folder / "t1" / "2.dcm"),
    ]
    assert lines[:5] == [
        str(folder / "dwi" / "1.dcm"),
        '  match      brain-study  Modality="MR"',
        "  match      all-to-pacs  no condition",
        '  => pacs: routed by rule "all-to-pacs"',
        f'  => held for study {STUDY} (study rule "brain-study")',
    ]
    assert lines[9] == f'  => held for study {STUDY} (study rule "brain-study"); meets {FLAIR_NEED}'
    assert lines[-8:] == [
        f"study {STUDY}",
        '  study rule "brain-study" holds 3 series:',
        f'    {DWI} "DWI" (1 file)',
        f'    {FLAIR} "FLAIR ax" (1 file)',
        f'    {T1} "T1 MPRAGE" (2 files)',
        f'  met        {T1_NEED}     by {T1} "T1 MPRAGE"',
        f'  met        {FLAIR_NEED}  by {FLAIR} "FLAIR ax"',
        "  => complete: one study job to archive after study_settle (5s)",
    ]


def test_test_study_without_flair_names_what_is_missing(tmp_path: Path) -> None:
    for on_timeout, outcome in (
        ("discard", f"discard (study incomplete: missing {FLAIR_NEED})"),
        ("proceed", "proceed (send what is there)"),
    ):
        path, folder = study_setup(
            tmp_path / on_timeout, STUDY_RULES.replace('"discard"', f'"{on_timeout}"')
        )
        args = [str(path), str(folder / "t1"), str(folder / "dwi" / "1.dcm")]
        result = CliRunner().invoke(cli, ["rules", "test", *args])
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[-7:] == [
            f"study {STUDY}",
            '  study rule "brain-study" holds 2 series:',
            f'    {T1} "T1 MPRAGE" (2 files)',
            f'    {DWI} "DWI" (1 file)',
            f'  met        {T1_NEED}     by {T1} "T1 MPRAGE"',
            f"  missing    {FLAIR_NEED}",
            f"  => would wait for: {FLAIR_NEED}; after study_timeout (10m): {outcome}",
        ]


def test_test_study_json(tmp_path: Path) -> None:
    path, folder = study_setup(tmp_path)
    args = [str(path), str(folder / "t1" / "1.dcm"), str(folder / "dwi")]
    result = CliRunner().invoke(cli, ["rules", "test", "--json", *args])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert list(document) == ["rules", "files", "studies"]
    first = document["files"][0]
    assert list(first) == ["file", "rules", "decision"]
    keys = ["targets", "discarded", "reason", "matched", "warnings", "held"]
    assert list(first["decision"]) == keys  # the old keys, then the study rules holding it
    assert first["decision"]["targets"] == ["pacs"]  # the study rule's target is not here
    assert first["decision"]["held"] == [{"rule": "brain-study", "study": STUDY, "met": [T1_NEED]}]
    assert document["files"][1]["decision"]["held"][0]["met"] == []
    (study,) = document["studies"]
    assert study["study"] == STUDY
    (rule,) = study["rules"]
    assert rule == {
        "rule": "brain-study",
        "targets": ["archive"],
        "series": [
            {
                "SeriesInstanceUID": T1,
                "SeriesDescription": "T1 MPRAGE",
                "files": [str(folder / "t1" / "1.dcm")],
                "met": [T1_NEED],
            },
            {
                "SeriesInstanceUID": DWI,
                "SeriesDescription": "DWI",
                "files": [str(folder / "dwi" / "1.dcm")],
                "met": [],
            },
        ],
        "require": [
            {
                "expression": T1_NEED,
                "met_by": [{"SeriesInstanceUID": T1, "SeriesDescription": "T1 MPRAGE"}],
            },
            {"expression": FLAIR_NEED, "met_by": []},
        ],
        "missing": [FLAIR_NEED],
        "complete": False,
        "after": "study_timeout",
        "on_timeout": "discard",
        "verdict": f"would wait for: {FLAIR_NEED}; after study_timeout (10m): "
        f"discard (study incomplete: missing {FLAIR_NEED})",
    }
    result = CliRunner().invoke(cli, ["rules", "test", "--json", str(path), str(folder)])
    (rule,) = json.loads(result.stdout)["studies"][0]["rules"]
    assert rule["complete"] is True and rule["missing"] == [] and rule["after"] == "study_settle"
    assert [len(need["met_by"]) for need in rule["require"]] == [1, 1]


def test_test_series_rules_only_have_no_studies(tmp_path: Path) -> None:
    path, ct, _ = setup(tmp_path)
    result = CliRunner().invoke(cli, ["rules", "test", "--json", str(path), str(ct)])
    document = json.loads(result.stdout)
    assert document["studies"] == [] and document["files"][0]["decision"]["held"] == []
    result = CliRunner().invoke(cli, ["rules", "test", str(path), str(ct)])
    assert "study" not in result.stdout and "held" not in result.stdout


def test_test_directory_reports_files_that_are_not_dicom(tmp_path: Path) -> None:
    path, folder = study_setup(tmp_path)
    (folder / "dwi" / "README").write_text("not dicom")
    (tmp_path / "empty").mkdir()
    args = [str(path), str(folder / "dwi"), str(tmp_path / "empty")]
    result = CliRunner().invoke(cli, ["rules", "test", *args])
    assert result.exit_code == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("Error: ") and errors[0].endswith(f"({folder / 'dwi' / 'README'})")
    assert errors[1].startswith("Error: ") and errors[1].endswith(f"({tmp_path / 'empty'})")
    assert str(folder / "dwi" / "1.dcm") in result.stdout
    assert f"study {STUDY}" in result.stdout
