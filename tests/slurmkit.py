"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd of Debian's slurm-wlm,
started in a private folder on free ports, never touching /etc/slurm, /etc/munge or /run/munge.

    with start_cluster(tmp) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Everything the cluster uses lives under `tmp`: the munge key, socket, pid, seed and log files;
slurm.conf; slurmctld's state and slurmd's spool; the daemons' logs. The ports are free ports
picked at start, the cluster name is unique, and the node is this host (`hostname -s`, the only
name slurmd answers to) reached at 127.0.0.1, so a system-wide Slurm or munged, or a second test
session on the same host, is left alone. Client commands must run with `cluster.env`: it points
SLURM_CONF at this cluster and drops any SLURM_* variables inherited from the caller (tests that
themselves run inside a Slurm job would otherwise talk to the outer cluster).

Every process of the cluster (the daemons, slurmstepd, job scripts) carries MERCLI_SLURM_CLUSTER=
<folder> in its environment; teardown cancels all jobs, stops the daemons (SIGTERM, then SIGKILL)
and kills whatever still carries the marker, so nothing is left running.

If Slurm cannot start, `start_cluster` raises AssertionError with the daemons' logs: a failure,
never a skip. No slurmdbd runs (AccountingStorageType=accounting_storage/none), so `sacct` has
nothing to ask; job states come from squeue/scontrol while slurmctld remembers the job
(MinJobAge seconds after it ends). See tests/test_slurmkit.py for what each query prints.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.netkit import free_port

MARKER = "MERCLI_SLURM_CLUSTER"
START_TIMEOUT = 60.0  # seconds until sinfo must show the node idle
STOP_TIMEOUT = 15.0  # seconds a daemon gets after SIGTERM before SIGKILL
MIN_JOB_AGE = 300  # seconds slurmctld keeps a finished job (squeue/scontrol can see it)
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL

# Latency (Slurm 22.05): slurmctld never starts a batch job in the submit RPC; its background
# loop, which wakes once a second (hard-coded), runs the scheduler for new jobs when
# batch_sched_delay seconds (default 3) have passed since it last did: 0 makes that every
# second. sched_min_interval=0 lets the scheduler run again at once when a job ends (that runs
# it directly), so queued jobs follow each other without the wait. No `defer`.
SCHEDULER_PARAMETERS = "batch_sched_delay=0,sched_min_interval=0,default_queue_depth=100"


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def node_line() -> str:
    """This host's NodeName line as `slurmd -C` sees it (CPUs, sockets, cores, threads), with
    RealMemory a tenth below what it reports: a node with less memory than configured drains."""
    out = subprocess.run(
        ["/usr/sbin/slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    fields = dict(re.findall(r"\b(\w+)=(\S+)", out.splitlines()[0]))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    parts = [f"{k}={fields[k]}" for k in keep if k in fields]
    memory = int(fields.get("RealMemory", "1000"))
    parts.append(f"RealMemory={max(1, memory * 9 // 10)}")
    return " ".join(parts)


def client_env(conf: Path, root: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))
    }
    env["SLURM_CONF"] = str(conf)
    env[MARKER] = str(root)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    return env


@dataclass
class SlurmCluster:
    """A running cluster: `env` for every client command, `conf` its slurm.conf, `logs()` the
    daemons' logs (for failure messages), `partition` its only (default) partition."""

    root: Path
    conf: Path
    env: dict[str, str]
    partition: str
    node: str
    cluster_name: str
    munge_socket: Path
    log_dir: Path
    ports: tuple[int, int]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(
        self, *args: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """A client command (sinfo, sbatch, squeue, scontrol, scancel, sacct) against this
        cluster; on `check`, a non-zero exit fails with its output and the daemons' logs."""
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root / "work",  # a job's default WorkDir and slurm-%j.out land here
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
                f"\n{self.logs()}"
            )
        return result

    def sbatch(self, *args: str) -> str:
        """Submits a batch job (`--parsable`), returns its id."""
        out = self.run("sbatch", "--parsable", *args, check=True).stdout.strip()
        return out.split(";")[0]

    def state(self, job_id: str) -> str:
        """The job's state as slurmctld knows it (`scontrol show job`): PENDING, RUNNING,
        COMPLETED, FAILED, CANCELLED, TIMEOUT, ...; "" once slurmctld forgot it."""
        return self.job(job_id).get("JobState", "")

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict ({} when the job is unknown)."""
        result = self.run("scontrol", "show", "job", "-o", job_id)
        if result.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)

    def wait_state(
        self, job_id: str, states: Sequence[str], timeout: float = 60, interval: float = 0.05
    ) -> str:
        """Polls until the job is in one of `states`; returns that state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(interval)
        raise AssertionError(
            f"job {job_id} is {state or 'unknown'} after {timeout}s, not {'/'.join(states)}"
            f"\n{self.job(job_id)}\n{self.logs()}"
        )

    def logs(self) -> str:
        parts = []
        for path in sorted(self.log_dir.iterdir()) if self.log_dir.is_dir() else []:
            text = path.read_text(errors="replace")
            parts.append(f"----- {path.name} -----\n{text[-20000:]}")
        return "\n".join(parts)

    def pids(self) -> list[int]:
        """Every live process of this cluster (daemons, slurmstepd, job tasks)."""
        return cluster_pids(self.root)


