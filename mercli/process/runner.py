"""One run of a processing job's module chain in a scratch folder (SPEC §7 module contract).

For each module of the chain, `run_chain` makes `<work>/<k>/in/` and an empty `<k>/out/`:
`in/` holds the instances as hard links named as mercure names them,
`<SeriesInstanceUID>#<SOPInstanceUID>.dcm` (the raw UIDs from the sidecars, through
`safe_name`), each with its `.tags` sidecar, and `task.json` in mercure's task layout. The
module runs with `MERCURE_IN_DIR`/`MERCURE_OUT_DIR` (and `MERCLI_…`) set, in a process group
of its own, killed with its parent (`PR_SET_PDEATHSIG`); after `timeout` the whole group gets
SIGTERM, then SIGKILL. Its stdout and stderr are kept, the last LOG_LIMIT bytes of them.

Exit 0 is success only if `out/` holds at least one `*.dcm` file and every `*.dcm` file is a
regular file that reads as DICOM with SOP, Series and Study Instance UIDs (mercure, too, takes
the `*.dcm` files of `out/` as the output), `result.json` (optional) is a JSON object, and
nothing in `out/` is a symlink. Everything else a module leaves there is not output, as under
mercure: the `task.json` and `.tags` files that mercure modules often copy over from `in/`
(the output's sidecars are made anew from its DICOM headers), reports, folders; they are
named in the module log and never read. The output of module k is the input of module k+1.
Anything else is a `ModuleFailure` naming the module and the file; the caller retries or
gives up.

The scratch folder is the worker's own (`Worker.tmp_path`): a crash leaves it to recovery,
and the next run starts from a fresh, empty `out/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercli.fsutil import fsync_file, open_new, remove_tree, start_writeback
from mercli.jobs import Module
from mercli.names import printable, safe_name
from mercli.service import die_with_parent
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX
from mercli.spool.items import json_bytes
from mercli.tags import UnreadableDicom, read_tags

log = logging.getLogger(__name__)

LOG_LIMIT = 1024 * 1024  # bytes of module output kept (the tail)
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of a timed-out module
RESULT_FILE = "result.json"
TASK_FILE = "task.json"

Running = Callable[[Module, int | None], None]  # (module, pid once started / None once ended)


class ModuleFailure(Exception):
    """A module run that did not produce usable output: why, with the exit status if any."""

    def __init__(self, module: str, reason: str, status: int | None = None) -> None:
        super().__init__(f'module "{module}": {reason}')
        self.module = module
        self.reason = reason
        self.status = status


@dataclass
class ChainResult:
    """What the chain made: the output instances (path, sidecar) of its last module, its
    result.json if any, and every module's exit status."""

    outputs: list[tuple[Path, dict[str, Any]]]
    result: dict[str, Any] | None
    statuses: list[int] = field(default_factory=list)


