"""Completing studies: held series in `studies/<study>/` become study jobs (SPEC §4.1).

When and how is described in `mercli.route.studies`; this module claims a study group and
makes its outputs in one transaction: study jobs for the targets of the study rules done,
a processing study job (SPEC §7) for each of them with `process`, discards.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mercli.audit.keys import trail_fields
from mercli.jobs import input_hops, study_record
from mercli.names import new_id
from mercli.route.studies import HELD_FILE, HeldCache, HeldSeries, Study, held_record, study_rule
from mercli.rules.config import RuleSet
from mercli.spool import (
    DISCARD,
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

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """What completing one study made."""

    jobs: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)


def due_studies(
    studies: Sequence[Study], ruleset: RuleSet, now: float
) -> tuple[list[Study], float | None]:
    """Studies with a rule complete at `now`, and when the next rule of any will be."""
    ready, next_at = [], None
    for study in studies:
        times = [study.ready_at(rule, ruleset) for rule in study.rules()]
        if any(at <= now for at in times):
            ready.append(study)
        later = [at for at in times if at > now]
        if later:
            next_at = min(later) if next_at is None else min(next_at, *later)
    return ready, next_at


class Completer:
    """Completes study groups of one spool by one rule set."""

    def __init__(self, spool: Spool, worker: Worker, rules: RuleSet, cache: HeldCache) -> None:
        self.spool = spool
        self.worker = worker
        self.rules = rules
        self.cache = cache

    def complete(self, name: str, now: float | None = None, *, force: bool = False) -> Completion:
        """Claim `studies/<name>` and complete what is due (everything, if `force`)."""
        done = Completion()
        claim = self.worker.claim(STUDIES, name)
        if claim is None:
            return done  # another router has it, or it is gone
        try:
            self._complete_claimed(claim, time.time() if now is None else now, force, done)
        except BaseException:
            claim.release()
            raise
        return done

    def _complete_claimed(self, claim: Claim, now: float, force: bool, done: Completion) -> None:
        study = self.cache.study(claim.path)
        finished = [r for r in study.rules() if force or study.ready_at(r, self.rules) <= now]
        if not finished:
            claim.release()  # a series came meanwhile: not complete after all
            return
        transaction = claim.transaction()
        made: list[tuple[str, str, str, list[str]]] = []  # state, item, target or reason, rules
        proceed: dict[str, list[str]] = {}  # target -> rules
        for name in finished:
            rule = study_rule(self.rules, name)
            missing = [] if rule is None else study.missing(rule)
            if rule is None or (missing and rule.on_timeout == "discard"):
                reason = (
                    f'study rule "{name}" is no longer in the rules'
                    if rule is None
                    else "study incomplete: missing " + ", ".join(missing)
                )
                held = study.holding(name)
                item, folder = self._output(transaction, claim, DISCARD, held)
                write_json(folder / JOB_FILE, self._record(item, held, [name], reason))
                made.append((DISCARD, item, reason, [name]))
                continue
            if rule.process:
                held = study.holding(name)
                item, folder = self._output(transaction, claim, PROCESSING, held)
                record = self._record(item, held, [name])
                record.pop("reason", None)
                hops = input_hops(batch.keys for batch in held) + 1
                write_json(folder / JOB_FILE, self.rules.processing_job(name, record, hops))
                made.append((PROCESSING, item, name, [name]))
                continue
            for target in rule.targets:
                proceed.setdefault(target, []).append(name)
        for target, names in proceed.items():
            held = _union(study, names)
            item, folder = self._output(transaction, claim, OUTGOING, held)
            write_json(folder / JOB_FILE, self._record(item, held, names, target=target))
            made.append((OUTGOING, item, target, names))
        self._hold_again(transaction, claim, study, set(finished))
        transaction.commit()
        # keyed accession/patient hashes for `mercli log` (mercli.audit); `study` is the name
        trail = trail_fields(self.spool.root, study.held[0].keys if study.held else {})
        trail.pop("study", None)
        self._account(claim.name, made, done, trail)

    def _output(
        self,
        transaction: Transaction,
        claim: Claim,
        state: str,
        held: Sequence[HeldSeries],
    ) -> tuple[str, Path]:
        """A new item of `state` with each series' instances in a sub-folder (hard links)."""
        item = new_id()
        folder = transaction.new_item(state, item)
        for series, batches in _by_series(held).items():
            sub = folder / series
            os.mkdir(sub)
            linked: set[str] = set()
            for batch in reversed(batches):  # a later batch's copy of an instance wins
                for name in batch.instances:
                    if name not in linked:
                        linked.add(name)
                        _link_instance(claim.path / batch.batch, sub, name)
        return item, folder

    def _record(
        self,
        item: str,
        held: Sequence[HeldSeries],
        rules: Sequence[str],
        reason: str = "",
        *,
        target: str = "",
    ) -> dict[str, Any]:
        series = [
            {
                "series": name,
                "SeriesInstanceUID": batches[0].keys.get("SeriesInstanceUID", ""),
                "instances": sorted({n for batch in batches for n in batch.instances}),
            }
            for name, batches in _by_series(held).items()
        ]
        keys: dict[str, Any] = dict(held[0].keys) if held else {}
        firsts = [str(b.keys["first_received"]) for b in held if b.keys.get("first_received")]
        lasts = [str(b.keys["last_received"]) for b in held if b.keys.get("last_received")]
        keys["first_received"] = min(firsts, default=None)
        keys["last_received"] = max(lasts, default=None)
        if not target:
            return study_record(item, series, keys, rules, reason=reason)
        return study_record(
            item,
            series,
            keys,
            rules,
            target=self.rules.targets[target].to_json(),
            priority=self.rules.job_priority(target, rules),
            offpeak=self.rules.offpeak_window,
        )

    def _hold_again(
        self, transaction: Transaction, claim: Claim, study: Study, finished: set[str]
    ) -> None:
        """Put back, with only their other rules, the batches still held for rules not done;
        and any batch whose held.json could not be read, unchanged."""
        known = {batch.batch: batch for batch in study.held}
        group: Path | None = None
        for entry in sorted(os.listdir(claim.path)):
            batch = known.get(entry)
            rules = {} if batch is None else {r: m for r, m in batch.rules.items()}
            if batch is not None:
                rules = {r: m for r, m in rules.items() if r not in finished}
                if not rules:
                    continue
            if group is None:
                group = transaction.new_item(STUDIES, claim.name)
            folder = group / entry
            os.mkdir(folder)
            source = claim.path / entry
            for name in os.listdir(source):
                if batch is None or name != HELD_FILE:
                    os.link(source / name, folder / name, follow_symlinks=False)
            if batch is not None:
                record = held_record(batch.series, batch.arrived, rules, batch.instances, [])
                write_json(folder / HELD_FILE, {**record, "keys": dict(batch.keys)})

    def _account(
        self,
        study: str,
        made: list[tuple[str, str, str, list[str]]],
        done: Completion,
        trail: Mapping[str, str],
    ) -> None:
        for state, item, what, rules in made:
            fields = {"item": item, "study": study, "rules": rules, **trail}
            if state == OUTGOING:
                done.jobs.append(item)
                self.spool.log("routed", **fields, target=what)
            elif state == PROCESSING:
                done.jobs.append(item)
                self.spool.log("routed", **fields, process=True)
            else:
                done.discarded.append(item)
                self.spool.log("discarded", **fields, reason=what)
        log.info(
            "study %s complete: %d study job(s), %d discarded",
            study,
            len(done.jobs),
            len(done.discarded),
        )


def _union(study: Study, rules: Sequence[str]) -> list[HeldSeries]:
    """The batches held for any of `rules`, in arrival order, each once."""
    found = {batch.batch: batch for rule in rules for batch in study.holding(rule)}
    return sorted(found.values(), key=lambda batch: batch.order)


def _by_series(held: Sequence[HeldSeries]) -> dict[str, list[HeldSeries]]:
    """Batches grouped by series, series in the arrival order of their first batch."""
    groups: dict[str, list[HeldSeries]] = {}
    for batch in sorted(held, key=lambda b: b.order):
        groups.setdefault(batch.series, []).append(batch)
    return groups


def _link_instance(source: Path, destination: Path, name: str) -> None:
    for suffix in (INSTANCE_SUFFIX, SIDECAR_SUFFIX):
        path = source / f"{name}{suffix}"
        if suffix == INSTANCE_SUFFIX or path.is_symlink() or path.exists():
            os.link(path, destination / path.name, follow_symlinks=False)
