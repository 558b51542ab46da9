"""Resend: put finished items (discard/, error/, success/) back to work.

**Selecting.** Items of one state, filtered by study, series, patient ID and accession number
(from the item's job.json, else its first sidecar, else, for an instance receive could not
file, from the instance itself), by when they entered the state (folder ctime) and by id.
All filters must match.

**Where they go.**
- By default, back through routing with the rules route uses now: the instances (`.dcm` and
  `.tags`; never job.json, dispatch.json or error.json) become a batch in
  `incoming/<series>/`, merged into a batch of that series already waiting, and a completion
  hint makes route take it after `settle`. An instance receive quarantined (error/<id>/
  with `instance.dcm` only) gets its sidecar rebuilt and its SOP Instance UID as name; one that
  still cannot be read stays where it is and is reported.
- A failed job (error/ with a job.json naming a target) goes back to that target by default:
  a new job with the same target definition and priority, carrying over which instances the
  target already has (dispatch.json `delivered`), attempts starting again from zero.
- A failed processing job (error/ with a job.json naming a module chain, SPEC §7) goes back
  to `processing/` whole, as a new job that runs its chain again with all its attempts.
- With a target from a rules file: one new job per item, straight to that target, at the
  target's own priority (normal if it has none); an offpeak target's job waits for the `offpeak`
  window given with it (the rules file's `[route] offpeak`).

**Study items** (job.json `"study": true`: a study job, or a discarded incomplete study; SPEC
§4.1) keep their shape: back through routing, each series becomes its own batch in
`incoming/<series>/` (one transaction for all of them), so study rules hold and complete the
study again; to a target (given, or a failed job's own), the copy is one new study job with
the same series, in the same order, in the same `<series>/` sub-folders (`study_record`),
and a failed job's `delivered` (`<series>/<name>` keys) carried over. `--study` selects them
by their StudyInstanceUID; `--series` selects a study item holding that series (the whole
item is resent). A study item with a folder its job.json does not list, or instances outside
its series folders, is refused and left alone: its source would go, those files with it.

**Safety.** Each item is claimed, its copy prepared as the output of a transaction (hard links,
never copies of pixel data) and the commit deletes the source: killed at any instant, either
the source is still there (rolled back) or the copy is published (rolled forward), never both
and never neither. Resending the same selection twice is harmless: the second run finds
nothing, because the first one took the items out of their state. It only finds (and resends
again) copies that have come back to that state since, e.g. routed to discard/ again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from mercli.durations import parse_duration
from mercli.errors import UsageError
from mercli.fsutil import make_dir
from mercli.jobs import (
    DISPATCH_FILE,
    JOB_KEYS,
    NORMAL,
    Progress,
    Target,
    job_priority,
    read_json_object,
    resend_record,
    resend_study_record,
    study_series,
)
from mercli.names import new_id, safe_name
from mercli.spool import (
    DISCARD,
    ERROR,
    ERROR_FILE,
    INCOMING,
    INSTANCE_SUFFIX,
    JOB_FILE,
    OUTGOING,
    PROCESSING,
    SIDECAR_SUFFIX,
    SUCCESS,
    Claim,
    Spool,
    Transaction,
    Worker,
    write_json,
)
from mercli.tags import UnreadableDicom, read_tags

FROM_STATES = (DISCARD, ERROR, SUCCESS)
QUARANTINED = "instance.dcm"  # what receive keeps of an instance it could not file
RECEIVE_META = ("SenderAET", "SenderAddress", "ReceiverAET", "ReceivedAt")
_FILTER_KEYS = {
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "patient_id": "PatientID",
    "accession": "AccessionNumber",
}


class Unresendable(Exception):
    """This item cannot be resent as it is (e.g. its instance is still unreadable)."""


@dataclass(frozen=True)
class Filters:
    """What to resend; every filter given must match (None: not filtered on)."""

    study: str | None = None
    series: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    since: float | None = None  # state entered at or after (wall-clock seconds)
    until: float | None = None  # state entered before
    ids: frozenset[str] | None = None  # item names

    def needs_keys(self) -> bool:
        return any(getattr(self, name) is not None for name in _FILTER_KEYS)

    def match_time(self, entered: float) -> bool:
        return (self.since is None or entered >= self.since) and (
            self.until is None or entered < self.until
        )

    def match_keys(self, keys: Mapping[str, str | frozenset[str]]) -> bool:
        """Every filter given equals its key (or is one of them: a study item's series)."""
        for name, keyword in _FILTER_KEYS.items():
            wanted, value = getattr(self, name), keys.get(keyword)
            if wanted is None or value == wanted:
                continue
            if not (isinstance(value, frozenset) and wanted in value):
                return False
        return True


@dataclass(frozen=True)
class Selected:
    """An item chosen for resending."""

    state: str
    name: str
    entered: float

    @property
    def label(self) -> str:
        return f"{self.state}/{self.name}"


@dataclass
class ResendReport:
    """What resend did: the copies made (source label, new label; a study item back to routing
    makes one per series), and what it could not do."""

    resent: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, reason)
    vanished: int = 0  # claimed by another process (resend, purge) first

    @property
    def items(self) -> int:
        """How many items were resent."""
        return len({source for source, _copy in self.resent})


