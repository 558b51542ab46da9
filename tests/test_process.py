"""Processing (SPEC §7): `[modules.NAME]`, rules with `process` and every refusal with its
line; route making processing jobs (series and study) with the loop guard; `mercli process`
running real module scripts (written here, run with this Python) and publishing their output.

`mercli run` supervises `process` when the rules define modules.
"""

# ruff: noqa: E501  (tables of exact messages read best one per line)

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from mercli.cli import cli
from mercli.errors import ConfigError, ExitCode
from mercli.jobs import HOPS_KEY, Module, Target
from mercli.process.service import ProcessService, ProcessSummary
from mercli.rules.config import load_rules
from mercli.spool import (
    DISCARD,
    ERROR,
    INCOMING,
    JOB_FILE,
    OUTGOING,
    PROCESSING,
    SUCCESS,
    Spool,
    Worker,
    recover,
)
from mercli.supervisor import RunConfig, plan
from tests.crashkit import run_until_done
from tests.netkit import wait_until
from tests.test_dispatch import dispatch_once
from tests.test_route import receive_file, route_all, series_files
from tests.test_studies import complete_due

FOLDER = '[targets.out]\ntype = "folder"\npath = "out"\n'
SEG = '[modules.seg]\ncommand = ["python3", "/opt/seg/run.py"]\n'
OCR = '[modules.ocr]\nimage = "registry.example.org/ocr:1.2"\ncontainer = "podman"\n'
PROCESS = '[[rules]]\nname = "r"\nprocess = ["seg"]\ntargets = ["out"]\n'