class Tail:
    """The last `limit` bytes written to it, and how many were dropped before them."""

    def __init__(self, limit: int = LOG_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            cut = len(self.data) - self.limit
            del self.data[:cut]
            self.dropped += cut

    def text(self, last: int | None = None) -> str:
        data = bytes(self.data if last is None else self.data[-last:])
        return data.decode("utf-8", "replace")

    def to_bytes(self) -> bytes:
        head = f"[{self.dropped} earlier bytes dropped]\n".encode() if self.dropped else b""
        return head + bytes(self.data)


@dataclass
class Cluster:
    """What a chain with Slurm modules needs (`mercli.process.slurm`): where to record the
    Slurm job (the job folder's slurm.json), the record found at claim time (to adopt), the
    attempt, the service's stop event, and a hook for each state Slurm reports."""

    record: Callable[[Mapping[str, Any] | None], None]
    resume: Mapping[str, Any] | None = None
    attempt: int = 1
    stop: threading.Event | None = None
    on_state: Callable[[Module, str, str], None] | None = None


def run_chain(
    modules: Sequence[Module],
    inputs: Sequence[tuple[Path, Mapping[str, Any]]],
    work: Path,
    task: Mapping[str, Any],
    settings: Mapping[str, Any],
    output: Tail,
    running: Running | None = None,
    cluster: Cluster | None = None,
) -> ChainResult:
    """Run every module on the output of the one before; ModuleFailure on the first failure.

    `running(module, pid)` is called once each module has started, `running(module, None)`
    once it has ended (whatever the way). With `cluster.resume` (a Slurm job recorded by an
    earlier `mercli process`), the steps before the recorded one are done already, and the
    recorded one is followed, not run again, unless Slurm has no trace of it.
    """
    current: Sequence[tuple[Path, Mapping[str, Any]]] = inputs
    result: dict[str, Any] | None = None
    statuses: list[int] = []
    resume = cluster.resume if cluster is not None else None
    first = int(resume.get("step", 0)) if resume is not None else 0
    for index, module in enumerate(modules):
        step = work / str(index + 1)
        in_dir, out_dir = step / "in", step / "out"
        if index < first:  # done before the restart: its output is the next step's in/
            statuses.append(0)
            continue
        if index == first and resume is not None:
            status = _resume_step(module, step, index, output, cluster, resume)
        else:
            in_dir.mkdir(parents=True)
            out_dir.mkdir()
            prepare_input(in_dir, current, spool_sidecars=index == 0)
            document = task_document(task, module, {**module.settings, **settings})
            write_unsynced(in_dir / TASK_FILE, json_bytes(document))  # scratch: no fsync
            if module.runner == "slurm":
                status = _slurm_step(module, step, index, output, cluster, None)
            else:
                status = run_module(module, in_dir, out_dir, output, running)
        statuses.append(status)
        if status != 0:
            raise ModuleFailure(module.name, _status_text(status), status)
        found, result = check_output(module.name, out_dir, output)
        current = found
    return ChainResult([(p, dict(t)) for p, t in current], result, statuses)


def _resume_step(
    module: Module,
    step: Path,
    index: int,
    output: Tail,
    cluster: Cluster | None,
    resume: Mapping[str, Any],
) -> int:
    """The recorded step: followed if Slurm still knows it (or it left its exit status),
    else submitted again from a clean out/ (in/ was complete before the record was made)."""
    if not (step / "in").is_dir():
        raise ModuleFailure(module.name, f"the recorded step folder {step} is gone")
    return _slurm_step(module, step, index, output, cluster, resume)


def _slurm_step(
    module: Module,
    step: Path,
    index: int,
    output: Tail,
    cluster: Cluster | None,
    resume: Mapping[str, Any] | None,
) -> int:
    """Run (or follow) one module as a Slurm job; its exit status."""
    from mercli.process.slurm import SlurmEnded, SlurmRun, SlurmUnavailable, TimedOut

    if cluster is None:
        raise ModuleFailure(module.name, 'runner = "slurm" needs the spool\'s cluster folder')
    hook = cluster.on_state

    def on_state(job_id: str, state: str) -> None:
        if hook is not None:
            hook(module, job_id, state)

    run = SlurmRun(
        module, step, cluster.record, cluster.attempt, stop=cluster.stop, on_state=on_state
    )
    output.add(f"--- module {module.name} (Slurm)\n".encode())
    try:
        if resume is None or not run.adopt(resume):
            if resume is not None:  # recorded, but Slurm never ran it: again, from scratch
                remove_tree(step / "out")
                (step / "out").mkdir()
            argv = module_argv(module, step / "in", step / "out")
            run.start(argv, index)
        on_state(run.job_id, "SUBMITTED")
        status = run.wait()
    except SlurmUnavailable as exc:
        raise ModuleFailure(module.name, f"Slurm: {exc}") from None
    except (SlurmEnded, TimedOut) as exc:
        output.add(run.log_text(LOG_LIMIT))
        output.add(f"--- {exc}\n".encode())
        raise ModuleFailure(module.name, str(exc)) from None
    output.add(run.log_text(LOG_LIMIT))
    return status


def prepare_input(
    in_dir: Path,
    instances: Sequence[tuple[Path, Mapping[str, Any]]],
    *,
    spool_sidecars: bool = False,
) -> None:
    """Hard-link each instance as `<series>#<sop>.dcm`, with its sidecar next to it.

    With `spool_sidecars` the instances are the spool's, each with its sidecar beside it:
    that sidecar is linked too when it is a regular file (creating 300 small files costs a
    tenth of a second or more on a busy disk; a link, a fiftieth of that). Otherwise (a
    previous module's output, or a missing sidecar) the sidecar is written from `tags`.
    """
    for path, tags in instances:
        series = safe_name(str(tags.get("SeriesInstanceUID", "")))
        sop = safe_name(str(tags.get("SOPInstanceUID", "")))
        name = f"{series}#{sop}"
        os.link(path, in_dir / f"{name}{INSTANCE_SUFFIX}", follow_symlinks=False)
        sidecar = in_dir / f"{name}{SIDECAR_SUFFIX}"
        if not (spool_sidecars and _link_regular(path.with_suffix(SIDECAR_SUFFIX), sidecar)):
            write_unsynced(sidecar, json_bytes(dict(tags)))


def _link_regular(source: Path, destination: Path) -> bool:
    """Hard-link `source` if it is a regular file; False if it is not, or is missing."""
    try:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            return False
        os.link(source, destination, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_unsynced(path: Path, data: bytes) -> None:
    """Create `path` exclusively and write it, without fsync: scratch that no crash needs."""
    fd = open_new(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def fsync_files(paths: Sequence[Path]) -> None:
    for path in paths:
        fsync_file(path)


def task_document(
    task: Mapping[str, Any], module: Module, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """task.json for one module: mercure's Task layout (id, info, process, dispatch, study)."""
    return {
        **task,
        "process": {
            "module_name": module.name,
            "module_config": {"docker_tag": module.image or "", "settings": dict(module.settings)},
            "settings": dict(settings),
            "retain_input_images": False,
        },
    }


def module_argv(module: Module, in_dir: Path, out_dir: Path) -> list[str]:
    """The command that runs a module: its `command`, or its container's command line."""
    if module.command:
        return list(module.command)
    from mercli.process.containers import container_argv

    return container_argv(
        module.container or "", module.image or "", in_dir, out_dir, dict(module.env)
    )


def run_module(
    module: Module, in_dir: Path, out_dir: Path, output: Tail, running: Running | None = None
) -> int:
    """Run one module to its end or its timeout; its exit status (negative: a signal)."""
    env = {**os.environ, **module.env}
    for prefix in ("MERCURE", "MERCLI"):
        env[f"{prefix}_IN_DIR"], env[f"{prefix}_OUT_DIR"] = str(in_dir), str(out_dir)
    output.add(f"--- module {module.name}\n".encode())
    process = subprocess.Popen(
        module_argv(module, in_dir, out_dir),
        cwd=in_dir.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    assert process.stdout is not None
    reader = threading.Thread(target=_pump, args=(process.stdout, output), daemon=True)
    reader.start()
    try:
        if running is not None:
            running(module, process.pid)
        status = process.wait(module.timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        output.add(f"--- killed after the {module.timeout:g} s timeout\n".encode())
        raise ModuleFailure(module.name, f"timed out after {module.timeout:g} s") from None
    except BaseException:
        _kill_group(process)
        raise
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # whatever it left running
        reader.join(KILL_GRACE)
        process.stdout.close()
        if running is not None:
            running(module, None)
    return status


def check_output(
    module: str, out_dir: Path, output: Tail | None = None
) -> tuple[list[tuple[Path, dict[str, Any]]], Any]:
    """The `*.dcm` files in `out/` with their sidecars, and result.json; ModuleFailure naming
    the first symlink, or `*.dcm` file that is not a regular DICOM file with the three UIDs.
    Other entries are not output: named in `output` (the module log), never read.

    Each instance's writeback starts as it is read (`start_writeback`): the output is
    fsync'ed before it is published, and by then most of it is on its way to the disk.
    """
    found: list[tuple[Path, dict[str, Any]]] = []
    result: dict[str, Any] | None = None
    seen: dict[str, str] = {}
    ignored: list[str] = []
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if entry.is_symlink():
            raise ModuleFailure(module, f"output {entry.name!r} is a symlink")
        path = Path(entry.path)
        if entry.name == RESULT_FILE and entry.is_file(follow_symlinks=False):
            result = _result(module, path)
            continue
        if not entry.name.lower().endswith(INSTANCE_SUFFIX):
            ignored.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            continue
        if not entry.is_file(follow_symlinks=False):
            raise ModuleFailure(module, f"output {entry.name!r} is not a regular file")
        try:
            with open(path, "rb", opener=_no_follow) as stream:
                tags = read_tags(stream)
                start_writeback(stream.fileno())
        except (UnreadableDicom, OSError) as exc:
            raise ModuleFailure(module, f"output {entry.name!r} is not DICOM ({exc})") from None
        missing = [
            key
            for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
            if not tags.get(key)
        ]
        if missing:
            message = f"output {entry.name!r} lacks {', '.join(missing)}"
            raise ModuleFailure(module, message)
        first = seen.setdefault(str(tags["SOPInstanceUID"]), entry.name)
        if first != entry.name:
            message = f"outputs {first!r} and {entry.name!r} have the same SOPInstanceUID"
            raise ModuleFailure(module, message)
        found.append((path, tags))
    if ignored and output is not None:
        shown = ", ".join(printable(name) for name in ignored[:10])
        more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
        output.add(f"--- not output (not *.dcm): {shown}{more}\n".encode())
    if not found:
        raise ModuleFailure(module, "wrote no DICOM output (*.dcm)")
    return found, result


def _result(module: str, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModuleFailure(module, f"{RESULT_FILE} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModuleFailure(module, f"{RESULT_FILE} is not a JSON object")
    return value


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _pump(stream: Any, output: Tail) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        output.add(chunk)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it dies."""
    die_with_parent(signal.SIGKILL)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the module's process group, SIGKILL after KILL_GRACE."""
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _status_text(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 3)