def parse_id(text: str, state: str) -> str:
    """An item name from `state/id` or `id` (as purge and resend print them)."""
    text = text.strip()
    prefix, slash, name = text.rpartition("/")
    if slash and prefix != state:
        raise UsageError(f"{text!r} is not an item of {state}/")
    if not name or name in (".", ".."):
        raise UsageError(f"not an item id: {text!r}")
    return name


def parse_time(text: str, now: float) -> float:
    """A point in time: a duration meaning "ago" (`2h`), or an ISO date/datetime (local if
    no zone is given)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        message = (
            f"not a time: {text!r} (use e.g. 2h for two hours ago, 2026-11-28 or 2026-11-28T14:00)"
        )
        raise ValueError(message) from None
    return moment.astimezone().timestamp() if moment.tzinfo is None else moment.timestamp()


def select(spool: Spool, state: str, filters: Filters) -> tuple[list[Selected], list[str]]:
    """The matching unclaimed items of `state` (oldest first), and the ids that were not found."""
    found: list[Selected] = []
    seen: set[str] = set()
    for item in spool.items(state):
        if filters.ids is not None and item.name not in filters.ids:
            continue
        try:
            entered = os.stat(item.path, follow_symlinks=False).st_ctime
            seen.add(item.name)
            if not filters.match_time(entered):
                continue
            if filters.needs_keys() and not filters.match_keys(item_keys(item.path)):
                continue
        except FileNotFoundError:
            continue  # claimed meanwhile
        found.append(Selected(state, item.name, entered))
    found.sort(key=lambda s: (s.entered, s.name))
    missing = sorted((filters.ids or frozenset()) - seen)
    return found, missing


def item_keys(path: Path) -> dict[str, str | frozenset[str]]:
    """The JOB_KEYS of an item: from job.json, else its first sidecar, else its instance.
    A study item's SeriesInstanceUID is the set of its series' UIDs."""
    job = read_json_object(path / JOB_FILE)
    if job.get("study") is True:
        keys: dict[str, str | frozenset[str]] = {
            key: str(job[key]) for key in JOB_KEYS if key in job
        }
        entries = job.get("series")
        uids = [e.get("SeriesInstanceUID") for e in entries or () if isinstance(e, dict)]
        keys["SeriesInstanceUID"] = frozenset(str(uid) for uid in uids if uid)
        return keys
    for source in (path / JOB_FILE, *sorted(path.glob(f"*{SIDECAR_SUFFIX}"))[:1]):
        record = read_json_object(source)
        if any(key in record for key in JOB_KEYS):
            return {key: str(record[key]) for key in JOB_KEYS if key in record}
    try:
        tags = read_tags(path / QUARANTINED)
    except UnreadableDicom:
        return {}
    return {key: str(tags[key]) for key in JOB_KEYS if key in tags}


def resend_items(
    spool: Spool,
    selected: Iterable[Selected],
    *,
    target: Target | None = None,
    offpeak: str | None = None,
    on_item: Callable[[Selected], None] | None = None,
) -> ResendReport:
    """Resend each selected item (see module docstring); keeps going past failures.

    `offpeak`: the window (`[route] offpeak` of the rules defining `target`) for the jobs of
    an offpeak target."""
    report = ResendReport()
    with Worker(spool, "resend") as worker:
        for item in selected:
            _resend_one(worker, item, _Destination(target, offpeak), report)
            if on_item is not None:
                on_item(item)
    return report


@dataclass
class _Plan:
    """The copy of one item: which files, under which names, going where."""

    links: list[tuple[str, str]]  # (name in the item, name in the copy); study: `<series>/NAME`
    sidecars: dict[str, dict[str, Any]]  # rebuilt sidecars to write into the copy
    tags: list[Mapping[str, Any]]  # one per instance, for job.json (series items)
    series: str  # incoming/<series> folder name (series items)
    target: dict[str, Any] | None  # None: back through routing
    keep_delivered: bool
    priority: str = NORMAL
    offpeak: str | None = None
    study: list[dict[str, Any]] | None = None  # study items: job.json `series` of the copy
    keys: dict[str, Any] = field(default_factory=dict)  # study items: JOB_KEYS, received range

    def groups(self) -> list[str]:
        """The incoming/ groups the copy makes when it goes back through routing."""
        return [self.series] if self.study is None else [s["series"] for s in self.study]


@dataclass(frozen=True)
class _Destination:
    """Where resend sends: a target (and the offpeak window of its rules) or None: routing."""

    target: Target | None
    offpeak: str | None = None


def _resend_one(
    worker: Worker, item: Selected, destination: _Destination, report: ResendReport
) -> None:
    """Plan from the published item (a still-unreadable one is never touched), then move it."""
    folder = worker.spool.state_dir(item.state) / item.name
    if item.state == ERROR and destination.target is None and _processing(folder):
        _resend_processing(worker, item, report)
        return
    try:
        plan = _plan(folder, item.state, destination)
    except FileNotFoundError:
        report.vanished += 1
        return
    except Unresendable as exc:
        report.failed.append((item.label, str(exc)))
        return
    claim = worker.claim(item.state, item.name)
    if claim is None:
        report.vanished += 1
        return
    try:
        transaction, labels = _prepare(claim, plan)
    except BaseException:
        claim.release()
        raise
    transaction.commit()
    if plan.target is None:
        _hint(worker, plan.groups())
    for label in labels:  # one event per copy: a study back to routing makes one per series
        worker.spool.log("resent", **{"from": item.label}, item=item.name, to=label)
        report.resent.append((item.label, label))


def _processing(folder: Path) -> bool:
    """A failed processing job (SPEC §7): job.json with a module chain."""
    return isinstance(read_json_object(folder / JOB_FILE).get("process"), list)


def _resend_processing(worker: Worker, item: Selected, report: ResendReport) -> None:
    """A failed processing job goes back to processing/ whole, as a new job: its instances (a
    study's sub-folders too) and job.json with a new id, created now and `resent_from`; not
    its error.json, process.json or module.log, so it runs with all its attempts again."""
    claim = worker.claim(item.state, item.name)
    if claim is None:
        report.vanished += 1
        return
    try:
        job = read_json_object(claim.path / JOB_FILE)
        name = new_id()
        transaction = claim.transaction()
        folder = transaction.new_item(PROCESSING, name)
        for entry in sorted(claim.path.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                make_dir(folder / entry.name)
                for instance in entry.iterdir():
                    os.link(instance, folder / entry.name / instance.name, follow_symlinks=False)
            elif entry.name.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX)):
                os.link(entry, folder / entry.name, follow_symlinks=False)
        created = datetime.now().astimezone().isoformat(timespec="milliseconds")
        source = f"{claim.state}/{claim.name}"
        write_json(
            folder / JOB_FILE, {**job, "id": name, "created": created, "resent_from": source}
        )
    except BaseException:
        claim.release()
        raise
    transaction.commit()
    label = f"{PROCESSING}/{name}"
    worker.spool.log("resent", **{"from": item.label}, item=item.name, to=label)
    report.resent.append((item.label, label))


def _hint(worker: Worker, groups: Sequence[str]) -> None:
    """Completion hints for the batches of a copy, so route takes them after `settle`. A study's
    get strictly increasing times (a hint's time is its file's), so that study rules hold its
    series again in their order, whatever the clock's granularity."""
    stamp = time.time_ns()  # after the commit: no earlier than the batches' own times
    for n, series in enumerate(groups):
        worker.write_hint(series, {"ended": "resent"})
        if len(groups) > 1:
            with suppress(OSError):  # advisory, as the hint itself
                os.utime(worker.spool.hints / series, ns=(stamp + n * 1000,) * 2)


def _plan(folder: Path, state: str, destination: _Destination) -> _Plan:
    job = read_json_object(folder / JOB_FILE)
    if job.get("study") is True:
        links, study = _study_links(folder, job)
        keys = {k: job[k] for k in (*JOB_KEYS, "first_received", "last_received") if k in job}
        plan = _Plan(links, {}, [], "", None, False, study=study, keys=keys)
        return _aim(plan, job, state, destination)
    names = sorted(p.name for p in folder.iterdir())
    instances = [n for n in names if n.endswith(INSTANCE_SUFFIX)]
    if not instances:
        raise Unresendable("it holds no instances")
    if instances == [QUARANTINED] and f"{Path(QUARANTINED).stem}{SIDECAR_SUFFIX}" not in names:
        links, sidecars, tags = _rebuild_quarantined(folder)
    else:
        links = [(n, n) for n in names if n.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX))]
        sidecars = {}
        tags = [
            read_json_object(folder / f"{n[: -len(INSTANCE_SUFFIX)]}{SIDECAR_SUFFIX}")
            for n in instances
        ]
    series = str(job.get("series") or "") or safe_name(str(tags[0].get("SeriesInstanceUID", "")))
    return _aim(_Plan(links, sidecars, tags, series, None, False), job, state, destination)


