"""`runner = "slurm"` against a real one-node Slurm started by the tests (SPEC §7.1, issue 21):
a series processed through Slurm to DCMTK's storescp; a module that fails; one that outlives
its timeout (scancel'ed); `kill -9` of `mercli process` while its Slurm job runs, then a new
`mercli process` that adopts the job: one result, one submission."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from mercli.process.service import ProcessService
from mercli.spool import ERROR, OUTGOING, PROCESSING, SUCCESS, Spool
from tests.netkit import wait_until
from tests.slurmkit import SlurmCluster
from tests.slurmkit import slurm_cluster as slurm_cluster  # a fixture
from tests.test_dispatch import dispatch_once
from tests.test_process import (
    COPY_MODULE,
    SERIES,
    error_record,
    process_rules,
    receive_series,
    status_json,
)
from tests.test_route import route_all

FAST_POLLING = '[runners.slurm]\npoll_max = "1s"\n\n'


@pytest.fixture
def on_cluster(
    slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SlurmCluster]:
    """The cluster, with its client environment (SLURM_CONF) in this process's."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    yield slurm_cluster


def slurm_rules(tmp_path: Path, module: str = COPY_MODULE, **options: object) -> Path:
    """tests.test_process's rules with the `copy` module run by Slurm."""
    rules = process_rules(tmp_path, module, **options)  # type: ignore[arg-type]
    text = rules.read_text().replace("[modules.copy]\n", '[modules.copy]\nrunner = "slurm"\n')
    rules.write_text(FAST_POLLING + text)
    return rules


def slurm_record(item: Path) -> dict[str, object]:
    return dict(json.loads((item / "slurm.json").read_text()))


def test_a_series_is_processed_through_slurm_to_storescp(
    tmp_path: Path, spool: Spool, on_cluster: SlurmCluster
) -> None:
    from tests.reliability.kit import storescp

    received = tmp_path / "storescp"
    with storescp(received) as port:
        rules = slurm_rules(tmp_path)
        pacs = f'[targets.pacs]\ntype = "dicom"\nhost = "127.0.0.1"\nport = {port}\n'
        rules.write_text(
            pacs + 'called_aet = "PACS"\n' + rules.read_text().replace('["out"]', '["pacs"]')
        )
        receive_series(tmp_path, spool, SERIES, 3, SeriesDescription="CHEST")
        route_all(spool, rules)
        summary = ProcessService(spool.root, 1).run(once=True)
        assert summary.processed == 1, on_cluster.logs()
        assert dispatch_once(spool).returncode == 0
        files = [p for p in received.rglob("*") if p.is_file()]
        datasets = [dcmread(path) for path in files]
    assert len(datasets) == 3
    assert {ds.SeriesDescription for ds in datasets} == {"PROC CHEST"}
    (done,) = [item for item in spool.items(SUCCESS) if (item.path / "slurm.json").exists()]
    record = slurm_record(done.path)
    assert on_cluster.state(str(record["job_id"])) == "COMPLETED"
    log = (done.path / "module.log").read_text()
    assert "(Slurm)" in log and "copied 7 files" in log  # 3 instances, 3 sidecars, task.json
    result = json.loads((done.path / "result.json").read_text())
    assert result["env"] == "set" and result["task"]["process"]["module_name"] == "copy"
    assert not (spool.root / "cluster" / done.name).exists()  # the step folders are gone


def test_a_failing_module_fails_the_job_with_its_log(
    tmp_path: Path, spool: Spool, on_cluster: SlurmCluster
) -> None:
    rules = slurm_rules(tmp_path, 'print("no model here"); raise SystemExit(3)\n', attempts=1)
    receive_series(tmp_path, spool, SERIES, 2)
    route_all(spool, rules)
    assert ProcessService(spool.root, 1).run(once=True).failed == 1
    record = error_record(spool)
    assert record["status"] == 3 and "exit status 3" in str(record["reason"])
    assert "no model here" in str(record["log_tail"])
    (failed,) = spool.items(ERROR)
    assert on_cluster.state(str(slurm_record(failed.path)["job_id"])) == "FAILED"


