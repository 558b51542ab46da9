"""`mercli import-mercure`: mercure.json files written from mercure's documented Config model
(tests/mercure_configs/) converted, checked, and tried on DICOM files.

Each decision test states what mercure would decide for the file and why (its routing:
every non-disabled rule is evaluated; a matching discard rule discards the series; the
fallback rule applies only when nothing else triggered; nothing triggered: discard).
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mercli.cli import cli
from mercli.migrate.series import SeriesSyntaxError, require_expressions
from mercli.migrate.toml_out import dumps_value
from mercli.rules.config import load_rules

CONFIGS = Path(__file__).parent / "mercure_configs"
CONVERTIBLE = {"hospital.json": 0, "studies_processing.json": 0, "partly_convertible.json": 1}


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def convert(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name.removesuffix(".json")
    result = run("import-mercure", str(CONFIGS / name), "--out", str(out))
    assert result.exit_code == CONVERTIBLE[name], result.output + result.stderr
    return out / "rules.toml"


def dicom(folder: Path, name: str, **tags: Any) -> Path:
    """A small CT/MR/... instance with the given attributes, written with save_as."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def decisions(rules: Path, *files: Path) -> dict[str, dict[str, Any]]:
    result = run("rules", "test", "--json", str(rules), *map(str, files))
    assert result.exit_code == 0, result.output + result.stderr
    return {Path(f["file"]).stem: f["decision"] for f in json.loads(result.stdout)["files"]}


# -- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_converted_file_loads_and_passes_rules_check(tmp_path: Path, name: str) -> None:
    rules = convert(tmp_path, name)
    tomllib.loads(rules.read_text())
    load_rules(rules)
    check = run("rules", "check", str(rules))
    assert check.exit_code == 0, check.output + check.stderr


def test_stdout_lists_the_files_and_stderr_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("import-mercure", str(CONFIGS / "hospital.json"), "--out", str(out))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        str(out / "rules.toml"),
        str(out / "secrets/cloud.token"),
        str(out / "secrets/research_sftp.password"),
        str(out / "secrets/lake.ini"),
    ]
    assert "dropped:" not in result.stderr
    assert 'todo: target "research_sftp": mercli refuses unknown host keys' in result.stderr
    assert "mercli receive --port 11112" in result.stderr


def test_every_target_type_maps(tmp_path: Path) -> None:
    ruleset = load_rules(convert(tmp_path, "hospital.json"))
    kinds = {name: target.type for name, target in ruleset.targets.items()}
    assert kinds == {
        "PACS": "dicom",
        "PACS-TLS": "dicom",
        "cloud": "dicomweb",
        "research_sftp": "sftp",
        "lake": "s3",
        "archive": "folder",
    }
    tls = ruleset.targets["PACS-TLS"].to_json()
    assert tls["tls"] is True and tls["tls_ca"] == "/opt/mercure/certs/ca.pem"
    pacs = ruleset.targets["PACS"].to_json()
    assert (pacs["retry_delay"], pacs["retry_backoff"], pacs["max_attempts"]) == (900, 1.0, 5)
    assert ruleset.settings.series_timeout == 60 and ruleset.settings.study_timeout == 900
    assert str(ruleset.settings.offpeak) == "22:00-06:00"
    assert ruleset.purge.success == ruleset.purge.discard == 259200


def test_secrets_are_files_0600_and_not_in_rules_toml(tmp_path: Path) -> None:
    rules = convert(tmp_path, "hospital.json")
    text = rules.read_text()
    secrets = rules.parent / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for path in secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (secrets / "cloud.token").read_text() == "s3cr3t-token-value"
    assert "wJalrXUtnFEMI/K7MDENG" in (secrets / "lake.ini").read_text()
    for secret in ("s3cr3t-token-value", "sftp-pass-123", "wJalrXUtnFEMI", "AKIAEXAMPLE"):
        assert secret not in text
    assert 'token_file = "secrets/cloud.token"' in text
    assert 'credentials_file = "secrets/lake.ini"' in text


