"""Line numbers and typed, located access to the tables of a parsed TOML file.

tomllib returns plain dicts with no positions, but an admin needs `rules.toml:12:` to find a
mistake. `Lines` scans the raw text once for table headers and `key =` lines (skipping
multi-line strings) so that an error can point at the offending key, or at least at the
header of its table. `Table` wraps one parsed table with its header line and a context
(`rule "ct-to-pacs"`), and its getters check types and raise `ConfigError` at that line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from mercli.durations import parse_duration
from mercli.errors import ConfigError

__all__ = ["Lines", "Table"]

_HEADER = re.compile(r"\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?")
_KEY = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*[=.]""")
_AE_CHARS = re.compile(r"[\x20-\x5b\x5d-\x7e]+")  # printable ASCII without backslash


class Lines:
    """Where tables and keys are in the raw text (1-based line numbers)."""

    def __init__(self, label: str, text: str) -> None:
        self.label = label
        self.headers: list[tuple[int, bool, str]] = []  # (line, is [[array]], dotted name)
        self.keys: list[tuple[int, int, str]] = []  # (line, header line or 0, key)
        self._scan(text)

    def _scan(self, text: str) -> None:
        block, in_string = 0, ""
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string:
                if in_string in line:
                    in_string = ""
                continue
            header = _HEADER.fullmatch(line)
            key = _KEY.match(line)
            if header:
                name = ".".join(part.strip().strip("\"'") for part in header.group(2).split("."))
                self.headers.append((number, header.group(1) == "[[", name))
                block = number
            elif key:
                self.keys.append((number, block, next(g for g in key.groups() if g is not None)))
            for delimiter in ('"""', "'''"):
                if line.count(delimiter) % 2:
                    in_string = delimiter

    def table(self, dotted: str) -> int | None:
        """The line of `[dotted]`, or of `name = {...}` inside its parent table."""
        for number, is_array, name in self.headers:
            if name == dotted and not is_array:
                return number
        parent, _, last = dotted.rpartition(".")
        parent_line = self.table(parent) if parent else 0
        return None if parent_line is None else self.key(parent_line, last)

    def rule(self, index: int) -> int | None:
        """The line of the header of the index-th (0-based) `[[rules]]`."""
        arrays = [number for number, is_array, name in self.headers if is_array and name == "rules"]
        return arrays[index] if index < len(arrays) else None

    def key(self, block: int | None, key: str) -> int | None:
        """The line of `key = ...` in the table whose header is at `block` (0: top level)."""
        if block is None:
            return None
        for number, owner, name in self.keys:
            if owner == block and name == key:
                return number
        return None

    def error(self, line: int | None, context: str, message: str) -> ConfigError:
        """`file:line: context: message`, leaving out what is unknown."""
        where = f"{self.label}:{line}" if line else self.label
        return ConfigError(f"{where}: {context}: {message}" if context else f"{where}: {message}")


class Table:
    """One parsed TOML table, with where it is and what to call it in messages."""

    def __init__(self, raw: Any, lines: Lines, line: int | None, context: str) -> None:
        self.raw: dict[str, Any] = raw
        self.lines = lines
        self.line = line
        self.context = context

    def fail(self, key: str | None, message: str) -> ConfigError:
        """A ConfigError at `key`'s line if it can be found, else at the table's header."""
        line = self.lines.key(self.line if self.line is not None else 0, key) if key else None
        return self.lines.error(line or self.line, self.context, message)

    def check_keys(self, allowed: Sequence[str]) -> None:
        """Unknown keys are errors: a typo must not silently become a default."""
        for key in self.raw:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise self.fail(key, f'unknown key "{key}" ({hint}allowed: {", ".join(allowed)})')

    def table(self, key: str, line: int | None) -> Table:
        """A sub-table (empty when missing), located at `line`."""
        raw = self.raw.get(key, {})
        context = f"[{key}]" if not self.context else self.context
        if not isinstance(raw, dict):
            raise self.fail(key, f'"{key}" must be a table ([{key}] or {key} = {{...}})')
        return Table(raw, self.lines, line, context)

    def _get(self, key: str, kind: type | tuple[type, ...], what: str, required: bool) -> Any:
        if key not in self.raw:
            if required:
                raise self.fail(None, f'missing key "{key}"')
            return None
        value = self.raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(key, f'"{key}" must be {what}, not {_toml_type(value)}')
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        """A string value; None when absent and not required."""
        value: str | None = self._get(key, str, "a string", required)
        return value

    def boolean(self, key: str) -> bool:
        """true/false; false when absent."""
        return bool(self._get(key, bool, "true or false", False))

    def string_list(self, key: str) -> list[str]:
        """A list of strings; a single string counts as a list of one."""
        value = self._get(key, (list, str), "a list of strings", False)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(item, str) for item in items):
            raise self.fail(key, f'"{key}" must be a list of strings')
        return list(items)

    def integer(self, key: str, low: int, high: int, *, required: bool = False) -> int | None:
        """An integer in [low, high]."""
        value: int | None = self._get(key, int, "an integer", required)
        if value is not None and not low <= value <= high:
            raise self.fail(key, f'"{key}" must be between {low} and {high}, not {value}')
        return value

    def number(self, key: str, *, minimum: float) -> float | None:
        """A number (int or float) of at least `minimum`."""
        value = self._get(key, (int, float), "a number", False)
        if value is not None and not value >= minimum:
            raise self.fail(key, f'"{key}" must be at least {minimum:g}, not {value}')
        return None if value is None else float(value)

    def duration(self, key: str, *, positive: bool = False) -> float:
        """`90s`, `15m`, `2h`, `3d` or plain seconds; the key must be present."""
        value = self._get(key, (str, int, float), "a duration such as 90s or 15m", True)
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise self.fail(key, f'"{key}": {exc}') from None
        if positive and seconds <= 0:
            raise self.fail(key, f'"{key}" must be more than 0')
        return seconds

    def ae_title(self, key: str, *, required: bool = False) -> str | None:
        """An AE title: 1 to 16 printable ASCII characters, no backslash, not all spaces."""
        value = self.string(key, required=required)
        if value is not None and not (
            value.strip() and len(value) <= 16 and _AE_CHARS.fullmatch(value)
        ):
            raise self.fail(
                key,
                f'"{key}" must be an AE title: 1 to 16 printable ASCII characters without'
                f" backslash, not {value!r}",
            )
        return value


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)