EXAMPLE = """\
[targets.out]
type = "folder"
path = "out"

[modules.seg]
command = ["python3", "/opt/seg/run.py", "--fast"]
timeout = "10m"
settings = { threshold = 0.5, labels = ["liver", "spleen"], model = { name = "m", version = 2 } }
env = { OMP_NUM_THREADS = "2" }
retry_delay = "1m"
max_attempts = 5

[modules.ocr]
image = "registry.example.org/ocr:1.2"
container = "apptainer"

[[rules]]
name = "ct-seg"
when = 'Modality == "CT"'
process = ["seg", "ocr"]
process_settings = { threshold = 0.7 }
targets = ["out"]

[[rules]]
name = "mr-seg"
trigger = "study"
process = "seg"
results = "route"

[[rules]]
name = "plain"
targets = ["out"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_modules_and_processing_rules_load_with_defaults(tmp_path: Path) -> None:
    ruleset = load_rules(write(tmp_path, EXAMPLE))
    seg, ocr = ruleset.modules["seg"], ruleset.modules["ocr"]
    assert seg == Module(
        name="seg",
        command=("python3", "/opt/seg/run.py", "--fast"),
        timeout=600.0,
        settings={
            "threshold": 0.5,
            "labels": ["liver", "spleen"],
            "model": {"name": "m", "version": 2},
        },
        env={"OMP_NUM_THREADS": "2"},
        retry_delay=60.0,
        max_attempts=5,
    )
    assert ocr == Module(name="ocr", image="registry.example.org/ocr:1.2", container="apptainer")
    assert (ocr.timeout, ocr.retry_delay, ocr.retry_backoff, ocr.retry_max_delay) == (
        1800.0,
        30.0,
        2.0,
        600.0,
    )
    assert (ocr.max_attempts, ocr.max_age, ocr.command, ocr.settings, ocr.env) == (
        3,
        86400.0,
        (),
        {},
        {},
    )
    ct, mr, plain = ruleset.rules
    assert (ct.process, ct.process_settings, ct.results, ct.targets) == (
        ("seg", "ocr"),
        {"threshold": 0.7},
        None,
        ("out",),
    )
    assert (mr.process, mr.results, mr.targets, mr.study) == (("seg",), "route", (), True)
    assert (plain.process, plain.process_settings, plain.results) == ((), {}, None)


def test_module_json_round_trip(tmp_path: Path) -> None:
    ruleset = load_rules(write(tmp_path, EXAMPLE))
    for module in ruleset.modules.values():
        document = json.loads(json.dumps(module.to_json()))
        assert Module.from_json(document) == module
        assert Module.from_json({**document, "added_later": 1}) == module
    assert ruleset.modules["seg"].to_json()["command"] == ["python3", "/opt/seg/run.py", "--fast"]


# (text, line, message): the error must read exactly `<file>:<line>: <message>`.
ERRORS = [
    (
        FOLDER + "[modules.seg]\ntimeout = 5\n" + PROCESS,
        4,
        'module "seg": give "command" (argv, run on the host) or "image" (a container), not both',
    ),
    (
        FOLDER + SEG + 'image = "x"\ncontainer = "docker"\n' + PROCESS,
        6,
        'module "seg": give "command" (argv, run on the host) or "image" (a container), not both',
    ),
    (
        FOLDER + '[modules.seg]\ncommand = "python3 run.py"\n' + PROCESS,
        5,
        'module "seg": "command" must be a list of strings (argv, no shell)',
    ),
    (
        FOLDER + "[modules.seg]\ncommand = []\n" + PROCESS,
        5,
        'module "seg": "command" must name a program first',
    ),
    (
        FOLDER + '[modules.seg]\nimage = "reg/seg:1"\n' + PROCESS,
        4,
        'module "seg": "image" needs container = "docker", "podman", "apptainer"',
    ),
    (
        FOLDER + '[modules.seg]\nimage = "reg/seg:1"\ncontainer = "lxc"\n' + PROCESS,
        6,
        'module "seg": unknown container "lxc" (known: docker, podman, apptainer)',
    ),
    (
        FOLDER + SEG + "timeout = 0\n" + PROCESS,
        6,
        'module "seg": "timeout" must be more than 0',
    ),
    (
        FOLDER + SEG + "setings = {}\n" + PROCESS,
        6,
        'module "seg": unknown key "setings" (did you mean "settings"? allowed: command, image, container, timeout, settings, env, retry_delay, retry_backoff, retry_max_delay, max_attempts, max_age, notify, notify_on, runner, partition, gpus, sbatch_args)',
    ),
    (
        FOLDER + SEG + "settings = { when = 1979-05-27 }\n" + PROCESS,
        6,
        'module "seg": "settings" must hold strings, numbers, booleans, arrays and tables only (no dates, inf or nan)',
    ),
    (
        FOLDER + SEG + "env = { THREADS = 2 }\n" + PROCESS,
        6,
        'module "seg": env "THREADS" must be a string (quote numbers)',
    ),
    (
        FOLDER + SEG + 'env = { MERCURE_OUT_DIR = "/" }\n' + PROCESS,
        6,
        'module "seg": "MERCURE_OUT_DIR" is set by mercli, not by env',
    ),
    (
        FOLDER + SEG + 'env = { "A-B" = "1" }\n' + PROCESS,
        6,
        "module \"seg\": bad environment variable name 'A-B'",
    ),
    (
        FOLDER + SEG + "max_attempts = -1\n" + PROCESS,
        6,
        'module "seg": "max_attempts" must be between 0 and 1000000, not -1',
    ),
    (
        FOLDER + SEG + '[[rules]]\nname = "r"\nprocess = ["sge"]\ntargets = ["out"]\n',
        8,
        'rule "r": unknown module "sge" (did you mean "seg"?)',
    ),
    (
        FOLDER + '[[rules]]\nname = "r"\nprocess = ["seg"]\ntargets = ["out"]\n',
        6,
        'rule "r": unknown module "seg" (no [modules] defined)',
    ),
    (
        FOLDER
        + SEG
        + OCR
        + '[[rules]]\nname = "r"\nprocess = ["seg", "ocr", "seg"]\ntargets = ["out"]\n',
        11,
        'rule "r": module "seg" twice in the chain (a loop): a module runs once',
    ),
    (
        FOLDER + SEG + '[[rules]]\nname = "r"\nprocess = ["seg"]\n',
        6,
        'rule "r": no targets for the output (add targets = [...], or results = "route")',
    ),
    (
        FOLDER
        + SEG
        + '[[rules]]\nname = "r"\nprocess = ["seg"]\nresults = "route"\ntargets = ["out"]\n',
        10,
        'rule "r": results = "route" sends the output back through the rules: no targets',
    ),
    (
        FOLDER + SEG + '[[rules]]\nname = "r"\nprocess = ["seg"]\nresults = "pacs"\n',
        9,
        'rule "r": results must be "route", not "pacs"',
    ),
    (
        FOLDER + SEG + '[[rules]]\nname = "r"\nresults = "route"\n',
        8,
        'rule "r": "results" needs process = ["module", ...]',
    ),
    (
        FOLDER + SEG + '[[rules]]\nname = "r"\ntargets = ["out"]\nprocess_settings = { a = 1 }\n',
        9,
        'rule "r": "process_settings" needs process = ["module", ...]',
    ),
    (
        FOLDER + SEG + '[[rules]]\nname = "r"\naction = "discard"\nprocess = ["seg"]\n',
        9,
        'rule "r": a rule with action = "discard" cannot process',
    ),
    (
        FOLDER
        + SEG
        + '[[rules]]\nname = "r"\nprocess = ["seg"]\nprocess_settings = 3\ntargets = ["out"]\n',
        9,
        'rule "r": "process_settings" must be a table (process_settings = {...})',
    ),
    (
        FOLDER + '[modules."a b"]\ncommand = ["x"]\n' + PROCESS,
        4,
        "module \"a b\": module names are letters, digits, '.', '_' and '-'",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_bad_modules_and_processing_rules_are_refused_with_their_line(
    tmp_path: Path, text: str, line: int | None, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    where = f"{path}:{line}" if line else str(path)
    assert str(info.value) == f"{where}: {message}"
    assert info.value.exit_code == ExitCode.CONFIG


def test_rules_check_shows_the_chain(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["rules", "check", str(write(tmp_path, EXAMPLE))])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        "  ct-seg: process seg | ocr -> out",
        "  mr-seg: process seg -> (rules)",
        "  plain: -> out",
    ]


ROUTE_RULES = """\
[targets.out]
type = "folder"
path = "out"

[targets.orig]
type = "folder"
path = "orig"

[modules.seg]
command = ["python3", "seg.py"]
settings = { threshold = 0.5 }

[modules.other]
command = ["python3", "other.py"]

[[rules]]
name = "seg"
when = 'Modality == "CT"'
process = ["seg"]
process_settings = { threshold = 0.7 }
priority = "urgent"
targets = ["out"]

[[rules]]
name = "again"
when = 'Modality == "MR"'
process = ["other", "seg"]
results = "route"

