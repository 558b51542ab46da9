"""A small TOML writer for the subset `import-mercure` emits (the stdlib only reads TOML).

Values: strings, booleans, integers, finite floats, arrays and inline tables of those.
Strings are single-line: a literal string ('...') when that needs no escaping and reads
better (expressions full of double quotes), else a basic string with every control
character escaped. Keys are bare when they can be, else quoted. A document is a list of
`Block`s (comment lines, an optional header, key/value pairs); a block can be written
commented out, line by line, as disabled mercure rules are.

Every document written is parsed back with tomllib by the caller: this module only has to be
correct for what it is given, and refuses (TypeError/ValueError) what TOML cannot say.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Block", "comment_text", "dumps_value", "key", "render"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _basic(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _string(text: str) -> str:
    plain = all(ord(c) >= 0x20 and ord(c) != 0x7F for c in text)
    if plain and '"' in text and "'" not in text:
        return "'" + text + "'"
    return _basic(text)


def key(name: str) -> str:
    """A key as TOML wants it: bare when possible, else a quoted basic string."""
    return name if _BARE_KEY.fullmatch(name) else _basic(name)


def dumps_value(value: Any) -> str:
    """One value in TOML syntax (inline: arrays and tables on one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("TOML floats here must be finite")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{key(str(k))} = {dumps_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(dumps_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def comment_text(text: str) -> str:
    """Free text made safe for one `#` comment line (no line breaks, no control characters,
    no triple quotes that a line scanner could take for a multi-line string)."""
    flat = " ".join(text.split())
    flat = "".join(c for c in flat if c.isprintable())
    return flat.replace('"""', '" " "').replace("'''", "' ' '")


@dataclass
class Block:
    """A header (`[targets.x]`, `[[rules]]`, or "" for top-level keys) with its comments and
    pairs. `origin` names what it came from, to map a loader error back to an item."""

    header: str = ""
    pairs: list[tuple[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    disabled: bool = False
    origin: tuple[str, str] = ("", "")

    def add(self, name: str, value: Any) -> None:
        if value is not None:
            self.pairs.append((name, value))

    def lines(self) -> list[str]:
        body = [f"# {comment_text(c)}".rstrip() for c in self.comments]
        own = [self.header] if self.header else []
        own += [f"{key(k)} = {dumps_value(v)}" for k, v in self.pairs]
        if self.disabled:
            own = ["# " + line for line in own]
        return body + own


def render(blocks: Sequence[Block]) -> tuple[str, list[tuple[int, int, Block]]]:
    """The document text and, per block, its first and last line (1-based)."""
    lines: list[str] = []
    spans = []
    for block in blocks:
        if lines:
            lines.append("")
        first = len(lines) + 1
        lines += block.lines()
        spans.append((first, len(lines), block))
    return "\n".join(lines) + "\n", spans
