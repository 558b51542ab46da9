"""Routing: when a series is complete, which rules it matches, and the jobs that follow.

**Completion.** A series batch in `incoming/<series>/` is complete when either
- `settle` seconds have passed since the association that sent it ended (receive writes
  `hints/<series>` then) and no instance arrived after that hint, or
- `series_timeout` seconds have passed since its last instance arrived.

"Arrived" is the modification time of the series folder: every instance is renamed into it,
which sets it; a hint's time is its file's. So one `stat` per series and per hint tells a scan
all it needs: a scan costs one directory listing plus two stats per series, however many
instances there are or how often it runs.

**Routing a series** claims it (an exclusive lock keeps instances being received out of it:
they start a new batch of the series, routed in turn), reads the sidecars, applies the rules
(`mercli.rules.decide`), and in one transaction creates a job in `outgoing/` per target (hard
links, no copies), a processing job in `processing/` per rule with `process` (SPEC §7), or an
item in `discard/` with the reason. Killed at any point, the claim is
rolled back (routed again later) or forward (routed once), never half.

**A series whose rules run out of time** (`[route] rule_timeout`, `re()` included: SPEC §9)
is quarantined whole into `error/<id>/`, its error.json naming the rule, and routing goes on
with the next series. Left in incoming/, it would be taken first again after every restart
and stop all routing; from error/, `mercli resend` brings it back once the rule is fixed.

Every item the router creates holds the instances (NAME.dcm + NAME.tags) and a `job.json`; see
`JobRecord` for its keys.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercli.audit.keys import trail_fields
from mercli.jobs import input_hops, job_record
from mercli.names import new_id, safe_name
from mercli.notify.enqueue import event_variables, notifications, quarantine, wanted
from mercli.route.studies import HELD_FILE, held_record
from mercli.rules.config import RouteSettings, RuleSet
from mercli.rules.decide import Decision, RuleTimeout, decide
from mercli.spool import (
    DISCARD,
    INCOMING,
    INSTANCE_SUFFIX,
    JOB_FILE,
    OUTGOING,
    PROCESSING,
    SIDECAR_SUFFIX,
    STUDIES,
    Claim,
    Spool,
    Transaction,
    Worker,
    write_json,
)
from mercli.tags import UnreadableDicom, read_tags

ROUTING_EVENTS = frozenset({"received", "routed", "discarded"})  # told by routing

log = logging.getLogger(__name__)

HINT_MAX_AGE = 24 * 3600.0  # hints of series long gone are deleted after this


# Sidecar keys copied into job.json, so resend and status can filter without opening files.
@dataclass(frozen=True)
class SeriesState:
    """What one scan saw of a series batch: when it last grew, when its sender ended."""

    name: str
    arrived: float
    hint: float | None

    @property
    def ended(self) -> float:
        """When the last association that sent this batch ended (or its last instance came)."""
        return self.hint if self.hint is not None and self.hint >= self.arrived else self.arrived

    def ready_at(self, settings: RouteSettings) -> float:
        """The time this batch is complete, unless it grows before then."""
        if self.hint is not None and self.hint >= self.arrived:
            return self.hint + settings.settle
        return self.arrived + settings.series_timeout


@dataclass
class RouteSummary:
    """What routing did, for the command's output and exit code."""

    series: int = 0
    instances: int = 0
    jobs: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # studies/<study>/<batch> held for study rules
    processing: list[str] = field(default_factory=list)  # processing jobs (also in `jobs`)
    errors: list[str] = field(default_factory=list)  # items put in error/ (counted in failed)
    failed: int = 0


def scan(spool: Spool) -> list[SeriesState]:
    """Every unclaimed series batch in incoming/, with its arrival and hint times."""
    states = []
    hints = spool.hints
    with os.scandir(spool.state_dir(INCOMING)) as entries:
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                arrived = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue  # claimed meanwhile
            try:
                hint: float | None = os.stat(hints / entry.name).st_mtime
            except FileNotFoundError:
                hint = None
            states.append(SeriesState(entry.name, arrived, hint))
    return states


