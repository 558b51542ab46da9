"""The command line: help everywhere, exact exit codes, and status on real spools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mercli.cli import cli
from mercli.commands import COMMAND_MODULES, all_commands
from mercli.spool import OUTGOING, STATES, Spool, Worker
from tests.kit import ROOT
from tests.spoolkit import receive_instance

ALL_COMMANDS = sorted(COMMAND_MODULES)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mercli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", ["", *ALL_COMMANDS])
def test_every_command_has_help(name: str) -> None:
    result = CliRunner().invoke(cli, [*([name] if name else []), "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    command = cli if not name else cli.get_command(click.Context(cli), name)
    assert command is not None
    assert command.help and len(command.help) > 40, f"{name or 'mercli'} needs real help text"


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_every_command_is_in_the_readme_command_table(name: str) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = [line for line in readme.splitlines() if line.startswith("| `mercli ")]
    assert any(line.startswith(f"| `mercli {name}") for line in table), (
        f"README's command table has no row for `mercli {name}`"
    )


def test_top_level_help_lists_exit_codes() -> None:
    result = CliRunner().invoke(cli, ["-h"])
    for line in (
        "0  success",
        "2  usage error",
        "3  invalid config",
        "4  spool unusable",
        "5  peer",
    ):
        assert line in result.output


def test_status_json_on_a_new_spool(tmp_path: Path) -> None:
    result = run("status", "--json", "--spool", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["spool"] == str(tmp_path / "x")
    assert list(document["states"]) == list(STATES)
    for counts in document["states"].values():
        assert (counts["items"], counts["instances"], counts["bytes"]) == (0, 0, 0)
    assert document["targets"] == {}
    assert all((tmp_path / "x" / state).is_dir() for state in STATES)


def test_status_counts_items_instances_and_targets(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "s")
    with Worker(spool, "test") as worker:
        receive_instance(worker, "1.2", "1.2.1", size=1000)
        receive_instance(worker, "1.2", "1.2.2", size=1000)
        receive_instance(worker, "1.3", "1.3.1", size=1000)
        for job, target in (("j1", "pacs"), ("j2", "pacs"), ("j3", "ai")):
            (spool.root / OUTGOING / job).mkdir()
            (spool.root / OUTGOING / job / "job.json").write_text(
                json.dumps({"target": {"name": target}})
            )
        claim = worker.claim(OUTGOING, "j3")  # in flight: still counted, as claimed
        assert claim is not None
        result = CliRunner().invoke(cli, ["status", "--json", "--spool", str(spool.root)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    incoming = document["states"]["incoming"]
    assert (incoming["items"], incoming["instances"]) == (2, 3)
    assert incoming["bytes"] == 3 * (1000 + 200)
    assert document["states"]["outgoing"]["items"] == 3
    assert document["states"]["outgoing"]["claimed"] == 1
    normal = {"urgent": 0, "normal": 1, "offpeak": 0}  # job.json without a priority: normal
    assert document["targets"] == {
        "ai": {"jobs": 1, "priorities": normal},
        "pacs": {"jobs": 2, "priorities": {**normal, "normal": 2}},
    }
    assert document["priorities"]["outgoing"] == {**normal, "normal": 3}
    assert document["workers"] == {"live": 1, "dead": 0}  # the test's own worker


def test_status_table_for_people_goes_to_stderr(tmp_path: Path) -> None:
    result = run("status", "--spool", str(tmp_path / "s"))
    assert result.returncode == 0
    assert result.stdout == ""
    assert "incoming" in result.stderr and "outgoing" in result.stderr


def test_spool_from_environment(tmp_path: Path) -> None:
    env = {**os.environ, "MERCLI_SPOOL": str(tmp_path / "env-spool")}
    result = subprocess.run(
        [sys.executable, "-m", "mercli", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["spool"] == str(tmp_path / "env-spool")


def test_bad_option_exits_2(tmp_path: Path) -> None:
    result = run("status", "--no-such-option", "--spool", str(tmp_path))
    assert result.returncode == 2
    assert "No such option" in result.stderr


def test_unknown_command_exits_2() -> None:
    assert run("frobnicate").returncode == 2


def test_spool_that_is_a_file_exits_4(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run("status", "--spool", str(tmp_path / "file"))
    assert result.returncode == 4
    assert result.stderr.strip() == f"Error: spool path is not a directory ({tmp_path / 'file'})"


def test_read_only_spool_exits_4(tmp_path: Path) -> None:
    """A spool on a read-only filesystem (a real tmpfs mounted ro in a private namespace)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o ro,size=1m tmpfs {mount} && "
        f"exec {sys.executable} -m mercli status --json --spool {mount}/spool"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith("Error: spool unusable: Read-only file system")
    assert result.stdout == ""


def test_permission_denied_spool_exits_4(tmp_path: Path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    command = [sys.executable, "-m", "mercli", "status", "--spool", str(parent / "spool")]
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root ignores modes: drop the capabilities that let it
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip() == f"Error: spool unusable: Permission denied ({parent / 'spool'})"


def test_python_dash_m_matches_console_script() -> None:
    import shutil

    script = shutil.which("mercli", path=str(Path(sys.executable).parent))
    assert script is not None
    direct = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0 and direct.stdout == run("--help").stdout


def test_commands_are_click_commands_named_as_listed() -> None:
    assert [command.name for command in all_commands()] == sorted(COMMAND_MODULES)
