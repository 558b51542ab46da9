"""The shipped examples are valid and do what their comments say."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mercli.rules.config import load_rules
from mercli.rules.decide import decide

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TEXTFILE = "/var/lib/node_exporter/textfile/mercli.prom"  # examples/crontab's


@pytest.mark.parametrize("name", ["rules.toml", "hospital.toml", "brain-mr-study.toml"])
def test_example_rules_are_valid(name: str) -> None:
    rules = load_rules(EXAMPLES / name)
    assert rules.rules and rules.targets


def decision(name: str, **tags: object) -> tuple[tuple[str, ...], bool, tuple[str, ...]]:
    (result,) = decide(load_rules(EXAMPLES / name), [("i", tags)], series_label="s")
    return result.targets, result.discarded, result.rules


def test_make_run_rules_send_everything_somewhere_local() -> None:
    rules = load_rules(EXAMPLES / "rules.toml")
    assert all(target.type == "folder" for target in rules.targets.values())
    assert rules.targets["received"].path == (EXAMPLES.parent / "received").resolve()
    chest = decision("rules.toml", Modality="CT", StudyDescription="Chest w/o", ImageType=["X"])
    assert chest[0] == ("ai-inbox", "received") and not chest[1]
    assert decision("rules.toml", Modality="US")[0] == ("received",)  # the fallback
    scout = decision("rules.toml", Modality="CT", ImageType=["ORIGINAL", "LOCALIZER"])
    assert scout[1] and "no-scouts" in scout[2]


def test_hospital_rules() -> None:
    assert decision("hospital.toml", Modality="MR")[0] == ("pacs", "ai")
    assert decision("hospital.toml", Modality="CR")[0] == ("pacs",)
    assert decision("hospital.toml", Modality="CT", SeriesDescription="Scout 1")[1]
    rules = load_rules(EXAMPLES / "hospital.toml")
    assert rules.targets["ai"].notify_on == ("failed",) and "pacs-admins" in rules.notify


def test_brain_mr_study_rules() -> None:
    rules = load_rules(EXAMPLES / "brain-mr-study.toml")
    study = next(rule for rule in rules.rules if rule.name == "brain-mr-study")
    assert study.study and len(study.require) == 2 and study.on_timeout == "discard"
    assert rules.settings.study_settle == 10.0 and rules.targets["ai"].priority == "urgent"
    t1 = decision(
        "brain-mr-study.toml",
        Modality="MR",
        StudyDescription="Brain",
        SeriesDescription="t1_mprage",
    )
    assert t1[0] == ("pacs",) and "brain-mr-study" in t1[2]  # held for the study, sent as series
    assert decision("brain-mr-study.toml", Modality="CT")[0] == ("pacs",)


def test_systemd_units_run_mercli_commands() -> None:
    units = sorted((EXAMPLES / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {
        "mercli-receive.service",
        "mercli-dispatch@.service",
        "mercli-process.service",
        "mercli-notify.service",
        "mercli-metrics.service",
    }
    for unit in units:
        assert "ExecStart=/opt/mercli/.venv/bin/mercli " in unit.read_text()
    process = (EXAMPLES / "systemd" / "mercli-process.service").read_text()
    assert "\nKillMode=mixed\n" in process  # mercli finishes its modules, SIGKILL for the rest


def _cron_lines() -> list[str]:
    """The example lines of examples/crontab, from "mercli" on."""
    return [
        line.removeprefix("# ").split("mercli ", 1)[1]
        for line in (EXAMPLES / "crontab").read_text().splitlines()
        if re.match(r"# (\S+\s+){5}mercli ", line)
    ]


def test_crontab_lines_are_valid_mercli_commands() -> None:
    """Every example line of examples/crontab parses: its command and options exist (click
    raises on an unknown one)."""
    import click

    from mercli.cli import cli

    lines = _cron_lines()
    assert {line.split()[0] for line in lines} >= {"purge", "notify", "metrics"}
    for line in lines:
        name, *args = shlex.split(line.split(">")[0])
        command = cli.get_command(click.Context(cli), name)
        assert command is not None, line
        command.make_context(name, list(args)).close()


def test_crontab_notify_and_metrics_are_silent_when_all_is_well(tmp_path: Path) -> None:
    """cron mails whatever a job writes: on a quiet spool the notify and metrics lines write
    nothing to stderr (their stdout is sent to /dev/null by the line itself)."""
    textfile = tmp_path / "textfile" / "mercli.prom"
    textfile.parent.mkdir()
    env = {**os.environ, "MERCLI_SPOOL": str(tmp_path / "spool")}
    ran = 0
    for line in _cron_lines():
        if line.split()[0] not in ("notify", "metrics"):
            continue
        args = shlex.split(line.split(">")[0].replace(TEXTFILE, str(textfile)))
        result = subprocess.run(
            [sys.executable, "-m", "mercli", *args],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert (result.returncode, result.stderr) == (0, ""), line
        ran += 1
    assert ran == 2 and "mercli_spool_items" in textfile.read_text()