def _aim(plan: _Plan, job: Mapping[str, Any], state: str, destination: _Destination) -> _Plan:
    """Where the copy goes: the given target, a failed job's own target, or routing."""
    target = destination.target
    if target is not None:
        plan.target, plan.offpeak = target.to_json(), destination.offpeak
        plan.priority = target.priority or NORMAL
    elif state == ERROR and isinstance(job.get("target"), dict):
        window = job.get("offpeak")
        plan.target, plan.keep_delivered = dict(job["target"]), True
        plan.priority, plan.offpeak = job_priority(job), window if isinstance(window, str) else None
    return plan


def _study_links(
    folder: Path, job: Mapping[str, Any]
) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """A study item's instances (`<series>/NAME`) and its series list as the copy has it:
    in job.json's order, each series with the instances its folder holds (none: left out)."""
    try:
        names = study_series(job)
        uids = [str(entry.get("SeriesInstanceUID", "")) for entry in job["series"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Unresendable(f"its job.json does not list its series ({exc})") from None
    if len(set(names)) != len(names):
        raise Unresendable("its job.json lists a series twice")
    with os.scandir(folder) as entries:  # FileNotFoundError: claimed meanwhile
        present = {e.name: e.is_dir(follow_symlinks=False) for e in entries}
    unlisted = sorted(n for n, is_dir in present.items() if is_dir and n not in names)
    if unlisted:
        raise Unresendable(f"it holds folders its job.json does not list: {', '.join(unlisted)}")
    if any(n.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX)) for n in present):
        raise Unresendable("it holds instances outside its series folders")
    links: list[tuple[str, str]] = []
    study: list[dict[str, Any]] = []
    for name, uid in zip(names, uids, strict=True):
        if not present.get(name):
            raise Unresendable(f"series folder {name} is missing or not a folder")
        with os.scandir(folder / name) as entries:
            files = sorted(
                (e.name, e.is_file(follow_symlinks=False))
                for e in entries
                if e.name.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX))
            )
        irregular = [n for n, regular in files if not regular]
        if irregular:  # never linked on: a symlink could point anywhere
            raise Unresendable(f"{name}/{irregular[0]} is not a regular file")
        instances = [n[: -len(INSTANCE_SUFFIX)] for n, _ in files if n.endswith(INSTANCE_SUFFIX)]
        if instances:
            links += [(f"{name}/{n}", f"{name}/{n}") for n, _ in files]
            study.append({"series": name, "SeriesInstanceUID": uid, "instances": instances})
    if not study:
        raise Unresendable("it holds no instances")
    return links, study


