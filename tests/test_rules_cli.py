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