def cluster_pids(root: Path) -> list[int]:
    needle = f"{MARKER}={root}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0"
            status = (entry / "status").read_text()
        except OSError:
            continue
        if needle in environ and "\nState:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


def write_conf(cluster: SlurmCluster, resources: str, extra: str = "") -> None:
    r = cluster.root
    host = cluster.node
    ctld_port, slurmd_port = cluster.ports
    user = pwd.getpwuid(os.getuid()).pw_name
    conf = f"""\
# One-node test cluster written by tests/slurmkit.py; everything lives under {r}.
ClusterName={cluster.cluster_name}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={cluster.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={cluster.log_dir}/slurmctld.log
SlurmdLogFile={cluster.log_dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters={SCHEDULER_PARAMETERS}
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
MinJobAge={MIN_JOB_AGE}
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 {resources} State=UNKNOWN
PartitionName={cluster.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
{extra}"""
    cluster.conf.write_text(conf)


def _wait(condition: Callable[[], bool], timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {process.returncode} while waiting for {what}"
                    f"\n{cluster.logs()}"
                )
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{cluster.logs()}")
        time.sleep(0.1)


def _start(cluster: SlurmCluster, name: str, command: list[str]) -> None:
    out = open(cluster.log_dir / f"{name}.out", "wb")  # noqa: SIM115 - the daemon's stdout/stderr
    with out:
        cluster.processes[name] = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cluster.env,
            start_new_session=True,
        )


def _munge_works(cluster: SlurmCluster) -> bool:
    if not cluster.munge_socket.exists():
        return False
    cred = subprocess.run(
        ["munge", "-n", "-S", str(cluster.munge_socket)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if cred.returncode != 0:
        return False
    check = subprocess.run(
        ["unmunge", "-S", str(cluster.munge_socket)],
        input=cred.stdout,
        capture_output=True,
        timeout=10,
        check=False,
    )
    return check.returncode == 0


def _node_state(cluster: SlurmCluster) -> str:
    result = cluster.run("sinfo", "-h", "-N", "-o", "%t", timeout=10)
    return result.stdout.strip() if result.returncode == 0 else ""


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancels every job, stops slurmd, slurmctld and munged (SIGTERM, then SIGKILL), then
    kills whatever process of the cluster is left (slurmstepd, job tasks)."""
    if cluster.processes.get("slurmctld") and cluster.processes["slurmctld"].poll() is None:
        jobs = cluster.run("squeue", "-h", "-o", "%i", timeout=10).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, timeout=10)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                states = cluster.run("squeue", "-h", "-o", "%T", timeout=10).stdout.split()
                if not set(states) - {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"}:
                    break
                time.sleep(0.1)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (pids := cluster.pids()) and time.monotonic() < deadline:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextmanager
def start_cluster(tmp: Path, extra_conf: str = "") -> Iterator[SlurmCluster]:
    """Starts munged, slurmctld and slurmd under `tmp` (a private folder, created if missing)
    and yields the cluster once sinfo shows its node idle; stops everything on exit.
    `extra_conf`: lines appended to slurm.conf (a later line overrides an earlier one)."""
    for program in ("munged", "slurmctld", "slurmd", "sinfo", "sbatch"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            raise AssertionError(f"{program} is missing: run `make setup` (slurm-wlm, munge)")
    root = tmp.resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses key and socket folders others can write to
    for sub in ("munge", "state", "spool", "run", "log", "work"):
        (root / sub).mkdir(mode=0o700, exist_ok=True)
    munge_socket = root / "munge" / "munge.socket"
    if len(str(munge_socket)) > SOCKET_PATH_MAX:
        raise AssertionError(f"{munge_socket} is too long for a unix socket; use a shorter tmp")
    conf = root / "slurm.conf"
    ctld_port = free_port()
    slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    cluster = SlurmCluster(
        root=root,
        conf=conf,
        env=client_env(conf, root),
        partition="debug",
        node=short_hostname(),
        cluster_name=f"t{uuid.uuid4().hex[:8]}",
        munge_socket=munge_socket,
        log_dir=root / "log",
        ports=(ctld_port, slurmd_port),
    )
    write_conf(cluster, node_line(), extra_conf)
    key = root / "munge" / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    sbin = "/usr/sbin"
    with ExitStack() as stack:
        stack.callback(stop_cluster, cluster)
        _start(
            cluster,
            "munged",
            [
                f"{sbin}/munged",
                "--foreground",
                "--force",
                f"--socket={munge_socket}",
                f"--key-file={key}",
                f"--log-file={cluster.log_dir / 'munged.log'}",
                f"--pid-file={root / 'run' / 'munged.pid'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}",
            ],
        )
        _wait(lambda: _munge_works(cluster), START_TIMEOUT, "munged to answer", cluster)
        _start(cluster, "slurmctld", [f"{sbin}/slurmctld", "-D", "-i", "-f", str(conf)])
        _start(cluster, "slurmd", [f"{sbin}/slurmd", "-D", "-f", str(conf)])
        _wait(
            lambda: _node_state(cluster) == "idle",
            START_TIMEOUT,
            "sinfo to show the node idle",
            cluster,
        )
        yield cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One cluster for the whole session; a cluster that does not start fails the test."""
    try:
        with start_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except AssertionError as error:
        pytest.fail(str(error), pytrace=False)