[[rules]]
name = "orig"
when = 'Modality == "CT" or "PROC" in SeriesDescription'
targets = ["orig"]
"""
SERIES = "1.2.826.0.1.3680043.77.1"


def receive_series(tmp_path: Path, spool: Spool, uid: str, count: int, **attrs: object) -> None:
    meta = {key: attrs.pop(key) for key in ("SenderAET", HOPS_KEY) if key in attrs}
    files = series_files(tmp_path / "files" / uid, uid, count, **attrs)
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path, **meta)


def records(spool: Spool, state: str) -> list[dict[str, object]]:
    return [json.loads((item.path / JOB_FILE).read_text()) for item in spool.items(state)]


def test_route_makes_a_series_processing_job_in_the_same_transaction(
    tmp_path: Path, spool: Spool
) -> None:
    rules = write(tmp_path, ROUTE_RULES)
    ruleset = load_rules(rules)
    receive_series(tmp_path, spool, SERIES, 3)
    summary = route_all(spool, rules)
    assert not list(spool.items(INCOMING))
    (job,) = spool.items(PROCESSING)
    (original,) = spool.items(OUTGOING)
    assert summary.processing == [job.name] and set(summary.jobs) == {job.name, original.name}
    record = json.loads((job.path / JOB_FILE).read_text())
    assert record["id"] == job.name and record["series"] == SERIES
    assert record["SeriesInstanceUID"] == SERIES and record["instances"] == 3
    assert record["rules"] == ["seg"] and record["priority"] == "urgent"
    assert record["process"] == [ruleset.modules["seg"].to_json()]
    assert Module.from_json(record["process"][0]).settings == {"threshold": 0.5}
    assert record["process_settings"] == {"threshold": 0.7}
    assert [Target.from_json(t) for t in record["targets"]] == [ruleset.targets["out"]]
    assert record["processing_hops"] == 1
    assert not {"target", "reason", "results", "study"} & set(record)
    dcm = sorted(job.path.glob("*.dcm"))
    assert len(dcm) == 3 and len(list(job.path.glob("*.tags"))) == 3
    for path in dcm:  # hard links, shared with the job that sends the originals
        assert path.stat().st_ino == (original.path / path.name).stat().st_ino
    assert json.loads((original.path / JOB_FILE).read_text())["target"]["name"] == "orig"


def test_results_route_and_the_loop_guard(tmp_path: Path, spool: Spool) -> None:
    rules = write(tmp_path, ROUTE_RULES)
    receive_series(tmp_path, spool, SERIES + ".1", 2, modality="MR")  # received: processed
    made_by_seg = {"SenderAET": "mercli-process:seg", HOPS_KEY: 1}
    receive_series(tmp_path, spool, SERIES + ".2", 2, modality="MR", **made_by_seg)
    desc = {"SeriesDescription": "PROC seg", **made_by_seg}
    receive_series(tmp_path, spool, SERIES + ".3", 1, modality="MR", **desc)
    made_by_x = {"SenderAET": "mercli-process:x", HOPS_KEY: 3}
    receive_series(tmp_path, spool, SERIES + ".4", 1, modality="MR", **made_by_x)
    too_deep = {"SenderAET": "mercli-process:x", HOPS_KEY: 4}
    receive_series(tmp_path, spool, SERIES + ".5", 1, modality="MR", **too_deep)
    route_all(spool, rules)
    processing = {r["series"]: r for r in records(spool, PROCESSING)}
    assert set(processing) == {SERIES + ".1", SERIES + ".4"}
    first = processing[SERIES + ".1"]
    assert (first["results"], first["processing_hops"], first["rules"]) == ("route", 1, ["again"])
    assert [m["name"] for m in first["process"]] == ["other", "seg"] and "targets" not in first
    assert processing[SERIES + ".4"]["processing_hops"] == 4
    discarded = {r["series"]: r["reason"] for r in records(spool, DISCARD)}
    assert discarded == {
        SERIES + ".2": 'rule "again": made by module "seg", not processed by it again',
        SERIES + ".5": 'rule "again": processed 4 times already (at most 4)',
    }
    (sent,) = records(spool, OUTGOING)  # routed on by another rule, not processed again
    assert (sent["series"], sent["target"]["name"]) == (SERIES + ".3", "orig")


def test_study_rule_makes_a_study_processing_job(tmp_path: Path, spool: Spool) -> None:
    text = ROUTE_RULES.replace('name = "seg"\n', 'name = "seg"\ntrigger = "study"\n')
    rules = write(tmp_path, text)
    study = "1.2.826.0.1.3680043.77.9"
    for n, description in enumerate(("T1", "FLAIR")):
        uid = f"{study}.{n + 1}"
        receive_series(tmp_path, spool, uid, 2, study=study, SeriesDescription=description)
    route_all(spool, rules)
    assert not list(spool.items(PROCESSING))  # held for the study first
    made, _ = complete_due(spool, load_rules(rules), float("inf"))
    (job,) = spool.items(PROCESSING)
    assert made == [job.name]
    record = json.loads((job.path / JOB_FILE).read_text())
    assert record["study"] is True and record["StudyInstanceUID"] == study
    assert [s["SeriesInstanceUID"] for s in record["series"]] == [f"{study}.1", f"{study}.2"]
    assert record["instances"] == 4 and record["rules"] == ["seg"]
    assert record["processing_hops"] == 1 and record["targets"][0]["name"] == "out"
    for entry in record["series"]:
        assert len(list((job.path / entry["series"]).glob("*.dcm"))) == 2


def test_run_supervises_process_when_the_rules_define_modules(tmp_path: Path) -> None:
    config = RunConfig(tmp_path / "spool", write(tmp_path, ROUTE_RULES))
    assert [part.name for part in plan(config)] == ["receive", "route", "dispatch"]
    with_modules = [part.name for part in plan(replace(config, process=True))]
    assert with_modules == ["receive", "route", "process", "dispatch"]
    assert plan(replace(config, process=True))[2].args[-3:] == [
        "process",
        "--spool",
        str(tmp_path / "spool"),
    ]


# -- mercli process ---------------------------------------------------------------------------

COPY_MODULE = """\
import json, os, sys
from pathlib import Path
import pydicom
from pydicom.uid import generate_uid

