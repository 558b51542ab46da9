"""What the converters share: names, keyword spelling, and the state of one conversion."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mercli.migrate.report import Report
from mercli.migrate.targets import Secrets
from mercli.migrate.toml_out import Block

__all__ = ["PROCESSED", "State", "fix_keyword_case", "slug"]

PROCESSED = "mercure-processed"  # folder target for the output of "processing only" rules
_RECEIVE_NAMES = ("SenderAET", "SenderAddress", "ReceiverAET", "ReceivedAt")


@dataclass
class State:
    """One conversion in progress: the input, what was made of it so far, the report."""

    config: Mapping[str, Any]
    excluded: dict[tuple[str, str], str]
    report: Report = field(default_factory=Report)
    secrets: Secrets = field(default_factory=Secrets)
    target_names: dict[str, str] = field(default_factory=dict)  # mercure name -> mercli name
    dummies: set[str] = field(default_factory=set)
    lost_targets: set[str] = field(default_factory=set)
    module_names: dict[str, str] = field(default_factory=dict)
    module_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    taken: dict[str, set[str]] = field(
        default_factory=lambda: {"targets": set(), "modules": set(), "notify": set()}
    )
    blocks: dict[str, list[Block]] = field(
        default_factory=lambda: {"targets": [], "modules": [], "notify": [], "rules": []}
    )
    offpeak: str | None = None
    processed_needed: bool = False
    fallback: str | None = None  # the one mercure fallback rule that can apply


def slug(name: str, taken: set[str]) -> str:
    """A mercli target/module/channel name for a mercure name, unique among `taken`."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-_.")[:56] or "item"
    candidate, number = text, 2
    while candidate in taken:
        candidate, number = f"{text}-{number}", number + 1
    taken.add(candidate)
    return candidate


def _keywords() -> dict[str, str]:
    from pydicom.datadict import keyword_dict

    known = {name.lower(): name for name in keyword_dict}
    known |= {name.lower(): name for name in _RECEIVE_NAMES}
    return known


def fix_keyword_case(text: str) -> tuple[str, list[str]]:
    """mercure reads `tags.modality` as Modality (its lookup ignores case); mercli wants the
    keyword as the dictionary spells it. Returns the text and the names it corrected."""
    known = _keywords()
    fixed: list[str] = []

    def repair(match: re.Match[str]) -> str:
        name = match.group(2) or match.group(3)
        right = known.get(name.lower())
        if right is None or right == name:
            return match.group(0)
        fixed.append(f"{name} -> {right}")
        return f"tags.{right}" if match.group(2) else f"@{right}@"

    pattern = r"(?<![\w.])(tags\.([A-Za-z_]\w*)|@([A-Za-z_]\w*)@)"
    return re.sub(pattern, repair, text), fixed
