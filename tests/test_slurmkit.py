"""A real one-node Slurm cluster (Debian 12's slurm-wlm 22.05.8, tests/slurmkit.py): jobs run,
and what each way of asking about a job answers in this setup, where no slurmdbd runs.

What the tests below pin down (job ID stands for the id sbatch printed):

- `squeue -h -j ID -o %T` prints PENDING / RUNNING while the job is queued or running, and
  nothing at all (exit 0) once it ended: without --states=all squeue hides finished jobs.
- `squeue --states=all -h -j ID -o %T` also prints COMPLETED, FAILED, CANCELLED, TIMEOUT, for
  MinJobAge seconds (300 here) after the job ended; then, like any unknown id, exit 1 and
  "slurm_load_jobs error: Invalid job id specified" on stderr.
- `scontrol show job -o ID` has JobState=... Reason=... ExitCode=STATUS:SIGNAL for as long:
  COMPLETED 0:0, FAILED 3:0 (Reason=NonZeroExitCode), CANCELLED 0:15, TIMEOUT (Reason=TimeLimit).
- `sacct -n -X -P -j ID -o JobID,State,ExitCode` exits 1 with "Slurm accounting storage is
  disabled" on stderr: AccountingStorageType=accounting_storage/none, there is no slurmdbd.
- `sacct -c ...` (--completion) reads the jobcomp/filetxt log (JobCompLoc) instead: one line
  per finished job that outlives MinJobAge and slurmctld restarts, e.g. "ID|FAILED|3:0" for
  `-n -P -o JobID,State,ExitCode`; CANCELLED shows ExitCode 0:0 there (scontrol says 0:15).
  A job that has not ended yet, or an unknown id, prints nothing (exit 0).
- `scancel ID` of a running job: CANCELLED within a fraction of a second.
- `sbatch --wait` returns the job's exit code, but sbatch sleeps 2 s before its first look
  (then 8, 32, 32... s): never under 2 s, so tests and mercli poll squeue/scontrol instead.

Timing (measured on a 2-core VM; printed by the tests, run pytest with -s to see them):

- No-op job, sbatch to COMPLETED seen by polling scontrol: 0.3-1.1 s, sometimes up to 2 s for
  the first job. slurmctld never starts a batch job in the submit RPC; its background loop
  wakes once a second (hard-coded in 22.05) and, with SchedulerParameters=batch_sched_delay=0,
  schedules then (the default batch_sched_delay=3 would make it up to 3 s). The job then
  launches and reports back in ~50 ms. A job ending does run the scheduler at once, so a queue
  of jobs flows without the 1 s wait.
- TIMEOUT: slurmctld checks time limits every PERIODIC_TIMEOUT = 30 s, a compile-time constant
  (no slurm.conf knob in 22.05), with OverTimeLimit=0 on top: a job with --time=1 reaches
  TIMEOUT 60-91 s after it started.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.slurmkit import SlurmCluster, cluster_pids, slurm_cluster, start_cluster

__all__ = ["slurm_cluster"]  # the fixture, shared by every test here

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def squeue_state(cluster: SlurmCluster, job_id: str, *, all_states: bool) -> str:
    extra = ["--states=all"] if all_states else []
    result = cluster.run("squeue", *extra, "-h", "-j", job_id, "-o", "%T", check=True)
    return result.stdout.strip()


def sacct_completion(cluster: SlurmCluster, job_id: str) -> str:
    result = cluster.run(
        "sacct", "-c", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode", check=True
    )
    return result.stdout.strip()


def wait_for_completion_record(cluster: SlurmCluster, job_id: str) -> str:
    """jobcomp/filetxt writes its line when slurmctld logs the job's end."""
    deadline = time.monotonic() + 10
    while not (line := sacct_completion(cluster, job_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return line


def test_cluster_is_up(slurm_cluster: SlurmCluster) -> None:
    sinfo = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %P %t", check=True).stdout.split()
    assert sinfo == [slurm_cluster.node, f"{slurm_cluster.partition}*", "idle"]
    config = slurm_cluster.run("scontrol", "show", "config", check=True).stdout
    settings = {k.strip(): v for k, _, v in (line.partition(" = ") for line in config.splitlines())}
    assert (
        settings.items()
        >= {
            "SLURM_CONF": str(slurm_cluster.conf),
            "SLURM_VERSION": "22.05.8",
            "ClusterName": slurm_cluster.cluster_name,
            "JobCompType": "jobcomp/filetxt",
            "MinJobAge": "300 sec",
        }.items()
    )
    assert "slurmd version" in slurm_cluster.logs()


def test_batch_job_runs_and_completes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/sh\necho ran in $SLURM_JOB_ID > {tmp_path}/result.txt\n")
    job_id = slurm_cluster.sbatch(f"--output={tmp_path}/out.txt", str(script))
    assert slurm_cluster.wait_state(job_id, FINISHED) == "COMPLETED"
    assert (tmp_path / "result.txt").read_text() == f"ran in {job_id}\n"
    assert slurm_cluster.job(job_id)["ExitCode"] == "0:0"
    assert squeue_state(slurm_cluster, job_id, all_states=False) == ""
    assert squeue_state(slurm_cluster, job_id, all_states=True) == "COMPLETED"
    assert wait_for_completion_record(slurm_cluster, job_id) == f"{job_id}|COMPLETED|0:0"


def test_sbatch_wait_returns_the_exit_code_but_takes_at_least_two_seconds(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    start = time.monotonic()
    result = slurm_cluster.run(
        "sbatch", "--wait", f"--output={tmp_path}/out.txt", "--wrap=exit 3", timeout=60
    )
    took = time.monotonic() - start
    print(f"sbatch --wait of a job exiting 3: exit {result.returncode} after {took:.2f}s")
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("Submitted batch job ")
    assert took >= 2.0


def test_running_job_queries_and_scancel(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch(f"--output={tmp_path}/out.txt", "--wrap=sleep 300")
    slurm_cluster.wait_state(job_id, ["RUNNING"])
    assert squeue_state(slurm_cluster, job_id, all_states=False) == "RUNNING"
    assert squeue_state(slurm_cluster, job_id, all_states=True) == "RUNNING"
    job = slurm_cluster.job(job_id)
    assert (job["JobState"], job["Reason"], job["ExitCode"]) == ("RUNNING", "None", "0:0")

    sacct = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode")
    assert (sacct.returncode, sacct.stdout, sacct.stderr) == (
        1,
        "",
        "Slurm accounting storage is disabled\n",
    )
    assert sacct_completion(slurm_cluster, job_id) == ""  # not ended: no completion record

    start = time.monotonic()
    slurm_cluster.run("scancel", job_id, check=True)
    assert slurm_cluster.wait_state(job_id, FINISHED) == "CANCELLED"
    print(f"scancel to CANCELLED: {time.monotonic() - start:.2f}s")
    assert squeue_state(slurm_cluster, job_id, all_states=False) == ""
    assert squeue_state(slurm_cluster, job_id, all_states=True) == "CANCELLED"
    assert slurm_cluster.job(job_id)["ExitCode"] == "0:15"
    assert wait_for_completion_record(slurm_cluster, job_id) == f"{job_id}|CANCELLED|0:0"


def test_held_job_is_pending(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch("--hold", f"--output={tmp_path}/out.txt", "--wrap=true")
    assert squeue_state(slurm_cluster, job_id, all_states=False) == "PENDING"
    job = slurm_cluster.job(job_id)
    assert (job["JobState"], job["Reason"]) == ("PENDING", "JobHeldUser")
    slurm_cluster.run("scancel", job_id, check=True)
    assert slurm_cluster.wait_state(job_id, FINISHED) == "CANCELLED"
    assert not (tmp_path / "out.txt").exists()


def test_exit_3_is_failed_with_exit_code_3(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch(f"--output={tmp_path}/out.txt", "--wrap=echo hi; exit 3")
    assert slurm_cluster.wait_state(job_id, FINISHED) == "FAILED"
    job = slurm_cluster.job(job_id)
    assert (job["Reason"], job["ExitCode"]) == ("NonZeroExitCode", "3:0")
    assert squeue_state(slurm_cluster, job_id, all_states=True) == "FAILED"
    assert wait_for_completion_record(slurm_cluster, job_id) == f"{job_id}|FAILED|3:0"
    assert (tmp_path / "out.txt").read_text() == "hi\n"


def test_unknown_job_id(slurm_cluster: SlurmCluster) -> None:
    for command in (
        ["squeue", "-h", "-j", "999999", "-o", "%T"],
        ["squeue", "--states=all", "-h", "-j", "999999", "-o", "%T"],
        ["scontrol", "show", "job", "999999"],
    ):
        result = slurm_cluster.run(*command)
        assert (result.returncode, result.stdout, result.stderr) == (
            1,
            "",
            "slurm_load_jobs error: Invalid job id specified\n",
        ), command
    assert slurm_cluster.state("999999") == ""
    assert sacct_completion(slurm_cluster, "999999") == ""


def test_second_cluster_runs_beside_and_stops_clean(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A second cluster on the same host (another session, CI) does not collide with the first,
    and leaves no process behind, even with a job still running at teardown."""
    with start_cluster(tmp_path / "second") as second:
        assert second.ports != slurm_cluster.ports
        assert second.cluster_name != slurm_cluster.cluster_name
        job_id = second.sbatch(
            "--job-name=second-cluster-job", f"--output={tmp_path}/out.txt", "--wrap=sleep 300"
        )
        second.wait_state(job_id, ["RUNNING"])
        names = slurm_cluster.run("squeue", "--states=all", "-h", "-o", "%j", check=True).stdout
        assert "second-cluster-job" not in names.split()
        pids = second.pids()
        daemons = {name: p.pid for name, p in second.processes.items()}
        assert set(daemons.values()) <= set(pids)
        assert len(pids) > len(daemons)  # slurmstepd and the job's sleep carry the marker too
    assert cluster_pids(second.root) == []
    # ps agrees (zombies aside: init reaps the orphaned slurmstepd and job processes)
    ps = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True)
    alive = {int(pid) for pid, stat in map(str.split, ps.stdout.splitlines()) if "Z" not in stat}
    assert not alive & set(pids), ps.stdout
    # the session's cluster is untouched
    assert slurm_cluster.run("sinfo", "-h", "-N", "-o", "%t", check=True).stdout.strip() in (
        "idle",
        "mix",
        "alloc",
    )


def test_a_cluster_that_cannot_start_fails_with_the_daemon_logs(tmp_path: Path) -> None:
    with (
        pytest.raises(AssertionError) as failure,
        start_cluster(tmp_path / "broken", extra_conf="SelectType=select/nonexistent\n"),
    ):
        pass
    message = str(failure.value)
    assert "slurmctld exited with 1" in message or "slurmd exited with 1" in message  # first wins
    assert "----- slurmctld.out -----" in message
    assert "select/nonexistent" in message
    assert cluster_pids(tmp_path / "broken") == []
