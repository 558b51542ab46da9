"""The Slurm runner's parts that need no cluster (SPEC §7.1): configuration, the generated
batch script (run here by /bin/sh, as Slurm would), sbatch's command line, apptainer on a
cluster, squeue's time format, and the shared-filesystem check. The runner against a real
Slurm is tests/test_slurm.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from mercli.errors import ConfigError
from mercli.jobs import Module
from mercli.process.runner import module_argv
from mercli.process.slurm import (
    EXIT_FILE,
    batch_script,
    check_shared,
    deadline,
    parse_elapsed,
    read_exit,
    sbatch_argv,
)
from mercli.rules.config import load_rules

RULES = """\
[targets.out]
type = "folder"
path = "out"

{runners}

[modules.seg]
command = ["python3", "/opt/seg/run.py"]
{module}

[[rules]]
name = "r"
process = ["seg"]
targets = ["out"]
"""


def module_of(tmp_path: Path, module: str, runners: str = "") -> Module:
    path = tmp_path / "rules.toml"
    path.write_text(RULES.format(runners=runners, module=module))
    return load_rules(path).modules["seg"]


def test_runners_slurm_gives_defaults_a_module_may_override(tmp_path: Path) -> None:
    runners = (
        '[runners.slurm]\npartition = "gpu"\ngpus = "1"\ntime = "2h"\npoll_max = "10s"\n'
        'sbatch_args = ["--account=imaging", "--qos=high"]'
    )
    seg = module_of(tmp_path, 'runner = "slurm"', runners)
    assert (seg.runner, seg.partition, seg.gpus) == ("slurm", "gpu", "1")
    assert (seg.timeout, seg.poll_max) == (7200.0, 10.0)
    assert seg.sbatch_args == ("--account=imaging", "--qos=high")
    own = module_of(tmp_path, 'runner = "slurm"\npartition = "cpu"\ntimeout = "5m"', runners)
    assert (own.partition, own.gpus, own.timeout) == ("cpu", "1", 300.0)
    assert Module.from_json(json.loads(json.dumps(own.to_json()))) == own
    local = module_of(tmp_path, "", runners)
    assert (local.runner, local.partition, local.timeout) == ("local", None, 1800.0)


@pytest.mark.parametrize(
    ("module", "runners", "message"),
    [
        ('runner = "nomad"', "", 'unknown runner "nomad" (known: local, slurm)'),
        ('partition = "gpu"', "", '"partition" needs runner = "slurm"'),
        ('runner = "slurm"\nsbatch_args = ["--output=/tmp/x"]', "", "--output is set by mercli"),
        ('runner = "slurm"\nsbatch_args = ["-t", "5"]', "", "-t is set by mercli"),
        ('runner = "slurm"\nsbatch_args = ["rm -rf /"]', "", "are options"),
        ('runner = "slurm"\ngpus = "1; reboot"', "", "bad gpus"),
        ("", '[runners.slurm]\npartitions = "x"', 'unknown key "partitions"'),
        ("", '[runners.kubernetes]\nnamespace = "x"', 'unknown key "kubernetes"'),
    ],
)
def test_bad_slurm_settings_are_refused(
    tmp_path: Path, module: str, runners: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        module_of(tmp_path, module, runners)


def test_the_batch_script_runs_the_module_with_the_contract_and_records_its_status(
    tmp_path: Path,
) -> None:
    step = tmp_path / "a step with 'quotes' and spaces" / "1"
    (step / "in").mkdir(parents=True)
    (step / "out").mkdir()
    module = Module(
        "seg", command=("sh", "-c", 'echo "$MERCURE_IN_DIR|$MERCLI_OUT_DIR|$TOKEN|$PWD"; exit 3'),
        env={"TOKEN": "a b'c$HOME"},
    )  # fmt: skip
    script = step / "job.sh"
    script.write_text(batch_script(module, module_argv(module, step / "in", step / "out"), step))
    done = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 3
    assert done.stdout.strip() == f"{step / 'in'}|{step / 'out'}|a b'c$HOME|{step}"
    assert read_exit(step) == 3 and (step / EXIT_FILE).read_text() == "3\n"
    assert not (step / ".exit").exists()


def test_sbatch_gets_name_folder_log_limit_and_options(tmp_path: Path) -> None:
    module = Module(
        "seg",
        command=("true",),
        timeout=61,
        runner="slurm",
        partition="gpu",
        gpus="a100:1",
        sbatch_args=("--account=imaging",),
    )
    argv = sbatch_argv(module, tmp_path, "mercli-42")
    assert argv[:2] == ["sbatch", "--parsable"]
    assert "--job-name=mercli-42" in argv and f"--chdir={tmp_path}" in argv
    assert f"--output={tmp_path / 'slurm.log'}" in argv
    assert "--time=2" in argv  # 61 s: whole minutes, rounded up
    assert "--partition=gpu" in argv and "--gpus=a100:1" in argv
    assert argv[-2:] == ["--account=imaging", str(tmp_path / "job.sh")]
    assert "--time=1" in sbatch_argv(Module("s", command=("t",), timeout=5), tmp_path, "x")


def test_apptainer_on_a_cluster_is_the_scripts_command(tmp_path: Path) -> None:
    module = Module(
        "ocr", image="docker://registry.example.org/ocr:1.2", container="apptainer",
        runner="slurm", env={"OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    step = tmp_path / "1"
    text = batch_script(module, module_argv(module, step / "in", step / "out"), step)
    command = text.splitlines()[-4]
    assert command.startswith("apptainer run ") and command.endswith(" </dev/null")
    assert f"{step / 'in'}:/tmp/data" in command and f"{step / 'out'}:/tmp/output" in command
    assert "docker://registry.example.org/ocr:1.2" in command


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:00", 0), ("0:07", 7), ("5:03", 303), ("1:02:03", 3723), ("2-01:02:03", 176523), ("", 0)],
)
def test_squeue_elapsed_times_parse(text: str, seconds: float) -> None:
    assert parse_elapsed(text) == seconds


def test_the_deadline_is_the_timeout_and_ten_percent_within_bounds() -> None:
    assert (deadline(2), deadline(300), deadline(7200)) == (7, 330, 7260)


def test_a_tmpfs_spool_is_refused_for_the_cluster(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("/dev/shm is missing: the check has nothing to test on this machine")
    assert "tmpfs" in check_shared(shm)
    assert check_shared(tmp_path) == "" or "tmpfs" in check_shared(tmp_path)