prefix = sys.argv[1]
in_dir, out_dir = Path(os.environ["MERCURE_IN_DIR"]), Path(os.environ["MERCURE_OUT_DIR"])
task = json.loads((in_dir / "task.json").read_text())
names = sorted(p.name for p in in_dir.iterdir())
series = {}
for path in sorted(in_dir.glob("*.dcm")):
    ds = pydicom.dcmread(path)
    uid = series.setdefault(ds.SeriesInstanceUID, generate_uid())
    ds.SeriesInstanceUID = uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription = prefix + " " + str(ds.get("SeriesDescription", ""))
    ds.save_as(out_dir / (uid + "#" + ds.SOPInstanceUID + ".dcm"))
print("copied", len(names), "files")
result = {"task": task, "inputs": names, "env": os.environ.get("MODULE_ENV", "")}
(out_dir / "result.json").write_text(json.dumps(result))
"""

PROCESS_RULES = """\
[targets.out]
type = "folder"
path = "out"

[targets.orig]
type = "folder"
path = "orig"

[modules.copy]
command = [{python}, "{module}", "PROC"]
settings = {{ level = 1, keep = "yes" }}
env = {{ MODULE_ENV = "set" }}
retry_delay = 0.05
max_attempts = {attempts}
timeout = {timeout}

[modules.again]
command = [{python}, "{module}", "AGAIN"]

[[rules]]
name = "ai"
when = 'Modality == "CT" and not "PROC" in SeriesDescription'
process = [{chain}]
process_settings = {{ level = 2 }}
{outputs}

