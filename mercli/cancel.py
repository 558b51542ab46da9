"""Cancel: take queued jobs (outgoing/, processing/) out of the queue, into error/.

**Selecting** is resend's (`mercli.resend.select`, `Filters`): ids, --study, --series, all
that are given must match; and `target`: the job's target (job.json `target.name`), or one
of a processing job's output `targets`. Jobs held in a claim right now are found too, by
listing the claims.

**A job nobody holds** is claimed by this process and quarantined (`Claim.quarantine`):
error/<job>/ with error.json `reason` "cancelled: <reason>", `cancelled_by` (user name),
`uid` and `cancelled_at`; event `cancelled`. One rename: a crash leaves the job queued or
cancelled, never both.

**A job being sent right now** (claimed by a dispatcher) is never torn mid-file: a
`cancel.json` (`mercli.jobs.CancelRequest`) is written whole into its claimed folder, and
the dispatcher stops after the instance in flight and settles the job the same way (see
`mercli.dispatch.dispatcher`). If the claim ends before the request lands, the job is
looked for in outgoing/ again and cancelled there. A processing job being run is not
stopped: it is reported, to be cancelled once its output is queued.

`mercli resend --from error` brings a cancelled job back: it copies instances, never
cancel.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mercli.jobs import CANCEL_FILE, CancelRequest, read_json_object
from mercli.resend import Filters, item_keys, select
from mercli.spool import JOB_FILE, OUTGOING, PROCESSING, Spool, Worker

CANCEL_STATES = (OUTGOING, PROCESSING)


@dataclass(frozen=True)
class Queued:
    """A job chosen for cancelling; `owner`: the worker holding it now, if any."""

    state: str
    name: str
    owner: str | None = None
    held: Path | None = None  # the claimed item folder, when `owner` holds it

    @property
    def label(self) -> str:
        return f"{self.state}/{self.name}"


@dataclass
class CancelReport:
    """What cancel did: jobs moved to error/, requests left with the worker sending them
    (label, owner), and what it could not do."""

    cancelled: list[str] = field(default_factory=list)
    requested: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)
    vanished: int = 0  # finished (delivered, failed) or taken by another process first


def find(spool: Spool, filters: Filters, target: str | None) -> tuple[list[Queued], list[str]]:
    """The matching queued jobs, waiting ones first (oldest first), then those held now; and
    the ids found nowhere."""
    found: list[Queued] = []
    missing = set(filters.ids or ())
    for state in CANCEL_STATES:
        selected, not_here = select(spool, state, filters)
        missing &= set(not_here)
        folder = spool.state_dir(state)
        found += [Queued(state, s.name) for s in selected if _for_target(folder / s.name, target)]
    for state in CANCEL_STATES:
        for item in spool.claimed(state):
            if filters.ids is not None and item.name not in filters.ids:
                continue
            missing.discard(item.name)
            if filters.needs_keys() and not filters.match_keys(item_keys(item.path)):
                continue
            if _for_target(item.path, target) and item.claimed_by is not None:
                found.append(Queued(state, item.name, item.claimed_by, item.path))
    return found, sorted(missing)


def _for_target(folder: Path, target: str | None) -> bool:
    if target is None:
        return True
    job = read_json_object(folder / JOB_FILE)
    own = job.get("target")
    outputs = job.get("targets")
    names = [own] if isinstance(own, dict) else outputs if isinstance(outputs, list) else []
    return any(isinstance(t, dict) and t.get("name") == target for t in names)


def cancel_jobs(spool: Spool, jobs: Iterable[Queued], reason: str) -> CancelReport:
    """Cancel each job (see the module docstring); keeps going past failures."""
    report = CancelReport()
    request = CancelRequest.now(reason)
    with Worker(spool, "cancel") as worker:
        for job in jobs:
            if job.owner is None:
                _take(worker, job, request, report)
            else:
                _ask(worker, job, request, report)
    return report


def _take(
    worker: Worker, job: Queued, request: CancelRequest, report: CancelReport, ask: bool = True
) -> None:
    """Claim a waiting job and quarantine it; one being sent meanwhile gets a request."""
    claim = worker.claim(job.state, job.name)
    if claim is None:
        held = [i for i in worker.spool.claimed(job.state) if i.name == job.name]
        if ask and held and held[0].claimed_by not in (None, worker.id):
            owner = held[0].claimed_by
            _ask(worker, Queued(job.state, job.name, owner, held[0].path), request, report)
        else:
            report.vanished += 1
        return
    claim.quarantine(request.error, **request.detail())
    fields = {"item": job.name, "from": job.label, "by": request.by}
    worker.spool.log("cancelled", **fields, reason=request.reason)
    report.cancelled.append(job.label)


def _ask(worker: Worker, job: Queued, request: CancelRequest, report: CancelReport) -> None:
    """Leave cancel.json in the claimed job for the dispatcher sending it."""
    assert job.owner is not None and job.held is not None
    if job.state != OUTGOING:
        report.failed.append((job.label, f"being processed by {job.owner}; cancel it later"))
        return
    try:
        worker.replace_file(job.held / CANCEL_FILE, request.to_bytes())
    except FileNotFoundError:  # the claim ended first: back in outgoing/, or finished
        if (worker.spool.state_dir(job.state) / job.name).exists():
            _take(worker, Queued(job.state, job.name), request, report, ask=False)
        else:
            report.vanished += 1
        return
    report.requested.append((job.label, job.owner))
