"""A benchmark row: what was measured, its rate, and its ratio to the peer in the same run."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Row:
    suite: str
    case: str
    subject: str
    rate: float  # items per second
    unit: str = "img/s"
    baseline: str | None = None
    ratio: float | None = None  # rate / baseline rate
    target: str | None = None  # e.g. ">= 2.0x"
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def with_ratios(rows: list[Row], baseline_subject: str, target: str | None = None) -> list[Row]:
    """Fill ratio against the row of `baseline_subject` in the same suite and case."""
    base = {(r.suite, r.case): r.rate for r in rows if r.subject == baseline_subject}
    for row in rows:
        if row.subject != baseline_subject and (row.suite, row.case) in base:
            row.baseline = baseline_subject
            row.ratio = row.rate / base[(row.suite, row.case)]
            row.target = row.target or target
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"{'suite':<10} {'case':<22} {'subject':<34} {'rate':>12}  {'ratio':>16}  target"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r.ratio:.2f}x {r.baseline}" if r.ratio is not None else ""
        print(
            f"{r.suite:<10} {r.case:<22} {r.subject:<34} {_number(r.rate):>8} {r.unit:<5}"
            f" {ratio:>16}  {r.target or ''}  {r.note}"
        )
    sys.stdout.flush()


def _number(value: float) -> str:
    """Rates as integers; small values (seconds) with two decimals."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"
