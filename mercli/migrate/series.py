"""mercure's received-series condition (`study_trigger_series`) as mercli `require` lists.

mercure's syntax: quoted, case-insensitive substrings of SeriesDescription joined by `and`,
`or` and parentheses, e.g. `'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')`. An entry is met
when some received series' description contains it; the formula over the entries decides.

mercli's `require` is a list of expressions that must each be met by at least one held
series. "Some series meets A or B" is the same as "some series meets A, or some meets B", so
a formula in conjunctive normal form maps exactly: each clause (an `or` of entries) becomes
one `require` expression, and the clauses are and-ed by the list. Any and/or formula has
such a form (distribution); there is no `not` in mercure's syntax.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["SeriesSyntaxError", "require_expressions"]

_TOKEN = re.compile(r"\s*(?:'([^']*)'|(\()|(\))|(and|or)\b)", re.IGNORECASE)
_MAX_CLAUSES = 64  # distribution can grow a formula; mercure's are a handful of names


class SeriesSyntaxError(ValueError):
    """The condition is not mercure's received-series syntax."""


@dataclass(frozen=True)
class _Node:
    op: str  # "entry", "and", "or"
    entry: str = ""
    parts: tuple[_Node, ...] = ()


def _tokens(text: str) -> list[tuple[str, str]]:
    found, pos = [], 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise SeriesSyntaxError(f"unexpected text at {text[pos:].strip()[:20]!r}")
        entry, opening, closing, word = match.groups()
        if entry is not None:
            found.append(("entry", entry.lower()))
        else:
            found.append((word.lower() if word else opening or closing, ""))
        pos = match.end()
    return found


class _Parser:
    """or-expression := and-expression ("or" and-expression)*; and := atom ("and" atom)*."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else ""

    def parse(self) -> _Node:
        node = self.either()
        if self.pos != len(self.tokens):
            raise SeriesSyntaxError(f"unexpected {self.peek()!r}")
        return node

    def either(self) -> _Node:
        parts = [self.both()]
        while self.peek() == "or":
            self.pos += 1
            parts.append(self.both())
        return parts[0] if len(parts) == 1 else _Node("or", parts=tuple(parts))

    def both(self) -> _Node:
        parts = [self.atom()]
        while self.peek() == "and":
            self.pos += 1
            parts.append(self.atom())
        return parts[0] if len(parts) == 1 else _Node("and", parts=tuple(parts))

    def atom(self) -> _Node:
        kind = self.peek()
        if kind == "entry":
            self.pos += 1
            return _Node("entry", entry=self.tokens[self.pos - 1][1])
        if kind == "(":
            self.pos += 1
            node = self.either()
            if self.peek() != ")":
                raise SeriesSyntaxError("missing ')'")
            self.pos += 1
            return node
        raise SeriesSyntaxError(f"expected a quoted series name, got {kind or 'the end'!r}")


def _cnf(node: _Node) -> list[list[str]]:
    """Clauses (each a list of entries, or-ed), and-ed together."""
    if node.op == "entry":
        return [[node.entry]]
    if node.op == "and":
        return [clause for part in node.parts for clause in _cnf(part)]
    clauses: list[list[str]] = [[]]
    for part in node.parts:
        clauses = [left + right for left in clauses for right in _cnf(part)]
        if len(clauses) > _MAX_CLAUSES:
            raise SeriesSyntaxError("too many combinations: simplify the condition")
    return clauses


def require_expressions(condition: str) -> list[str]:
    """mercli `require` expressions equivalent to a mercure received-series condition."""
    tokens = _tokens(condition)
    if not tokens:
        raise SeriesSyntaxError("the condition is empty")
    result: list[str] = []
    for clause in _cnf(_Parser(tokens).parse()):
        entries = list(dict.fromkeys(clause))
        tests = [
            f"{json.dumps(entry, ensure_ascii=False)} in SeriesDescription.lower()"
            for entry in entries
        ]
        text = " or ".join(tests)
        if text not in result:
            result.append(text)
    return result
