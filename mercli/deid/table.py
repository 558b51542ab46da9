"""PS3.15 Table E.1-1 as data (`table_e1_1.json`, made by `tools/make_deid_table.py`) and the
resolution of one attribute's action for a profile's options.

Resolution, per attribute listed in the table:
1. The basic profile's code. Where the table gives a choice by the IOD's attribute type, mercli
   picks the choice that removes the original value and keeps every type valid without knowing
   the IOD: X/Z -> Z, X/D -> D, Z/D -> D, X/Z/D -> D, X/Z/U* -> U (a sequence: its contents
   are de-identified, UIDs replaced). D on a sequence is Z (an empty sequence): a dummy item
   cannot be made up generically.
2. An enabled option with a code in its column overrides it; several options with codes for
   one attribute: the most protective wins (X, then C, then K).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

CHOICES = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
OPTION_PRIORITY = ("X", "C", "K")  # most protective first
DATE_OPTIONS = ("retain-longitudinal-full-dates", "retain-longitudinal-modified-dates")


@dataclass(frozen=True)
class Action:
    """What to do with one attribute: `code` one of X Z D K C U; `option` the option that set
    it (None: the basic profile), which says what C (clean) means."""

    code: str
    option: str | None = None
    basic: str = ""  # the table's basic code as written ("X/Z/D"), for sequences


@dataclass(frozen=True)
class Row:
    tag: str  # 8 hex digits, "X" for a repeating group's digits; "PRIVATE" for odd groups
    name: str
    basic: str
    options: dict[str, str]


@cache
def rows() -> tuple[Row, ...]:
    """Every row of the generated table."""
    text = resources.files(__package__).joinpath("table_e1_1.json").read_text(encoding="utf-8")
    return tuple(
        Row(r["tag"], r["name"], r["basic"], dict(r["options"]))
        for r in json.loads(text)["attributes"]
    )


def resolve(row: Row, options: tuple[str, ...]) -> Action:
    """The action for `row` under `options` (see the module's docstring)."""
    chosen = [(row.options[o], o) for o in options if o in row.options]
    for code in OPTION_PRIORITY:
        for found, option in chosen:
            if found == code:
                return Action(code, option)
    return Action(CHOICES.get(row.basic, row.basic), basic=row.basic)


@cache
def actions(options: tuple[str, ...]) -> tuple[dict[int, Action], dict[tuple[int, int], Action]]:
    """(exact tag -> action, (group high byte, element) -> action for 50xx/60xx groups), for
    every row except private attributes (which mercli handles by creator name)."""
    exact: dict[int, Action] = {}
    repeating: dict[tuple[int, int], Action] = {}
    for row in rows():
        if row.tag == "PRIVATE":
            continue
        action = resolve(row, options)
        if "X" in row.tag:
            high = int(row.tag[:2], 16)
            element = -1 if row.tag[4:] == "XXXX" else int(row.tag[4:], 16)
            repeating[(high, element)] = action
        else:
            exact[int(row.tag, 16)] = action
    return exact, repeating


def lookup(tag: int, options: tuple[str, ...]) -> Action | None:
    """The action for an attribute of a public group, None if the table does not list it."""
    exact, repeating = actions(options)
    found = exact.get(tag)
    if found is not None:
        return found
    group, element = tag >> 16, tag & 0xFFFF
    if group & 0xFF01 in (0x5000, 0x6000) and group & 0xFF <= 0x1E:
        return repeating.get((group >> 8, element)) or repeating.get((group >> 8, -1))
    return None