def _rebuild_quarantined(
    folder: Path,
) -> tuple[list[tuple[str, str]], dict[str, dict[str, Any]], list[Mapping[str, Any]]]:
    """An instance receive could not file: read it again, name it by its SOP Instance UID."""
    try:
        tags = read_tags(folder / QUARANTINED)
    except UnreadableDicom as exc:
        raise Unresendable(f"instance still unreadable: {exc}") from None
    missing = [uid for uid in ("SOPInstanceUID", "SeriesInstanceUID") if not tags.get(uid)]
    if missing:
        raise Unresendable(f"instance still lacks {', '.join(missing)}")
    received = read_json_object(folder / ERROR_FILE)
    sidecar = {**tags, **{key: received[key] for key in RECEIVE_META if key in received}}
    name = safe_name(str(tags["SOPInstanceUID"]))
    return (
        [(QUARANTINED, f"{name}{INSTANCE_SUFFIX}")],
        {f"{name}{SIDECAR_SUFFIX}": sidecar},
        [sidecar],
    )


def _prepare(claim: Claim, plan: _Plan) -> tuple[Transaction, list[str]]:
    """The copy, prepared (not yet committed) as the output of a transaction on the claim,
    and the labels of what it makes."""
    transaction = claim.transaction()
    if plan.study is not None:
        return transaction, _prepare_study(transaction, claim, plan)
    if plan.target is None:
        state, name = INCOMING, plan.series
    else:
        state, name = OUTGOING, new_id()
    folder = transaction.new_item(state, name)
    for source, destination in plan.links:
        os.link(claim.path / source, folder / destination, follow_symlinks=False)
    for sidecar_name, sidecar in plan.sidecars.items():
        write_json(folder / sidecar_name, sidecar)
    if plan.target is not None:
        source = f"{claim.state}/{claim.name}"
        record = resend_record(
            name,
            plan.series,
            plan.tags,
            plan.target,
            source,
            priority=plan.priority,
            offpeak=plan.offpeak,
        )
        write_json(folder / JOB_FILE, record)
        delivered = Progress.load(claim.path).delivered if plan.keep_delivered else []
        if delivered:
            write_json(folder / DISPATCH_FILE, asdict(Progress(delivered=list(delivered))))
    return transaction, [f"{state}/{name}"]