def test_a_module_that_outlives_its_timeout_is_cancelled(
    tmp_path: Path, spool: Spool, on_cluster: SlurmCluster
) -> None:
    module = 'import time\nprint("thinking", flush=True)\ntime.sleep(300)\n'
    rules = slurm_rules(tmp_path, module, attempts=1, timeout=2)
    receive_series(tmp_path, spool, SERIES, 1)
    route_all(spool, rules)
    assert ProcessService(spool.root, 1).run(once=True).failed == 1
    record = error_record(spool)
    assert "cancelled (timeout)" in str(record["reason"]), record
    (failed,) = spool.items(ERROR)
    job_id = str(slurm_record(failed.path)["job_id"])
    on_cluster.wait_state(job_id, ["CANCELLED"], timeout=30)


ADOPTED_MODULE = (
    """\
import pathlib, time
here = pathlib.Path(__file__).parent
with open(here / "runs.txt", "a") as runs:
    runs.write("run\\n")
while not (here / "go").exists():
    time.sleep(0.05)
"""
    + COPY_MODULE
)


def test_kill_9_while_slurm_runs_then_a_new_process_adopts_the_job(
    tmp_path: Path, spool: Spool, on_cluster: SlurmCluster
) -> None:
    rules = slurm_rules(tmp_path, ADOPTED_MODULE)
    receive_series(tmp_path, spool, SERIES, 2)
    route_all(spool, rules)
    (job,) = spool.items(PROCESSING)
    command = [sys.executable, "-m", "mercli", "process", "--spool", str(spool.root)]
    first = subprocess.Popen(command, env=on_cluster.env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "runs.txt").exists(), timeout=60, what="the Slurm job")
        (record_path,) = spool.claims.glob(f"*/processing~{job.name}/item/slurm.json")
        wait_until(lambda: "job_id" in json.loads(record_path.read_text()), timeout=10)
        job_id = str(json.loads(record_path.read_text())["job_id"])

        def slurm_state() -> str:
            entries = status_json(spool)["running"]
            return str(entries[0].get("slurm_state", "")) if entries else ""  # type: ignore[index]

        # the state mercli saw last: RUNNING once its next squeue has seen the job start
        wait_until(lambda: slurm_state() == "RUNNING", timeout=30, what="status: RUNNING")
        (running,) = status_json(spool)["running"]  # type: ignore[misc]
        assert running["slurm_job"] == job_id
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert on_cluster.state(job_id) == "RUNNING"  # mercli died; the Slurm job did not
    second = subprocess.Popen(
        [*command, "--once"], env=on_cluster.env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(
            lambda: any(r.get("slurm_job") == job_id for r in status_json(spool)["running"]),  # type: ignore[attr-defined]
            timeout=30,
            what="the new process to follow the Slurm job",
        )
        (tmp_path / "go").write_text("")
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 0, stderr
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert (tmp_path / "runs.txt").read_text() == "run\n"  # one submission, one run
    (done,) = spool.items(SUCCESS)
    assert slurm_record(done.path)["job_id"] == job_id
    assert on_cluster.state(job_id) == "COMPLETED"
    targets = [
        json.loads((item.path / "job.json").read_text())["target"]["name"]
        for item in spool.items(OUTGOING)
    ]
    assert sorted(targets) == ["orig", "out"]  # the originals, and exactly one result
    assert not list(spool.items(PROCESSING))


def test_a_job_slurm_ends_without_an_exit_status_is_a_failure_naming_its_state(
    tmp_path: Path, spool: Spool, on_cluster: SlurmCluster
) -> None:
    module = 'import time\nprint("waiting", flush=True)\ntime.sleep(300)\n'
    rules = slurm_rules(tmp_path, module, attempts=1)
    receive_series(tmp_path, spool, SERIES, 1)
    route_all(spool, rules)
    (job,) = spool.items(PROCESSING)
    summary: list[object] = []
    worker = threading.Thread(
        target=lambda: summary.append(ProcessService(spool.root, 1).run(once=True))
    )
    worker.start()
    try:
        pattern = f"*/processing~{job.name}/item/slurm.json"
        wait_until(lambda: any("job_id" in p.read_text() for p in spool.claims.glob(pattern)))
        (path,) = spool.claims.glob(pattern)
        job_id = str(json.loads(path.read_text())["job_id"])
        on_cluster.wait_state(job_id, ["RUNNING"])
        on_cluster.run("scancel", job_id, check=True)  # an admin, or a node going away
    finally:
        worker.join(120)
    assert not worker.is_alive()
    record = error_record(spool)
    assert f"Slurm job {job_id} ended CANCELLED" in str(record["reason"]), record