[[rules]]
name = "orig"
when = 'Modality == "CT"'
targets = ["orig"]
"""


# The fields mercure's task model (pydantic, extra fields forbidden at the top) requires,
# from its documented contract: a module that loads task.json with it must find them.
MERCURE_TASK_INFO_REQUIRED = {
    *("action", "uid", "uid_type", "triggered_rules", "applied_rule", "patient_name", "mrn"),
    *("acc", "mercure_version", "mercure_appliance", "mercure_server"),
}
MERCURE_TASK_PROCESSING_REQUIRED = {"module_name", "settings", "retain_input_images"}
MERCURE_TASK_STUDY_REQUIRED = {
    *("study_uid", "complete_trigger", "complete_required_series", "creation_time"),
    "last_receive_time",
}


def process_rules(
    tmp_path: Path,
    module: str = COPY_MODULE,
    *,
    chain: str = '"copy"',
    outputs: str = 'targets = ["out"]',
    attempts: int = 3,
    timeout: float = 60,
) -> Path:
    script = tmp_path / "module.py"
    script.write_text(module)
    text = PROCESS_RULES.format(
        python=json.dumps(sys.executable),
        module=script,
        chain=chain,
        outputs=outputs,
        attempts=attempts,
        timeout=timeout,
    )
    return write(tmp_path, text)


def process_once(spool: Spool) -> ProcessSummary:
    return ProcessService(spool.root, 1).run(once=True)


def error_record(spool: Spool) -> dict[str, object]:
    (item,) = spool.items(ERROR)
    return dict(json.loads((item.path / "error.json").read_text()))


def test_copy_module_output_reaches_the_target(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path)
    receive_series(tmp_path, spool, SERIES, 3, SeriesDescription="CHEST")
    route_all(spool, rules)
    (job,) = spool.items(PROCESSING)
    summary = process_once(spool)
    assert (summary.processed, summary.failed, summary.retried) == (1, 0, 0)
    assert not list(spool.items(PROCESSING))
    (done,) = spool.items(SUCCESS)
    assert done.name == job.name
    result = json.loads((done.path / "result.json").read_text())
    assert "copied 7 files" in (done.path / "module.log").read_text()  # 3 + 3 sidecars + task
    assert result["env"] == "set"
    assert sum(name.endswith(".tags") for name in result["inputs"]) == 3
    assert f"{SERIES}#" in result["inputs"][0] and "task.json" in result["inputs"]
    task = result["task"]
    assert task["id"] == job.name
    assert set(task) == {"id", "info", "dispatch", "process", "study"}
    assert set(task["info"]) >= MERCURE_TASK_INFO_REQUIRED and task["study"] == {}
    assert set(task["process"]) >= MERCURE_TASK_PROCESSING_REQUIRED
    assert task["info"]["uid"] == SERIES and task["info"]["uid_type"] == "series"
    assert task["info"]["triggered_rules"] == {"ai": True}
    assert task["process"]["module_name"] == "copy"
    assert task["process"]["settings"] == {"level": 2, "keep": "yes"}
    outgoing = records(spool, OUTGOING)
    derived = [r for r in outgoing if r["target"]["name"] == "out"]  # type: ignore[index]
    assert len(derived) == 1 and derived[0]["instances"] == 3 and derived[0]["rules"] == ["ai"]
    assert derived[0]["SeriesInstanceUID"] != SERIES
    assert dispatch_once(spool).returncode == 0
    (folder,) = (tmp_path / "out").iterdir()
    sidecars = [json.loads(p.read_text()) for p in folder.glob("*.tags")]
    assert {s["SenderAET"] for s in sidecars} == {"mercli-process:copy"}
    assert {s[HOPS_KEY] for s in sidecars} == {1}
    assert {s["SeriesDescription"] for s in sidecars} == {"PROC CHEST"}
    assert len(list(folder.glob("*.dcm"))) == 3
    (original,) = (tmp_path / "orig").iterdir()
    assert len(list(original.glob("*.dcm"))) == 3
    events = [json.loads(line) for p in (spool.root / "events").iterdir() for line in p.open()]
    (processed,) = [e for e in events if e.get("event") == "processed"]
    assert processed["rule"] == "ai" and processed["status"] == [0]
    assert processed["result"]["env"] == "set"


def test_chain_of_two_modules(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, chain='"copy", "again"')
    receive_series(tmp_path, spool, SERIES, 2, SeriesDescription="CHEST")
    route_all(spool, rules)
    assert process_once(spool).processed == 1
    (derived,) = [r for r in records(spool, OUTGOING) if r["target"]["name"] == "out"]  # type: ignore[index]
    (item,) = [i for i in spool.items(OUTGOING) if i.name == derived["id"]]
    sidecars = [json.loads(p.read_text()) for p in item.path.glob("*.tags")]
    assert {s["SeriesDescription"] for s in sidecars} == {"AGAIN PROC CHEST"}
    assert {s["SenderAET"] for s in sidecars} == {"mercli-process:again"}
    (done,) = spool.items(SUCCESS)
    log_text = (done.path / "module.log").read_text()
    assert "--- module copy" in log_text and "--- module again" in log_text


def test_study_processing_gets_every_series(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, outputs='targets = ["out"]\ntrigger = "study"')
    study = "1.2.826.0.1.3680043.77.9"
    for n in range(2):
        receive_series(tmp_path, spool, f"{study}.{n + 1}", 2, study=study)
    route_all(spool, rules)
    complete_due(spool, load_rules(rules), float("inf"))
    assert process_once(spool).processed == 1
    (done,) = spool.items(SUCCESS)
    result = json.loads((done.path / "result.json").read_text())
    assert result["task"]["info"]["uid_type"] == "study"
    assert result["task"]["info"]["uid"] == study
    task_study = result["task"]["study"]
    assert set(task_study) >= MERCURE_TASK_STUDY_REQUIRED and task_study["study_uid"] == study
    assert sorted(task_study["received_series_uid"]) == [f"{study}.1", f"{study}.2"]
    inputs = [name for name in result["inputs"] if name.endswith(".dcm")]
    assert sorted({name.partition("#")[0] for name in inputs}) == [f"{study}.1", f"{study}.2"]
    derived = [r for r in records(spool, OUTGOING) if r["target"]["name"] == "out"]  # type: ignore[index]
    assert sorted(r["instances"] for r in derived) == [2, 2]  # one job per output series


FLAKY_MODULE = (
    """\
import os, sys, pathlib
count = pathlib.Path(__file__).with_name("runs")
runs = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(runs))
if runs <= 2:
    print("failing, run", runs)
    sys.exit(3)
"""
    + COPY_MODULE
)


def test_a_module_that_fails_twice_then_succeeds(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, FLAKY_MODULE)
    receive_series(tmp_path, spool, SERIES, 1)
    route_all(spool, rules)
    summaries: list[ProcessSummary] = []

    def processed() -> bool:
        summaries.append(process_once(spool))
        return bool(list(spool.items(SUCCESS)))

    wait_until(processed, timeout=20, what="the third run")
    assert sum(s.retried for s in summaries) == 2 and sum(s.failed for s in summaries) == 0
    (done,) = spool.items(SUCCESS)
    progress = json.loads((done.path / "process.json").read_text())
    assert progress["attempts"] == 3 and progress["last_error"] == ""
    assert (tmp_path / "runs").read_text() == "3"


def test_a_module_that_fails_for_good_goes_to_error_with_its_log(
    tmp_path: Path, spool: Spool
) -> None:
    rules = process_rules(tmp_path, FLAKY_MODULE, attempts=1)
    receive_series(tmp_path, spool, SERIES, 1)
    route_all(spool, rules)
    assert process_once(spool).failed == 1
    error = error_record(spool)
    assert error["reason"] == 'module "copy": exit status 3'
    assert error["status"] == 3 and error["attempts"] == 1
    assert "failing, run 1" in str(error["log_tail"])
    assert not list(spool.items(OUTGOING))[1:]  # only the originals' job


HANGING_MODULE = """\
import os, subprocess, sys, time, pathlib
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pathlib.Path(__file__).with_name("child.pid").write_text(str(child.pid))
print("hanging", flush=True)
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_a_hanging_module_is_killed_with_its_children(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, HANGING_MODULE, attempts=1, timeout=1)
    receive_series(tmp_path, spool, SERIES, 1)
    route_all(spool, rules)
    assert process_once(spool).failed == 1
    child = int((tmp_path / "child.pid").read_text())
    wait_until(lambda: gone(child), timeout=10, what="the module's child to die")
    error = error_record(spool)
    assert error["reason"] == 'module "copy": timed out after 1 s'
    assert "hanging" in str(error["log_tail"]) and "killed after" in str(error["log_tail"])