def _prepare_study(transaction: Transaction, claim: Claim, plan: _Plan) -> list[str]:
    """A study item's copy: one incoming/ batch per series (routing), or one study job."""
    assert plan.study is not None
    series = [entry["series"] for entry in plan.study]
    if plan.target is None:
        folders = {name: transaction.new_item(INCOMING, name) for name in series}
        for source, destination in plan.links:
            name, _, instance = destination.partition("/")
            os.link(claim.path / source, folders[name] / instance, follow_symlinks=False)
        return [f"{INCOMING}/{name}" for name in series]
    job_id = new_id()
    folder = transaction.new_item(OUTGOING, job_id)
    for name in series:
        make_dir(folder / name)
    for source, destination in plan.links:
        os.link(claim.path / source, folder / destination, follow_symlinks=False)
    record = resend_study_record(
        job_id,
        plan.study,
        plan.keys,
        plan.target,
        f"{claim.state}/{claim.name}",
        priority=plan.priority,
        offpeak=plan.offpeak,
    )
    write_json(folder / JOB_FILE, record)
    delivered = Progress.load(claim.path).delivered if plan.keep_delivered else []
    if delivered:
        write_json(folder / DISPATCH_FILE, asdict(Progress(delivered=list(delivered))))
    return [f"{OUTGOING}/{job_id}"]
