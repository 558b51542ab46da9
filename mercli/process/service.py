"""`mercli process`: claim processing jobs, run their module chain, publish or retry (SPEC §7).

A processing job (job.json: `mercli.jobs.processing_record`) is claimed like a dispatch job.
Its chain runs in the worker's scratch (`mercli.process.runner`); the job folder itself only
gets `process.json` (attempts, next attempt, last error) and, once settled, `module.log`.

- Success: ONE transaction publishes the output and moves the job to `success/` (with
  `module.log` and `result.json`): a dispatch job per rule target and output series in
  `outgoing/`, or, with `results = "route"`, each output series as a new batch in
  `incoming/` (then a completion hint, so routing waits `settle`, not the series timeout).
  Output sidecars are read from the files, with SenderAET `mercli-process:<last module>`,
  ReceiverAET `MERCLI`, ReceivedAt now and ProcessingHops (the loop guard, SPEC §7).
  Event `processed`: rule, modules, exit statuses, counts and result.json.
- Failure: retried after the failed module's `retry_delay * retry_backoff^(n-1)` (at most
  `retry_max_delay`), until `max_attempts` or `max_age`; then `error/` with the reason, the
  exit status and the tail of the log. Event `retry` or `failed`.
- `kill -9` mid-module: the module dies with its parent thread (PR_SET_PDEATHSIG); what it
  started is killed by the next `mercli process` through the claim's `running.json` (its
  process group, see `mercli.process.running`) before recovery releases the claim and reaps
  the scratch; the next run starts from an empty `out/`. Nothing
  was published: the transaction is the only way output reaches a target.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.fsutil import link_tree, write_new
from mercli.jobs import (
    HOPS_KEY,
    PRIORITIES,
    PROCESS_SENDER,
    Module,
    ProcessProgress,
    Target,
    job_priority,
    job_record,
    study_series,
)
from mercli.names import new_id, safe_name
from mercli.notify.enqueue import (
    add_notifications,
    event_variables,
    quarantine,
    subscriptions_from,
)
from mercli.process.runner import (
    RESULT_FILE,
    ChainResult,
    Cluster,
    ModuleFailure,
    Running,
    Tail,
    fsync_files,
    run_chain,
)
from mercli.process.running import RUNNING_FILE, kill_orphans, running_record
from mercli.process.slurm import CLUSTER_DIR, SLURM_FILE, Stopping, check_shared, load_record
from mercli.service import FULL_SCAN, RECOVER_EVERY, SIGNAL_POLL, stop_on_signals, wake_on_changes
from mercli.spool import (
    INCOMING,
    INSTANCE_SUFFIX,
    JOB_FILE,
    OUTGOING,
    PROCESSING,
    SIDECAR_SUFFIX,
    SUCCESS,
    Claim,
    Spool,
    Worker,
    read_regular,
    recover,
    write_json,
)
from mercli.spool.items import json_bytes
from mercli.tags import UnreadableDicom, read_tags

log = logging.getLogger(__name__)

LOG_FILE = "module.log"
TAIL_IN_ERROR = 4096  # bytes of the module's log kept in error.json
RECEIVER_AET = "MERCLI"


@dataclass
class ProcessSummary:
    processed: int = 0
    retried: int = 0
    failed: int = 0
    outputs: list[str] = field(default_factory=list)  # items published (outgoing/ incoming/)


@dataclass(frozen=True)
class ProcessingJob:
    """A processing job's job.json, as `process` needs it."""

    record: dict[str, Any]
    modules: tuple[Module, ...]
    targets: tuple[Target, ...]
    results: str | None
    created: float

    @classmethod
    def load(cls, folder: Path) -> ProcessingJob:
        """Raises OSError, ValueError, KeyError or TypeError for a bad job.json."""
        record = json.loads((folder / JOB_FILE).read_bytes())
        modules = tuple(Module.from_json(m) for m in record["process"])
        if not modules:
            raise ValueError("no modules in the chain")
        targets = tuple(Target.from_json(t) for t in record.get("targets") or ())
        created = datetime.fromisoformat(record["created"]).timestamp()
        return cls(record, modules, targets, record.get("results"), created)

    @property
    def rule(self) -> str:
        rules = self.record.get("rules") or [""]
        return str(rules[0])


def retry_delay(module: Module, attempts: int) -> float:
    """Seconds until the next run after `attempts` failed ones (exponential, capped)."""
    delay = module.retry_delay * module.retry_backoff ** max(0, attempts - 1)
    return float(min(delay, module.retry_max_delay))