def test_disabled_rule_is_kept_commented_out(tmp_path: Path) -> None:
    rules = convert(tmp_path, "hospital.json")
    text = rules.read_text()
    assert '# name = "old_rule"' in text
    assert "old_rule" not in {rule.name for rule in load_rules(rules).rules}


def test_study_rules_modules_and_notifications(tmp_path: Path) -> None:
    ruleset = load_rules(convert(tmp_path, "studies_processing.json"))
    rules = {rule.name: rule for rule in ruleset.rules}
    brain = rules["brain_mr_study"]
    assert brain.trigger == "study" and brain.on_timeout == "proceed"
    assert [need.text for need in brain.require] == [
        '"t1" in SeriesDescription.lower()',
        '"flair" in SeriesDescription.lower() or "t2 tse" in SeriesDescription.lower()',
    ]
    assert rules["ct_study_timeout"].trigger == "study" and not rules["ct_study_timeout"].require
    stroke = rules["stroke"]
    assert stroke.process == ("stroke_ai",) and stroke.targets == ("pacs",)
    assert dict(stroke.process_settings) == {"threshold": 0.7} and stroke.priority == "urgent"
    assert stroke.notify_on == ("delivered", "failed")
    module = ruleset.modules["stroke_ai"]
    assert (module.image, module.container) == ("registry.example.org/stroke:2.1", "docker")
    assert dict(module.settings) == {"threshold": 0.5, "mode": "fast"}
    assert dict(module.env) == {"OMP_NUM_THREADS": "4"}
    research = rules["anonymize_research"]  # per-module settings: one copy of each module
    assert research.targets == ("mercure-processed",)
    copies = [ruleset.modules[name] for name in research.process]
    assert [dict(m.settings) for m in copies] == [
        {"profile": "basic"},
        {"threshold": 0.3, "mode": "fast"},
    ]
    pet = rules["pet_alert"]
    assert pet.fallback and pet.discard and pet.notify_on == ("received", "discarded")
    email = ruleset.notify["pet_alert-email"]
    assert email.to == ("nuclear@example.org", "oncall@example.org")
    assert email.sender == "router@example.org" and email.phi


def test_webhook_payload_renders_as_mercure_did(tmp_path: Path) -> None:
    from mercli.notify.channels import render

    ruleset = load_rules(convert(tmp_path, "studies_processing.json"))
    body = ruleset.notify["stroke-webhook"].body_template()
    variables = {"event": "delivered", "rule": "stroke", "item": "job-1", "accession_number": "A1"}
    payload = json.loads(render(body, variables))
    # mercure: "text": "{{ body }}" with the body JSON-escaped, @event@ -> COMPLETED
    assert payload == {"text": "Stroke case COMPLETED for rule stroke (ACC A1, task job-1)"}
    failed = json.loads(render(body, variables | {"event": "failed", "accession_number": 'x"y'}))
    assert failed == {"text": 'Stroke case ERROR for rule stroke (ACC x"y, task job-1)'}


def test_dropped_items_are_reported_with_reasons_exit_1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("import-mercure", str(CONFIGS / "partly_convertible.json"), "--out", str(out))
    assert result.exit_code == 1
    dropped = [line for line in result.stderr.splitlines() if line.startswith("dropped:")]
    assert 'dropped: target "sync": mercli has no rsync target' in "\n".join(dropped)
    assert 'dropped: target "xnat": mercli has no XNAT target' in "\n".join(dropped)
    assert any('rule "weird": expression' in line and "any()" in line for line in dropped)
    assert any('rule "dynamic": dynamic_routing' in line for line in dropped)
    assert any("graphite_ip" in line for line in dropped)
    # refused by mercli's loader: left out, its rules keep their other targets
    assert any('target "bad_aet": refused by mercli' in line for line in dropped)
    assert any('rule "to_bad": target "bad_aet" was not carried over' in line for line in dropped)
    assert "not carried over" in result.stderr
    text = (out / "rules.toml").read_text()
    assert '# name = "weird"' in text  # kept, commented out, with the reason above it
    assert run("rules", "check", str(out / "rules.toml")).exit_code == 0