MERCURE_DUMMY_PROCESSOR = """\
#!/bin/sh
# What mercure's own dummy processor does: copy everything in in/ to out/.
set -e
cp -r "$MERCURE_IN_DIR/." "$MERCURE_OUT_DIR"
echo '{"foo": "bar"}' > "$MERCURE_OUT_DIR/result.json"
"""


def test_a_module_that_copies_in_to_out_as_mercure_modules_do(tmp_path: Path, spool: Spool) -> None:
    """task.json and the .tags sidecars copied to out/ are not output (mercure takes the
    *.dcm files too): the instances go on, byte for byte, with sidecars made anew."""
    script = tmp_path / "dummy.sh"
    script.write_text(MERCURE_DUMMY_PROCESSOR)
    script.chmod(0o755)
    rules = process_rules(tmp_path)
    rules.write_text(
        rules.read_text()
        .replace(f"{json.dumps(sys.executable)}, ", "", 1)
        .replace(f'"{tmp_path / "module.py"}", "PROC"', json.dumps(str(script)))
    )
    receive_series(tmp_path, spool, SERIES, 3, SeriesDescription="CHEST")
    route_all(spool, rules)
    (job,) = spool.items(PROCESSING)
    inputs = {p.name: p.read_bytes() for p in job.path.glob("*.dcm")}
    assert process_once(spool).processed == 1
    (done,) = spool.items(SUCCESS)
    assert json.loads((done.path / "result.json").read_text()) == {"foo": "bar"}
    log_text = (done.path / "module.log").read_text()
    assert "not output (not *.dcm): " in log_text and "task.json" in log_text
    (derived,) = [
        r
        for r in spool.items(OUTGOING)
        if json.loads((r.path / "job.json").read_text())["target"]["name"] == "out"
    ]
    outputs = {p.name: p.read_bytes() for p in derived.path.glob("*.dcm")}
    assert sorted(outputs.values()) == sorted(inputs.values())
    sidecars = [json.loads(p.read_text()) for p in derived.path.glob("*.tags")]
    assert {s["SenderAET"] for s in sidecars} == {"mercli-process:copy"}
    assert {s["SeriesInstanceUID"] for s in sidecars} == {SERIES}


def test_in_holds_the_spools_sidecars_and_outputs_reach_every_target(
    tmp_path: Path, spool: Spool
) -> None:
    """The first module's in/ sidecars are the spool's (linked: same bytes); with two
    targets, both jobs hold the same (linked) output."""
    rules = process_rules(tmp_path, outputs='targets = ["out", "orig"]')
    receive_series(tmp_path, spool, SERIES, 2, SeriesDescription="CHEST")
    route_all(spool, rules)
    (job,) = spool.items(PROCESSING)
    spool_sidecars = sorted(p.read_bytes() for p in job.path.glob("*.tags"))
    seen = tmp_path / "seen"
    module = COPY_MODULE + (
        "import shutil\n"
        f"shutil.copytree(in_dir, {str(seen)!r}, ignore=shutil.ignore_patterns('*.dcm'))\n"
    )
    (tmp_path / "module.py").write_text(module)
    assert process_once(spool).processed == 1
    assert sorted(p.read_bytes() for p in seen.glob("*.tags")) == spool_sidecars
    jobs = [r for r in spool.items(OUTGOING) if r.name != job.name]
    derived = [j for j in jobs if SERIES not in (j.path / "job.json").read_text()]
    assert len(derived) == 2
    first, second = (
        sorted(p.name for p in j.path.iterdir() if p.suffix in (".dcm", ".tags")) for j in derived
    )
    assert first == second and len(first) == 4
    for name in first:
        assert (derived[0].path / name).read_bytes() == (derived[1].path / name).read_bytes()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            '(out_dir / "garbage.dcm").write_bytes(b"not dicom at all" * 10)',
            "output 'garbage.dcm' is not DICOM",
        ),
        (
            '(out_dir / "escape.dcm").symlink_to(next(in_dir.glob("*.dcm")))',
            "output 'escape.dcm' is a symlink",
        ),
        ('(out_dir / "sub.dcm").mkdir()', "output 'sub.dcm' is not a regular file"),
        (
            '(out_dir / "task.json").symlink_to("/etc/passwd")',
            "output 'task.json' is a symlink",
        ),
        ("pass", "wrote no DICOM output (*.dcm)"),
        ('(out_dir / "report.txt").write_text("no DICOM here")', "wrote no DICOM output"),
    ],
)
def test_bad_output_is_refused_naming_the_file(
    tmp_path: Path, spool: Spool, body: str, reason: str
) -> None:
    module = "import os\nfrom pathlib import Path\n"
    module += 'in_dir, out_dir = Path(os.environ["MERCURE_IN_DIR"]), Path(os.environ["MERCURE_OUT_DIR"])\n'
    rules = process_rules(tmp_path, module + body + "\n", attempts=1)
    receive_series(tmp_path, spool, SERIES, 1)
    route_all(spool, rules)
    assert process_once(spool).failed == 1
    assert str(error_record(spool)["reason"]).startswith(f'module "copy": {reason}')
    assert [r["target"]["name"] for r in records(spool, OUTGOING)] == ["orig"]  # type: ignore[index]