def gives_up(module: Module, created: float, attempts: int, now: float) -> str:
    """Why this was the last run, or "" to try again."""
    if module.max_attempts and attempts >= module.max_attempts:
        return f"gave up after {attempts} attempts"
    if module.max_age and now - created >= module.max_age:
        return f"gave up: job older than {module.max_age:.0f} s"
    return ""


class Processor:
    """Picks processing jobs for worker threads, runs them and settles each run."""

    def __init__(
        self,
        spool: Spool,
        worker: Worker,
        *,
        once: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        self.spool = spool
        self.worker = worker
        self.once = once
        self.stop = stop  # set when the service stops: Slurm jobs are left to the next one
        self.lock = threading.Lock()
        self.busy: set[str] = set()
        self.tried: set[str] = set()
        self.next_at: dict[str, float] = {}
        self.summary = ProcessSummary()

    def pick(self) -> Claim | None:
        """Claim the most urgent, oldest job that may run now, or None."""
        with self.lock:
            now = time.time()
            for _, name in self._candidates():
                progress = ProcessProgress.load(self.spool.state_dir(PROCESSING) / name)
                self.next_at[name] = progress.next_attempt
                if progress.next_attempt > now:
                    continue
                claim = self.worker.claim(PROCESSING, name)
                if claim is not None:
                    self.busy.add(name)
                    if self.once:
                        self.tried.add(name)
                    return claim
        return None

    def next_due(self) -> float | None:
        with self.lock:
            return min((at for at in self.next_at.values() if at), default=None)

    def _candidates(self) -> list[tuple[int, str]]:
        folder = self.spool.state_dir(PROCESSING)
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        self.next_at = {n: at for n, at in self.next_at.items() if n in names}
        found = []
        for name in names:
            if name in self.busy or name in self.tried:
                continue
            try:
                record = json.loads((folder / name / JOB_FILE).read_bytes())
            except (OSError, ValueError):
                continue
            found.append((PRIORITIES.index(job_priority(record)), name))
        return sorted(found)

    def attempt(self, claim: Claim) -> bool:
        """Run the job's chain once and settle it; True if it succeeded."""
        try:
            return self._attempt(claim)
        except BaseException:
            if claim.path.exists():
                claim.release()
            raise
        finally:
            with self.lock:
                self.busy.discard(claim.name)

    def _attempt(self, claim: Claim) -> bool:
        progress = ProcessProgress.load(claim.path)
        output = Tail()
        started = time.monotonic()
        try:
            job = ProcessingJob.load(claim.path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            claim.quarantine(f"bad processing job.json: {exc}")
            self.summary.failed += 1
            return False
        cluster = self._cluster(claim, job, progress)
        if cluster is None:
            progress.attempts += 1
            work = self.worker.tmp_path(".work")
        else:
            work = self.spool.root / CLUSTER_DIR / claim.name
        keep = False
        try:
            if cluster is not None and cluster.resume is None:
                _remove(work)  # what an earlier, finished attempt left
                problem = check_shared(self.spool.root)
                if problem:
                    raise ModuleFailure(job.modules[0].name, f'runner = "slurm": {problem}')
            inputs = _inputs(claim.path, job.record)
            result = run_chain(
                job.modules,
                inputs,
                work,
                self._task(claim.name, job, [tags for _, tags in inputs]),
                job.record.get("process_settings") or {},
                output,
                self._running(claim, progress.attempts),
                cluster,
            )
            self._publish(claim, job, result, output, progress)
        except ModuleFailure as failure:
            self._failed(claim, job, failure, output, progress)
            return False
        except Stopping as stopping:  # the Slurm job goes on: the next process adopts it
            keep = True
            claim.release()
            log.info("job %s: left Slurm job %s running for the next start", claim.name, stopping)
            return False
        finally:
            if not keep:
                _remove(work)
        log.info(
            "job %s: %s -> %d output instance(s) in %.1f s",
            claim.name,
            " | ".join(m.name for m in job.modules),
            len(result.outputs),
            time.monotonic() - started,
        )
        return True

    def _cluster(
        self, claim: Claim, job: ProcessingJob, progress: ProcessProgress
    ) -> Cluster | None:
        """For a chain with Slurm modules: the record hooks, and the Slurm job to adopt if an
        earlier `mercli process` recorded one (its attempt goes on: not counted again)."""
        if not any(module.runner == "slurm" for module in job.modules):
            return None
        resume = load_record(claim.path)
        step = Path(str((resume or {}).get("step_dir", "")))
        if resume is not None and not (step / "in").is_dir():
            log.warning("job %s: recorded Slurm step %s is gone: starting anew", claim.name, step)
            resume = None
        if resume is None:
            progress.attempts += 1
        else:
            progress.attempts = int(resume.get("attempt") or progress.attempts + 1)
        path, running = claim.path / SLURM_FILE, claim.key_dir / RUNNING_FILE
        started = datetime.now(UTC).isoformat(timespec="milliseconds")

        def record(document: Mapping[str, Any] | None) -> None:
            if document is None:
                path.unlink(missing_ok=True)
            else:
                self.worker.replace_file(path, json.dumps(document).encode())

        def on_state(module: Module, job_id: str, state: str) -> None:
            document = {"module": module.name, "attempt": progress.attempts, "started": started}
            document |= {"runner": "slurm", "slurm_job": job_id, "slurm_state": state}
            self.worker.replace_file(running, json.dumps(document).encode())

        return Cluster(record, resume, progress.attempts, self.stop, on_state)

    def _running(self, claim: Claim, attempt: int) -> Running:
        """The runner's hook that keeps `running.json` in the claim folder (status, orphans)."""
        path = claim.key_dir / RUNNING_FILE

        def running(module: Module, pid: int | None) -> None:
            if pid is not None:
                record = running_record(module.name, attempt, pid)
                self.worker.replace_file(path, json.dumps(record).encode())
                return
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # harmless: the claim folder goes with the claim
                log.warning("cannot remove %s: %s", path, exc)

        return running

    def _task(
        self, name: str, job: ProcessingJob, sidecars: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """task.json's common part, as mercure's `Task` model has it (id, info, dispatch,
        study; process is per module): a module that loads it with mercure's own pydantic
        model finds every field that model requires. `sidecars` are the input instances'."""
        record = job.record
        study = bool(record.get("study"))
        uid = record.get("StudyInstanceUID" if study else "SeriesInstanceUID", "")
        first: Mapping[str, Any] = sidecars[0] if sidecars else {}
        info = {
            "action": "process" if job.results == "route" else "both",
            "uid": uid,
            "uid_type": "study" if study else "series",
            "triggered_rules": {rule: True for rule in record.get("rules") or []},
            "applied_rule": job.rule,
            "patient_name": str(first.get("PatientName", "")),
            "mrn": record.get("PatientID", ""),
            "acc": record.get("AccessionNumber", ""),
            "sender_address": str(first.get("SenderAddress") or "MISSING"),
            "sender_aet": str(first.get("SenderAET") or "MISSING"),
            "receiver_aet": str(first.get("ReceiverAET") or "MISSING"),
            "mercure_version": "mercli",
            "mercure_appliance": "mercli",
            "mercure_server": os.uname().nodename,
        }
        return {
            "id": name,
            "info": info,
            "dispatch": {},
            "study": _task_study(uid, record, sidecars) if study else {},
        }

    # -- settling ------------------------------------------------------------------------

    def _publish(
        self,
        claim: Claim,
        job: ProcessingJob,
        result: ChainResult,
        output: Tail,
        progress: ProcessProgress,
    ) -> None:
        """One transaction: the output, and the job into success/ with its log and result."""
        module = job.modules[-1].name
        sidecars = _output_sidecars(result, module, int(job.record.get("processing_hops", 1)))
        by_series: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
        for (path, _), tags in zip(result.outputs, sidecars, strict=True):
            by_series.setdefault(safe_name(str(tags["SeriesInstanceUID"])), []).append((path, tags))
        transaction = claim.transaction()
        made: list[tuple[str, str]] = []
        for series, files in by_series.items():
            if job.results == "route":
                _fill(transaction.new_item(INCOMING, series), files)
                made.append((INCOMING, series))
                continue
            first: Path | None = None
            for target in job.targets:
                item = new_id()
                folder = transaction.new_item(OUTGOING, item)
                _fill(folder, files, first)
                first = first or folder
                record = job_record(
                    item,
                    series,
                    [tags for _, tags in files],
                    [job.rule],
                    target=target.to_json(),
                    priority=job_priority(job.record),
                )
                notify = (job.record.get("notify_targets") or {}).get(target.name)
                if notify:
                    record["notify"] = notify
                write_json(folder / JOB_FILE, record)
                made.append((OUTGOING, item))
        progress.finished = datetime.now(UTC).isoformat(timespec="milliseconds")
        progress.last_error, progress.next_attempt = "", 0.0
        done = transaction.new_item(SUCCESS, claim.name)
        link_tree(claim.path, done)
        for stale in (progress.FILE, LOG_FILE):  # of an earlier, failed run
            (done / stale).unlink(missing_ok=True)
        write_new(done / progress.FILE, progress.to_bytes())
        write_new(done / LOG_FILE, output.to_bytes())
        if result.result is not None:
            write_json(done / RESULT_FILE, result.result)
        subscriptions = subscriptions_from(job.record)
        if subscriptions:
            variables = _variables(
                job, "processed", instances=len(result.outputs), result=result.result
            )
            source = {"item": claim.name, "rule": job.rule, "module": module}
            add_notifications(transaction, subscriptions, "processed", variables, source)
        transaction.commit()
        if job.results == "route":
            for series in by_series:
                self.worker.write_hint(series, {"ended": "processed", "sender": module})
        self.spool.log(
            "processed",
            item=claim.name,
            rule=job.rule,
            modules=[m.name for m in job.modules],
            status=result.statuses,
            instances=len(result.outputs),
            series=len(by_series),
            outputs=[f"{state}/{name}" for state, name in made],
            result=result.result,
        )
        with self.lock:
            self.summary.processed += 1
            self.summary.outputs += [f"{state}/{name}" for state, name in made]

    def _failed(
        self,
        claim: Claim,
        job: ProcessingJob,
        failure: ModuleFailure,
        output: Tail,
        progress: ProcessProgress,
    ) -> None:
        module = next((m for m in job.modules if m.name == failure.module), job.modules[0])
        now = time.time()
        progress.last_error = str(failure)
        self.worker.replace_file(claim.path / LOG_FILE, output.to_bytes())
        fields = {"item": claim.name, "rule": job.rule, "module": module.name}
        give_up = gives_up(module, job.created, progress.attempts, now)
        if give_up:
            progress.save(self.worker, claim.path)
            subscriptions = subscriptions_from(job.record)
            variables = _variables(job, "failed", module=module.name, error=str(failure))
            quarantine(
                claim,
                str(failure),
                subscriptions,
                variables,
                {"item": claim.name, "rule": job.rule, "module": module.name},
                module=module.name,
                status=failure.status,
                attempts=progress.attempts,
                log_tail=output.text(TAIL_IN_ERROR),
            )
            self.spool.log("failed", **fields, reason=str(failure), status=failure.status)
            log.error("job %s failed for good (%s): %s", claim.name, give_up, failure)
            with self.lock:
                self.summary.failed += 1
            return
        delay = retry_delay(module, progress.attempts)
        progress.next_attempt = now + delay
        progress.save(self.worker, claim.path)
        (claim.path / SLURM_FILE).unlink(missing_ok=True)  # that Slurm job is over
        claim.release()
        with self.lock:
            self.next_at[claim.name] = progress.next_attempt
            self.summary.retried += 1
        self.spool.log("retry", **fields, error=str(failure), delay=round(delay, 3))
        log.warning("job %s: %s; retry in %.1f s", claim.name, failure, delay)


def _inputs(folder: Path, record: Mapping[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """The job's instances (a study job's in its series sub-folders) with their sidecars."""
    folders = [folder / name for name in study_series(record)] or [folder]
    found = []
    for where in folders:
        for path in sorted(where.glob(f"*{INSTANCE_SUFFIX}")):
            sidecar = path.with_suffix(SIDECAR_SUFFIX)
            try:
                tags = json.loads(read_regular(sidecar))
            except (OSError, ValueError):
                try:
                    tags = read_tags(path)
                except UnreadableDicom:
                    continue
            found.append((path, tags))
    return found


def _variables(job: ProcessingJob, event: str, **fields: Any) -> dict[str, Any]:
    """Template variables of a processing job's event (job.json's keys; no sidecar read)."""
    return event_variables(
        event,
        job.record,
        rule=job.rule,
        rules=[job.rule],
        module=fields.pop("module", job.modules[-1].name),
        **fields,
    )


def _task_study(
    uid: str, record: Mapping[str, Any], sidecars: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """mercure's `TaskStudy` for a study job: the study was complete (by its rule's
    `require`, which has no mercure equivalent: "complete_required_series" holds none)."""
    descriptions: dict[str, str] = {}
    for tags in sidecars:
        series = str(tags.get("SeriesInstanceUID", ""))
        descriptions.setdefault(series, str(tags.get("SeriesDescription", "")))
    return {
        "study_uid": uid,
        "complete_trigger": "received_series",
        "complete_required_series": "",
        "creation_time": str(record.get("first_received") or ""),
        "last_receive_time": str(record.get("last_received") or ""),
        "received_series": list(descriptions.values()),
        "received_series_uid": list(descriptions),
        "complete_force": False,
        "complete_force_action": "discard",
    }


def _output_sidecars(result: ChainResult, module: str, hops: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    meta = {"SenderAET": PROCESS_SENDER + module, "ReceiverAET": RECEIVER_AET, "ReceivedAt": now}
    return [{**tags, **meta, HOPS_KEY: hops} for _, tags in result.outputs]


def _fill(
    folder: Path, files: Sequence[tuple[Path, Mapping[str, Any]]], first: Path | None = None
) -> None:
    """Link the instances in and write their sidecars, all fsync'ed after the last is written
    (the transaction's commit fsyncs the folders). The instances too: the module wrote them
    and never synced them, and a job must not be committed with data a power cut can lose.
    The jobs of further targets link both from the `first` target's job (same inodes, synced
    already): spool files are never changed in place, so sharing them is safe, as route does."""
    written = []
    for path, tags in files:
        name = safe_name(str(tags["SOPInstanceUID"]))
        instance = folder / f"{name}{INSTANCE_SUFFIX}"
        sidecar = folder / f"{name}{SIDECAR_SUFFIX}"
        if first is not None:
            os.link(first / instance.name, instance, follow_symlinks=False)
            os.link(first / sidecar.name, sidecar, follow_symlinks=False)
            continue
        os.link(path, instance, follow_symlinks=False)
        write_new(sidecar, json_bytes(dict(tags)), sync=False)  # fsync'ed below, in one pass
        written += [instance, sidecar]
    fsync_files(written)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class ProcessService:
    """`mercli process`: N worker threads until done (--once) or until SIGINT/SIGTERM."""

    def __init__(self, spool_root: Path, workers: int) -> None:
        self.spool = Spool.open(spool_root)
        self.workers = max(1, workers)
        self.stop = threading.Event()
        self.wake = threading.Event()

    def recover(self) -> None:
        """Kill what dead workers' modules left running, then recover their claims."""
        kill_orphans(self.spool)
        recover(self.spool)

    def run(self, *, once: bool) -> ProcessSummary:
        self.recover()
        with Worker(self.spool, "process") as worker:
            processor = Processor(self.spool, worker, once=once, stop=self.stop)
            if once:
                self._threads(processor, self._drain)
            else:
                stop_on_signals(self.stop, "finishing the jobs in hand", self.wake)
                log.info("processing from %s with %d worker(s)", self.spool.root, self.workers)
                threading.Thread(target=self._recover_periodically, daemon=True).start()
                with wake_on_changes(self.wake, [self.spool.state_dir(PROCESSING)]):
                    self._threads(processor, self._work)
            return processor.summary

    def _threads(self, processor: Processor, body: Any) -> None:
        threads = [
            threading.Thread(target=body, args=(processor,), name=f"process-{n}")
            for n in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:  # with a timeout: see mercli.service.SIGNAL_POLL
            while thread.is_alive():
                thread.join(SIGNAL_POLL)

    def _drain(self, processor: Processor) -> None:
        while not self.stop.is_set() and (claim := processor.pick()) is not None:
            processor.attempt(claim)

    def _work(self, processor: Processor) -> None:
        while not self.stop.is_set():
            claim = processor.pick()
            if claim is not None:
                try:
                    processor.attempt(claim)
                except OSError as exc:  # the spool, not the module: log and go on
                    log.error("processing of %s failed: %s", claim.name, exc)
                continue
            due = processor.next_due()
            timeout = FULL_SCAN if due is None else max(0.05, min(FULL_SCAN, due - time.time()))
            self.wake.wait(timeout)
            self.wake.clear()

    def _recover_periodically(self) -> None:
        while not self.stop.wait(RECOVER_EVERY):
            self.recover()
            self.wake.set()