def reap_hints(spool: Spool, active: set[str], max_age: float = HINT_MAX_AGE) -> int:
    """Delete hints of series that have no batch waiting and are older than `max_age`."""
    reaped = 0
    cutoff = time.time() - max_age
    with os.scandir(spool.hints) as entries:
        for entry in entries:
            try:
                if entry.name not in active and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    reaped += 1
            except FileNotFoundError:
                continue
    return reaped


class Router:
    """Routes complete series batches of one spool by one rule set."""

    def __init__(self, spool: Spool, worker: Worker, rules: RuleSet) -> None:
        self.spool = spool
        self.worker = worker
        self.rules = rules

    def due(self, now: float | None = None) -> tuple[list[SeriesState], float | None]:
        """Batches complete at `now` (oldest first), and when the next one will be."""
        now = time.time() if now is None else now
        ready: list[tuple[float, SeriesState]] = []
        waiting: list[tuple[float, SeriesState]] = []
        for state in scan(self.spool):
            at = state.ready_at(self.rules.settings)
            (ready if at <= now else waiting).append((at, state))
        ready.sort(key=lambda pair: pair[0])
        next_at = min((at for at, _ in waiting), default=None)
        return [state for _, state in ready], next_at

    def route(self, state: SeriesState, summary: RouteSummary, *, check: bool = True) -> None:
        """Claim one batch and turn it into jobs or a discard; skip it if it grew or is taken."""
        claim = self.worker.claim(INCOMING, state.name)
        if claim is None:
            return  # another router has it
        if check and claim.path.stat().st_mtime > state.arrived:
            claim.release()  # it grew since the scan: not complete after all
            return
        try:
            self._route_claimed(claim, summary, state.ended)
        except BaseException:
            claim.release()
            raise

    def _route_claimed(
        self, claim: Claim, summary: RouteSummary, ended: float | None = None
    ) -> None:
        instances = _read_instances(claim.path)
        try:
            decisions = decide(self.rules, instances, series_label=claim.name) if instances else []
        except RuleTimeout as exc:
            self._quarantine(claim, exc, instances, summary)
            return
        transaction = claim.transaction()
        made: list[tuple[str, str, str, Decision]] = []  # state, item, target, decision
        groups: dict[str, Path] = {}
        for decision in decisions:
            members = set(decision.instances)
            tags = [sidecar for name, sidecar in instances if name in members]
            if decision.study and not decision.discarded:
                held = self._hold(transaction, groups, claim, decision, tags, ended)
                made.append((STUDIES, held, held.partition("/")[0], decision))
            outputs = (
                [(DISCARD, "")]
                if decision.discarded
                else [(OUTGOING, target) for target in decision.targets]
                + [(PROCESSING, rule) for rule in decision.process]
            )
            for state, target_name in outputs:
                item = new_id()
                folder = transaction.new_item(state, item)
                self._fill(folder, claim.path, decision.instances)
                if state == PROCESSING:
                    record = job_record(item, claim.name, tags, [target_name])
                    record = self.rules.processing_job(target_name, record, input_hops(tags) + 1)
                else:
                    record = self._record(item, claim.name, tags, decision, target_name)
                transaction.write_json(folder / JOB_FILE, record)
                made.append((state, item, target_name, decision))
        if self.rules.notify and self._tells(decisions):
            series = claim.name
            transaction.notify_later(lambda: self._notifications(series, instances, decisions))
        transaction.commit()
        # study UID and keyed accession/patient hashes, for `mercli log` (mercli.audit)
        trail = trail_fields(self.spool.root, instances[0][1] if instances else {})
        self._account(claim.name, len(instances), made, summary, trail)

    def _tells(self, decisions: list[Decision]) -> bool:
        """Whether a rule of these decisions wants an event of routing on some channel."""
        for decision in decisions:
            for rule in self.rules.rules_named(decision.rules):
                for subscription in self.rules.subscriptions(rule):
                    if not ROUTING_EVENTS.isdisjoint(subscription.events):
                        return True
        return False

    def _notifications(
        self,
        series: str,
        instances: list[tuple[str, Mapping[str, Any]]],
        decisions: list[Decision],
    ) -> list[dict[str, Any]]:
        """The notifications of this routing, made while its transaction commits
        (`Transaction.notify_later`): `received` once per series and rule, `routed` or
        `discarded` per decision and rule (SPEC §8)."""
        first = instances[0][1] if instances else {}
        told: set[str] = set()
        made: list[dict[str, Any]] = []
        for decision in decisions:
            outputs = [*decision.targets, *(f"process {rule}" for rule in decision.process)]
            outputs += [f"study {rule}" for rule, _ in decision.study]
            event = "discarded" if decision.discarded else "routed"
            for rule in self.rules.rules_named(decision.rules):
                subscriptions = self.rules.subscriptions(rule)
                if not subscriptions:
                    continue
                fields = {
                    "rule": rule.name,
                    "rules": list(decision.rules),
                    "item": series,
                    "target": ", ".join(outputs) if not decision.discarded else "",
                    "instances": len(decision.instances),
                    "error": decision.reason if decision.discarded else "",
                }
                source = {"item": series, "rule": rule.name}
                if rule.name not in told and wanted(subscriptions, "received"):
                    told.add(rule.name)
                    received = event_variables("received", first, **fields)
                    received["instances"] = len(instances)
                    made += notifications(subscriptions, "received", received, source)
                variables = event_variables(event, first, **fields)
                made += notifications(subscriptions, event, variables, source)
        return made

    def _hold(
        self,
        transaction: Transaction,
        groups: dict[str, Path],
        claim: Claim,
        decision: Decision,
        tags: list[Mapping[str, Any]],
        ended: float | None,
    ) -> str:
        """Hard-link the decision's instances into a new batch of its study's group, with
        held.json (`mercli.route.studies`); returns `<study>/<batch>`."""
        study = safe_name(str(tags[0].get("StudyInstanceUID", "")) if tags else "")
        group = groups.get(study)
        if group is None:
            group = groups[study] = transaction.new_item(STUDIES, study)
        batch = new_id()
        os.mkdir(group / batch)
        self._fill(group / batch, claim.path, decision.instances)
        rules = dict(decision.study)
        if ended is None:
            ended = claim.path.stat().st_mtime
        record = held_record(claim.name, ended, rules, decision.instances, tags)
        write_json(group / batch / HELD_FILE, record)
        return f"{study}/{batch}"

    def _record(
        self,
        item: str,
        series: str,
        tags: list[Mapping[str, Any]],
        decision: Decision,
        target_name: str,
    ) -> dict[str, Any]:
        """job.json of a job for `target_name` (with its priority), or of a discard ("")."""
        if not target_name:
            return job_record(item, series, tags, decision.rules, reason=decision.reason)
        record = job_record(
            item,
            series,
            tags,
            decision.rules,
            target=self.rules.targets[target_name].to_json(),
            priority=self.rules.job_priority(target_name, decision.rules),
            offpeak=self.rules.offpeak_window,
        )
        if self.rules.notify:
            notify = self.rules.job_subscriptions(target_name, decision.rules)
            if notify:
                record["notify"] = notify
        return record

    def _quarantine(
        self,
        claim: Claim,
        exc: RuleTimeout,
        instances: list[tuple[str, Mapping[str, Any]]],
        summary: RouteSummary,
    ) -> None:
        """Move the whole batch to error/ with the rule that ran out of time as the reason,
        together with the `failed` notifications of that rule and of its targets: the series
        reached none of them. (Rules evaluated before it are not told: whether they matched
        is unknown once the series stopped being evaluated, and they route nothing of it.)
        Rare, so it may cost more than a plain move: the batch is linked into a transaction
        and synced when anyone is to be told."""
        count = len(instances)
        detail: dict[str, Any] = {"series": claim.name, "rule": exc.rule, "instances": count}
        name = new_id()
        owners: list[Any] = self.rules.rules_named([exc.rule])
        targets = [t for rule in owners for t in rule.targets if t in self.rules.targets]
        owners += [self.rules.targets[t] for t in targets]
        subscriptions = [s for owner in owners for s in self.rules.subscriptions(owner)]
        first = instances[0][1] if instances else {}
        variables = event_variables(
            "failed", first, rule=exc.rule, rules=[exc.rule], item=claim.name,
            target=", ".join(targets), instances=count, error=exc.reason,
        )  # fmt: skip
        source = {"item": claim.name, "rule": exc.rule}
        quarantine(claim, exc.reason, subscriptions, variables, source, name=name,
                   limit=exc.limit, **detail)  # fmt: skip
        summary.failed += 1
        summary.errors.append(name)
        self.spool.log("quarantined", item=name, **detail, reason=exc.reason)
        log.error("series %s: %s; moved to error/%s", claim.name, exc.reason, name)

    def _fill(self, folder: Path, source: Path, members: Sequence[str]) -> None:
        """Hard-link the members' .dcm and .tags; rebuild a sidecar that is missing.

        Links never follow a symlink (os.link's default says it would); a symlink is carried
        as itself, and dispatch refuses a job that holds one.
        """
        for name in members:
            instance = f"{name}{INSTANCE_SUFFIX}"
            os.link(source / instance, folder / instance, follow_symlinks=False)
            sidecar = source / f"{name}{SIDECAR_SUFFIX}"
            if sidecar.is_symlink() or sidecar.exists():
                os.link(sidecar, folder / sidecar.name, follow_symlinks=False)
            else:
                rebuilt = read_tags(source / f"{name}{INSTANCE_SUFFIX}")
                write_json(folder / f"{name}{SIDECAR_SUFFIX}", rebuilt)

    def _account(
        self,
        series: str,
        count: int,
        made: list[tuple[str, str, str, Decision]],
        summary: RouteSummary,
        trail: Mapping[str, str] | None = None,
    ) -> None:
        summary.series += 1
        summary.instances += count
        for state, item, target, decision in made:
            fields: dict[str, Any] = {
                "item": item,
                "series": series,
                "instances": len(decision.instances),
                "rules": list(decision.rules),
                **(trail or {}),
            }
            if state == OUTGOING:
                summary.jobs.append(item)
                self.spool.log("routed", **fields, target=target)
            elif state == PROCESSING:
                summary.jobs.append(item)
                summary.processing.append(item)
                self.spool.log("routed", **{**fields, "rules": [target]}, process=True)
            elif state == STUDIES:
                summary.held.append(item)
                held_for = [rule for rule, _ in decision.study]
                self.spool.log("held", **{**fields, "study": target}, held_for=held_for)
            else:
                summary.discarded.append(item)
                self.spool.log("discarded", **fields, reason=decision.reason)
        targets = sorted({target for state, _, target, _ in made if state == OUTGOING})
        targets += sorted({f"processing by rule {r}" for s, _, r, _ in made if s == PROCESSING})
        discards = sum(state == DISCARD for state, _, _, _ in made)
        log.info(
            "series %s: %d instance(s) -> %s%s",
            series,
            count,
            ", ".join(targets) or ("held for a study" if summary.held else "no target"),
            f", {discards} batch(es) discarded" if discards else "",
        )
        for warning in {w for _, _, _, decision in made for w in decision.warnings}:
            log.warning("%s", warning)
        if not made:
            log.info("series %s held no instances; removed", series)


def _read_instances(folder: Path) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, sidecar) of every instance in a batch; a missing sidecar is rebuilt from the file."""
    found = []
    with os.scandir(folder) as entries:
        names = sorted(
            entry.name[: -len(INSTANCE_SUFFIX)]
            for entry in entries
            if entry.name.endswith(INSTANCE_SUFFIX)
        )
    for name in names:
        try:
            sidecar = json.loads((folder / f"{name}{SIDECAR_SUFFIX}").read_bytes())
        except (FileNotFoundError, ValueError):
            try:
                sidecar = read_tags(folder / f"{name}{INSTANCE_SUFFIX}")
            except UnreadableDicom:
                sidecar = {}
        found.append((name, sidecar))
    return found