def test_results_route_goes_back_through_the_rules_once(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, outputs='results = "route"')
    text = rules.read_text().replace('and not "PROC" in SeriesDescription', "")
    rules.write_text(text)  # the guard alone stops the loop
    receive_series(tmp_path, spool, SERIES, 2, SeriesDescription="CHEST")
    route_all(spool, rules)
    assert process_once(spool).processed == 1
    (batch,) = spool.items(INCOMING)
    assert spool.read_hint(batch.name) is not None  # routed after settle, not the timeout
    route_all(spool, rules)
    assert not list(spool.items(PROCESSING))  # not processed by "copy" again
    names = sorted(r["SeriesInstanceUID"] == SERIES for r in records(spool, OUTGOING))
    assert names == [False, True]  # the derived series and the originals, both to "orig"


def test_kill_9_mid_module_kills_the_module_and_reruns_it(tmp_path: Path, spool: Spool) -> None:
    module = (
        """\
import os, pathlib, time
marker = pathlib.Path(__file__).with_name("hung-once")
if not marker.exists():
    marker.write_text(str(os.getpid()))
    time.sleep(600)
"""
        + COPY_MODULE
    )
    rules = process_rules(tmp_path, module)
    receive_series(tmp_path, spool, SERIES, 2)
    route_all(spool, rules)
    command = [sys.executable, "-m", "mercli", "process", "--spool", str(spool.root)]
    service = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    marker = tmp_path / "hung-once"
    wait_until(marker.exists, timeout=30, what="the module to start")
    wait_until(lambda: bool(marker.read_text()), timeout=5)
    module_pid = int(marker.read_text())
    os.kill(service.pid, signal.SIGKILL)
    service.wait()
    wait_until(lambda: gone(module_pid), timeout=10, what="the module to die with mercli")
    assert not list(spool.items(OUTGOING))[1:] and not list(spool.items(SUCCESS))
    assert process_once(spool).processed == 1  # recovery, then a clean run
    assert dispatch_once(spool).returncode == 0
    (folder,) = (tmp_path / "out").iterdir()
    assert len(list(folder.glob("*.dcm"))) == 2


def test_resend_from_error_runs_a_processing_job_again(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, FLAKY_MODULE, attempts=1)
    receive_series(tmp_path, spool, SERIES, 2)
    route_all(spool, rules)
    assert process_once(spool).failed == 1
    (failed,) = spool.items(ERROR)
    result = CliRunner().invoke(
        cli, ["resend", "--spool", str(spool.root), "--from", "error", failed.name]
    )
    assert result.exit_code == 0, result.output
    assert not list(spool.items(ERROR))
    (job,) = spool.items(PROCESSING)
    record = json.loads((job.path / JOB_FILE).read_text())
    assert record["id"] == job.name and record["resent_from"] == f"error/{failed.name}"
    assert sorted(p.name for p in job.path.iterdir() if not p.name.endswith((".dcm", ".tags"))) == [
        JOB_FILE
    ]
    assert len(list(job.path.glob("*.dcm"))) == 2
    assert process_once(spool).failed == 1  # run 2 fails too; max_attempts = 1
    (failed,) = spool.items(ERROR)
    CliRunner().invoke(cli, ["resend", "--spool", str(spool.root), "--from", "error", failed.name])
    assert process_once(spool).processed == 1  # run 3 succeeds


PLAIN_COPY = """\
import os, shutil
from pathlib import Path
out_dir = Path(os.environ["MERCURE_OUT_DIR"])
for path in Path(os.environ["MERCURE_IN_DIR"]).glob("*.dcm"):
    shutil.copyfile(path, out_dir / path.name)
(out_dir / "result.json").write_text('{"ok": true}')
"""


def test_publishing_survives_kill_at_every_step(tmp_path: Path) -> None:
    root, template = tmp_path / "spool", tmp_path / "template"
    rules = process_rules(tmp_path, PLAIN_COPY)
    receive_series(tmp_path, Spool.open(template), SERIES, 2)
    route_all(Spool(template), rules)
    (job,) = Spool(template).items(PROCESSING)

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root)

    def scenario() -> None:
        ProcessService(root, 1).run(once=True)

    def outputs(spool: Spool) -> list[dict[str, object]]:
        return [r for r in records(spool, OUTGOING) if r["target"]["name"] == "out"]  # type: ignore[index]

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        if list(spool.items(PROCESSING)):  # rolled back: nothing published
            assert outputs(spool) == [] and not list(spool.items(SUCCESS)), step
            assert process_once(spool).processed == 1, step
        (done,) = spool.items(SUCCESS)
        assert done.name == job.name, step
        assert json.loads((done.path / "result.json").read_text()) == {"ok": True}, step
        (output,) = outputs(spool)  # exactly once
        folder = spool.state_dir(OUTGOING) / str(output["id"])
        assert len(list(folder.glob("*.dcm"))) == 2 == len(list(folder.glob("*.tags"))), step
        assert list(spool.claims.iterdir()) == [] and not list(spool.items(ERROR)), step
        assert [p for p in (root / "tmp").rglob("*") if p.is_file()] == [], step

    assert run_until_done(scenario, check, setup) > 20


