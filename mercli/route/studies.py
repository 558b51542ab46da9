"""Study-level rules (SPEC §4.1): series held in `studies/<study>/` until the study is complete.

**Holding.** A series batch that matches a study rule (`trigger = "study"`) is hard-linked, in
the transaction that routes it, into a new sub-folder `studies/<study>/<batch>/` of its
study's group, with `held.json` (`held_record`): the series, when its sender's association
ended (`arrived`), the study rules it matched with the `require` expressions it met, its
instance names, the JOB_KEYS and first/last ReceivedAt. `<study>` is the safe name of the
StudyInstanceUID. The group grows like `incoming/<series>/` (protocol step 2): a batch is
merged into it under a shared lock, a completion claims the whole group with one rename under
an exclusive lock, and a series held after that starts a new group: a follow-up study.

**Completion**, per study and study rule (the rules listed by its held series):
- every `require` of the rule is met by at least one of them, and `study_settle` has passed
  since the last of them arrived; or
- `study_timeout` has passed since the last of them arrived (a rule without `require`
  completes only so), or the completion is forced (`mercli route --complete-study UID`).

**Completing** claims the group and, in one transaction, makes one study job per target of
the rules complete now (`mercli.jobs.study_record`; each series in a sub-folder, in arrival
order, that of their first instances' ReceivedAt, `HeldSeries.order`; a target named by
several of those rules gets each series once), or, for a rule with
`on_timeout = "discard"` whose `require` is not met, a `discard/` item with the reason
`study incomplete: missing <expr>`; the batches still held for rules not complete yet go back
into the group with only those rules. Killed at any point, the transaction is rolled back
(the group is completed again later) or forward (once), never half.

**Cost of a pass:** one listing of studies/, one per study; each held.json is read once per
process (cached: it never changes once published), never an instance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.jobs import HOPS_KEY, JOB_KEYS, input_hops
from mercli.rules.config import Rule, RuleSet
from mercli.spool import STUDIES, Spool, read_regular

HELD_FILE = "held.json"


@dataclass(frozen=True)
class HeldSeries:
    """One held batch of a study group, as its held.json says."""

    batch: str
    series: str
    arrived: float
    rules: Mapping[str, tuple[str, ...]]  # study rule -> the `require` texts it met
    instances: tuple[str, ...]
    keys: Mapping[str, Any]

    @classmethod
    def load(cls, folder: Path) -> HeldSeries:
        """Raises OSError, ValueError, KeyError or TypeError for a bad held.json."""
        record = json.loads(read_regular(folder / HELD_FILE))
        return cls(
            batch=folder.name,
            series=str(record["series"]),
            arrived=float(record["arrived"]),
            rules={str(k): tuple(map(str, v)) for k, v in dict(record["rules"]).items()},
            instances=tuple(map(str, record["instances"])),
            keys=dict(record.get("keys", {})),
        )

    @property
    def order(self) -> tuple[str, float, str]:
        """Sort key of arrival order: when its first instance was received (ReceivedAt, an
        ISO time), else when its sender ended; then the batch id.

        Not the sender's end first: one association's hints are written one after another
        in series-UID order, and several associations' hints can share an mtime (the file
        clock ticks every few ms, and receive may publish a backlog in one go), so neither
        says which series came first.
        """
        received = self.keys.get("first_received")
        if not isinstance(received, str) or not received:
            received = datetime.fromtimestamp(self.arrived, UTC).isoformat(timespec="milliseconds")
        return (received, self.arrived, self.batch)


def held_record(
    series: str,
    arrived: float,
    rules: Mapping[str, Sequence[str]],
    names: Sequence[str],
    sidecars: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """held.json of a held batch (see the module docstring)."""
    received = sorted(str(s["ReceivedAt"]) for s in sidecars if s.get("ReceivedAt"))
    first = sidecars[0] if sidecars else {}
    keys: dict[str, Any] = {key: first[key] for key in JOB_KEYS if key in first}
    keys["first_received"] = received[0] if received else None
    keys["last_received"] = received[-1] if received else None
    if hops := input_hops(sidecars):
        keys[HOPS_KEY] = hops  # processing output held for a study (SPEC §7 loop guard)
    return {
        "series": series,
        "arrived": arrived,
        "rules": {name: list(met) for name, met in rules.items()},
        "instances": list(names),
        "keys": keys,
    }


@dataclass
class Study:
    """One study group as a scan saw it: its held batches (unreadable ones left out)."""

    name: str
    held: list[HeldSeries] = field(default_factory=list)

    def rules(self) -> list[str]:
        return list(dict.fromkeys(rule for batch in self.held for rule in batch.rules))

    def holding(self, rule: str) -> list[HeldSeries]:
        """The batches held for `rule`, in arrival order."""
        found = [batch for batch in self.held if rule in batch.rules]
        return sorted(found, key=lambda batch: batch.order)

    def missing(self, rule: Rule) -> list[str]:
        """The `require` texts of `rule` no held batch met."""
        met = {text for batch in self.held for text in batch.rules.get(rule.name, ())}
        return [need.text for need in rule.require if need.text not in met]

    def ready_at(self, name: str, ruleset: RuleSet) -> float:
        """When the study is complete for one of its rules (unless a series comes first)."""
        last = max(batch.arrived for batch in self.holding(name))
        settings = ruleset.settings
        rule = study_rule(ruleset, name)
        if rule is not None and rule.require and not self.missing(rule):
            return min(last + settings.study_settle, last + settings.study_timeout)
        return last + settings.study_timeout


def study_rule(ruleset: RuleSet, name: str) -> Rule | None:
    """The study rule of that name, or None when the rules no longer have it."""
    return next((r for r in ruleset.rules if r.name == name and r.study), None)


class HeldCache:
    """held.json files read so far, by path: each is read once, since it never changes."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], HeldSeries | None] = {}

    def load(self, folder: Path) -> HeldSeries | None:
        try:
            key = (str(folder), os.stat(folder / HELD_FILE, follow_symlinks=False).st_ino)
        except OSError:
            return None  # being merged or claimed meanwhile
        if key not in self._held:
            if len(self._held) > 100_000:
                self._held.clear()
            try:
                self._held[key] = HeldSeries.load(folder)
            except (OSError, ValueError, KeyError, TypeError):
                self._held[key] = None
        return self._held[key]

    def study(self, folder: Path) -> Study:
        """The held batches of one group (or of a claimed group's item folder)."""
        study = Study(folder.name)
        try:
            with os.scandir(folder) as entries:
                batches = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return study
        for batch in batches:
            held = self.load(folder / batch)
            if held is not None:
                study.held.append(held)
        return study


def scan_studies(spool: Spool, cache: HeldCache) -> list[Study]:
    """Every unclaimed study group with its held batches."""
    return [cache.study(item.path) for item in spool.items(STUDIES)]