@pytest.mark.parametrize("name", ["broken.json", "not_mercure.json"])
def test_not_a_mercure_configuration_exits_3(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    result = run("import-mercure", str(CONFIGS / name), "--out", str(out))
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: ") and "not a mercure configuration" in result.stderr
    assert not (out / "rules.toml").exists()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    source = str(CONFIGS / "hospital.json")
    assert run("import-mercure", source, "--out", str(out)).exit_code == 0
    (out / "rules.toml").write_text("# edited by hand\n")
    again = run("import-mercure", source, "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.stderr
    assert (out / "rules.toml").read_text() == "# edited by hand\n"
    forced = run("import-mercure", source, "--out", str(out), "--force")
    assert forced.exit_code == 0
    load_rules(out / "rules.toml")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_help_teaches_with_examples() -> None:
    result = run("import-mercure", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "--out /etc/mercli" in result.stdout
    assert "3  MERCURE_JSON is not a mercure configuration" in result.stdout


# -- decisions: mercli decides as mercure did --------------------------------------------------


def test_hospital_decisions_match_mercure(tmp_path: Path) -> None:
    rules = convert(tmp_path, "hospital.json")
    files = tmp_path / "dicom"
    made = [
        # CT: ct_to_pacs matches -> PACS and lake (fallback not applied)
        dicom(files, "ct", Modality="CT", SeriesDescription="AX 5mm", SliceThickness="5.0"),
        # CT localizer: no_scouts (discard) matches -> discarded although ct_to_pacs matched
        dicom(files, "scout", Modality="CT", SeriesDescription="Localizer", SliceThickness="5"),
        # MR brain, 1 mm: mr_tls and thin_slices match -> PACS TLS and cloud
        dicom(
            files,
            "mrbrain",
            Modality="MR",
            StudyDescription="Brain w/o",
            SliceThickness="1.0",
            SeriesDescription="T1",
        ),
        # US: only the disabled old_rule would match -> the fallback: archive
        dicom(files, "us", Modality="US", SeriesDescription="abdomen"),
        # research institution: research -> research_sftp
        dicom(files, "lab", Modality="OT", InstitutionName="Research Lab", SeriesDescription="x"),
    ]
    got = decisions(rules, *made)
    assert got["ct"]["targets"] == ["PACS", "lake"] and not got["ct"]["discarded"]
    assert got["scout"]["discarded"] and "no_scouts" in got["scout"]["reason"]
    assert sorted(got["mrbrain"]["targets"]) == ["PACS-TLS", "cloud"]
    assert got["us"]["targets"] == ["archive"] and got["us"]["matched"] == ["everything_else"]
    assert got["lab"]["targets"] == ["research_sftp"]


def test_partly_convertible_decisions_match_mercure(tmp_path: Path) -> None:
    rules = convert(tmp_path, "partly_convertible.json")
    files = tmp_path / "dicom"
    made = [
        dicom(files, "cr", Modality="CR"),  # to_pacs -> pacs
        dicom(files, "mr", Modality="MR"),  # to_xnat -> xnat (not carried over) and pacs
        dicom(files, "ot", Modality="OT"),  # test_dummy -> dummy: nothing sent (mercli: discard)
        dicom(files, "us", Modality="US"),  # to_rsync: rsync not carried -> nothing sent
        dicom(files, "nm", Modality="NM"),  # nothing matches -> discard
        dicom(files, "xa", Modality="XA"),  # to_bad -> bad_aet (refused by mercli) and pacs
    ]
    got = decisions(rules, *made)
    assert got["cr"]["targets"] == ["pacs"]
    assert got["mr"]["targets"] == ["pacs"]
    assert got["ot"]["discarded"] and got["ot"]["matched"] == ["test_dummy"]
    assert got["us"]["discarded"]
    assert got["nm"]["discarded"] and got["nm"]["matched"] == []
    assert got["xa"]["targets"] == ["pacs"]


def test_study_and_notification_decisions_match_mercure(tmp_path: Path) -> None:
    rules = convert(tmp_path, "studies_processing.json")
    files = tmp_path / "dicom"
    study = "1.2.826.0.1.3680043.8.498.1"
    made = [
        # brain MR series: held for the study rule (mercure: collected in studies/)
        dicom(
            files,
            "t1",
            Modality="MR",
            StudyDescription="BRAIN",
            SeriesDescription="Sag T1 MPRAGE",
            StudyInstanceUID=study,
        ),
        dicom(
            files,
            "flair",
            Modality="MR",
            StudyDescription="BRAIN",
            SeriesDescription="ax flair",
            StudyInstanceUID=study,
        ),
        # PET: notification only -> mercure notifies and discards the series
        dicom(files, "pet", Modality="PT"),
        # stroke CT: stroke (process + pacs) and the CT study rule
        dicom(files, "stroke", Modality="CT", StudyDescription="Stroke protocol"),
    ]
    result = run("rules", "test", "--json", str(rules), *map(str, made))
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    got = {Path(f["file"]).stem: f["decision"] for f in document["files"]}
    assert [held["rule"] for held in got["t1"]["held"]] == ["brain_mr_study"]
    assert got["pet"]["discarded"] and got["pet"]["matched"] == ["pet_alert"]
    assert set(got["stroke"]["matched"]) == {"ct_study_timeout", "stroke"}
    (brain,) = [s for s in document["studies"] if s["rules"][0]["rule"] == "brain_mr_study"]
    assert "complete" in json.dumps(brain).lower()  # T1 and FLAIR arrived: the study completes


# -- received-series syntax ------------------------------------------------------------------


def _mercure_complete(condition: str, received: list[str]) -> bool:
    """mercure's semantics, restated: each quoted entry is True when some received series
    description contains it (case-insensitively); then the and/or formula is evaluated."""
    text = condition.lower()
    for entry in set(text.split("'")[1::2]):
        found = any(entry in series.lower() for series in received)
        text = text.replace(f"'{entry}'", f" {found} ")
    return bool(eval(text, {"__builtins__": {}}))


def _mercli_complete(condition: str, received: list[str]) -> bool:
    from mercli.rules.expr import compile_expression

    needs = [compile_expression(text) for text in require_expressions(condition)]
    return all(any(need.evaluate({"SeriesDescription": s}) for s in received) for need in needs)


@pytest.mark.parametrize(
    "condition",
    [
        "'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')",
        "'SAG' or ('COR' and 'AX')",
        "('a' and 'b') or ('c' and 'd')",
        "'T1' AND 'T2'",
        "'flair'",
    ],
)
def test_require_is_equivalent_to_mercure_received_series(condition: str) -> None:
    pool = ["Axial T2", "Sag T1 GRE", "Sag T1 TSE", "SAG", "COR", "AX", "a", "b", "c", "d"]
    pool += ["T1", "t2 flair"]
    for size in range(0, 4):
        for received in itertools.combinations(pool, size):
            expected = bool(received) and _mercure_complete(condition, list(received))
            assert _mercli_complete(condition, list(received)) == expected, received


@pytest.mark.parametrize("condition", ["T1 and T2", "'T1' and", "('T1'", "'T1' not 'T2'", ""])
def test_bad_received_series_syntax_is_refused(condition: str) -> None:
    with pytest.raises(SeriesSyntaxError):
        require_expressions(condition)


# -- TOML writer -----------------------------------------------------------------------------


@given(st.text())
def test_toml_strings_round_trip(text: str) -> None:
    assert tomllib.loads(f"x = {dumps_value(text)}")["x"] == text


@given(
    st.dictionaries(
        st.text(min_size=1),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
            lambda inner: st.lists(inner, max_size=3),
            max_leaves=6,
        ).filter(lambda v: v is not None),
        max_size=4,
    )
)
def test_toml_tables_round_trip(table: dict[str, Any]) -> None:
    def clean(value: Any) -> Any:
        return [clean(v) for v in value if v is not None] if isinstance(value, list) else value

    table = {k: clean(v) for k, v in table.items()}
    assert tomllib.loads(f"x = {dumps_value(table)}")["x"] == table


def test_output_files_are_not_world_readable(tmp_path: Path) -> None:
    rules = convert(tmp_path, "hospital.json")
    assert not stat.S_IMODE(os.stat(rules).st_mode) & 0o007