def test_derived_series_reaches_dcmtk_storescp(tmp_path: Path, spool: Spool) -> None:
    from pydicom import dcmread

    from tests.reliability.kit import storescp

    received = tmp_path / "storescp"
    with storescp(received) as port:
        rules = process_rules(tmp_path)
        pacs = f'[targets.pacs]\ntype = "dicom"\nhost = "127.0.0.1"\nport = {port}\ncalled_aet = "PACS"\n'
        rules.write_text(
            pacs + rules.read_text().replace('targets = ["out"]', 'targets = ["pacs"]')
        )
        receive_series(tmp_path, spool, SERIES, 3, SeriesDescription="CHEST")
        route_all(spool, rules)
        assert process_once(spool).processed == 1
        assert dispatch_once(spool).returncode == 0
        files = sorted(received.rglob("*.dcm")) or sorted(
            p for p in received.rglob("*") if p.is_file()
        )
        datasets = [dcmread(path) for path in files]
    assert len(datasets) == 3
    assert {ds.SeriesDescription for ds in datasets} == {"PROC CHEST"}
    assert len({ds.SeriesInstanceUID for ds in datasets} - {SERIES}) == 1


WAITING_MODULE = (
    """\
import pathlib, time
go = pathlib.Path(__file__).with_name("go")
pathlib.Path(__file__).with_name("started").write_text("1")
while not go.exists():
    time.sleep(0.02)
"""
    + PLAIN_COPY
)


def status_json(spool: Spool) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["status", "--json", "--spool", str(spool.root)])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_status_shows_the_running_module_while_it_runs(tmp_path: Path, spool: Spool) -> None:
    rules = process_rules(tmp_path, WAITING_MODULE)
    receive_series(tmp_path, spool, SERIES, 2)
    route_all(spool, rules)
    (job,) = spool.items(PROCESSING)
    command = [sys.executable, "-m", "mercli", "process", "--once", "--spool", str(spool.root)]
    service = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: bool(status_json(spool)["running"]), timeout=30, what="running.json")
        (running,) = status_json(spool)["running"]  # type: ignore[misc]
        assert running["job"] == job.name and running["module"] == "copy"
        assert running["seconds"] >= 0 and running["started"].endswith("+00:00")
        (record_path,) = spool.claims.glob(f"*/processing~{job.name}/running.json")
        record = json.loads(record_path.read_text())
        assert sorted(record) == [
            "attempt", "boot_id", "module", "pgid", "pid", "start_ticks", "started"
        ]  # fmt: skip
        assert record["attempt"] == 1 and record["pid"] == record["pgid"] > 1
        wide = {"COLUMNS": "200"}  # the job's id in one piece
        table = CliRunner().invoke(cli, ["status", "--spool", str(spool.root)], env=wide)
        assert f"running copy on {job.name}" in table.output
        (tmp_path / "go").write_text("")
        assert service.wait(timeout=60) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert status_json(spool)["running"] == []
    assert len(spool.items(SUCCESS)) == 1


ORPHANING_MODULE = (
    """\
import os, pathlib, subprocess, time
marker = pathlib.Path(__file__).with_name("grandchild.pid")
if not marker.exists():
    child = subprocess.Popen(["sleep", "300"])
    marker.write_text(str(child.pid))
    time.sleep(600)
"""
    + PLAIN_COPY
)


def test_kill_9_mid_module_then_restart_kills_the_modules_grandchildren(
    tmp_path: Path, spool: Spool
) -> None:
    rules = process_rules(tmp_path, ORPHANING_MODULE)
    receive_series(tmp_path, spool, SERIES, 2)
    route_all(spool, rules)
    command = [sys.executable, "-m", "mercli", "process", "--spool", str(spool.root)]
    service = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    marker = tmp_path / "grandchild.pid"
    try:
        wait_until(lambda: marker.exists() and bool(marker.read_text()), timeout=30)
        wait_until(lambda: bool(list(spool.claims.glob("*/*/running.json"))), timeout=10)
    finally:
        os.kill(service.pid, signal.SIGKILL)
        service.wait()
    grandchild = int(marker.read_text())
    assert not gone(grandchild)  # PR_SET_PDEATHSIG killed the module, not what it started
    try:
        assert process_once(spool).processed == 1  # kills the orphan, recovers, runs again
        wait_until(lambda: gone(grandchild), timeout=10, what="the grandchild to be killed")
    finally:
        if not gone(grandchild):
            os.kill(grandchild, signal.SIGKILL)
    assert len(spool.items(SUCCESS)) == 1 and not list(spool.claims.glob("*/*/running.json"))


def test_a_reused_or_foreign_process_group_is_never_killed(tmp_path: Path, spool: Spool) -> None:
    from mercli.process.running import RUNNING_FILE, kill_orphans, running_record

    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record = running_record("copy", 1, other.pid)
        with Worker(spool, "process") as worker:
            dead_owner = worker.claims_dir.name
        for name, change in [
            ("a", {"start_ticks": record["start_ticks"] - 1}),
            ("b", {"boot_id": "x"}),
        ]:
            folder = spool.claims / dead_owner / f"processing~{name}"
            folder.mkdir(parents=True)
            (folder / RUNNING_FILE).write_text(json.dumps({**record, **change}))
        assert kill_orphans(spool) == 0 and other.poll() is None
        (spool.claims / dead_owner / "processing~a" / RUNNING_FILE).write_text(json.dumps(record))
        assert kill_orphans(spool) == 1
        assert other.wait(timeout=10) == -signal.SIGKILL
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
