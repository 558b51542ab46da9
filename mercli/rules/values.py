"""What the operators of the `when` language do with sidecar values (SPEC §4).

Sidecar values are strings, ints, floats and lists of those (multi-valued elements); a rule
also sees literals (None, bools, tuples). The functions here give every operator one meaning
an admin can predict, whatever mix of those types meets it, and raise `EvalError` (never a
bare TypeError) when there is none. Keeping them apart from the compiler keeps both short.

`re()` is the one operator whose cost can grow faster than its input: a backtracking pattern
such as `(a|aa)+$` takes exponential time on a value like 40 a's and a "!". Patterns are
written by the admin (the compiler takes only string literals) but run on values from the
network, so they are matched by the `regex` engine, which accepts what `re` accepts and can
be stopped: `search` is given the series' deadline and raises `EvalTimeout` when it passes.
"""

from __future__ import annotations

import ast
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import regex

__all__ = [
    "CONVERTERS",
    "EvalError",
    "EvalTimeout",
    "as_text",
    "call_method",
    "compile_pattern",
    "contains",
    "equal",
    "order",
    "search",
]

Value = Any

# Braces holding e, i, d or s that `re` reads as text but `regex` as a fuzzy-match constraint
# (`a{e<=1}`); an even run of backslashes before the brace leaves it unescaped.
_FUZZY_BRACES = re.compile(r"(?<!\\)(?:\\\\)*(\{[^}]*[eids][^}]*\})")


class EvalError(Exception):
    """Evaluating an expression on one sidecar failed; the rule is false for that series."""


class EvalTimeout(Exception):
    """Evaluating an expression ran past its deadline; never an EvalError, never an OSError."""


def as_text(value: Value) -> str:
    """A value's text: lists backslash-joined, numbers as written, None as ""."""
    if type(value) is str:
        return value
    if isinstance(value, list | tuple):
        return "\\".join(as_text(item) for item in value)
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def _is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _pair(left: Value, right: Value) -> tuple[Value, Value]:
    """Bring both sides of a comparison to comparable forms (see the module docstring)."""
    if isinstance(left, list | tuple) and not isinstance(right, list | tuple):
        left = as_text(left)
    elif isinstance(right, list | tuple) and not isinstance(left, list | tuple):
        right = as_text(right)
    if _is_number(left) and isinstance(right, str):
        number = _as_number(right)
        return (left, number) if number is not None else (as_text(left), right)
    if isinstance(left, str) and _is_number(right):
        number = _as_number(left)
        return (number, right) if number is not None else (left, as_text(right))
    if isinstance(left, list | tuple):
        return tuple(left), tuple(right)
    return left, right


def equal(left: Value, right: Value) -> bool:
    a, b = _pair(left, right)
    return bool(a == b)


def order(op: type[ast.cmpop], left: Value, right: Value) -> bool:
    a, b = _pair(left, right)
    mixed = _is_number(left) != _is_number(right) and isinstance(a, str)
    if mixed or isinstance(a, str) != isinstance(b, str) or a is None or b is None:
        raise EvalError(f"cannot order {_kind(left)} and {_kind(right)}")
    if op is ast.Lt:
        return bool(a < b)
    if op is ast.LtE:
        return bool(a <= b)
    if op is ast.Gt:
        return bool(a > b)
    return bool(a >= b)


def _kind(value: Value) -> str:
    if isinstance(value, str):
        return "text"  # never the value itself: it may be a patient's name
    if isinstance(value, list | tuple):
        return "a list"
    return "None" if value is None else f"number {value!r}"


def contains(item: Value, container: Value) -> bool:
    if isinstance(container, list | tuple):
        return any(equal(item, member) for member in container)
    if container is None or isinstance(container, bool):
        raise EvalError(f"'in' needs text or a list on the right, not {container!r}")
    return as_text(item) in as_text(container)


def _to_int(value: Value) -> int:
    """int() that also takes "3.0" and "3.7" (truncating, like int(3.7)) and lists' text."""
    if value is None or isinstance(value, list | tuple):
        value = as_text(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return int(_to_float(value))
    try:
        return int(value)
    except OverflowError:
        raise EvalError(f"int() of {value!r}") from None


def _to_float(value: Value) -> float:
    """float() of a number or of text; the error never quotes the text (it may be a name)."""
    if value is None or isinstance(value, list | tuple):
        value = as_text(value)
    try:
        return float(value)
    except ValueError:
        raise EvalError("float() of text that is not a number") from None


def _length(value: Value) -> int:
    if isinstance(value, str | list | tuple):
        return len(value)
    raise EvalError(f"len() needs text or a list, not {_kind(value)}")


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """A `re()` pattern for `search`; re.error (from `re`, as admins know it) when it is bad.

    `re` decides what is a valid pattern and words the errors, so the language stays Python's
    regular expressions; `regex` (VERSION0: `re`'s semantics) does the matching. The two read
    the same pattern differently in two corners, both refused here: what `re` warns about as a
    possible future set syntax (`[[:alpha:]]`, `[a--b]`), and braces `regex` takes for a
    fuzzy-match constraint. Escaping the character (`\\[`, `\\{`) means it in both.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        try:
            re.compile(pattern)
        except FutureWarning as warning:
            raise re.error(f"{str(warning).lower()} (escape the character)") from None
    braces = _FUZZY_BRACES.search(pattern)
    if braces:
        where = f"{braces.group(1)} at position {braces.start(1)}"
        raise re.error(f"{where} reads as a fuzzy-match constraint (write \\{{ for a brace)")
    try:
        return regex.compile(pattern, regex.VERSION0)
    except regex.error as exc:
        raise re.error(str(exc)) from None


def search(pattern: regex.Pattern[str], value: Value, deadline: float) -> bool:
    """True when `pattern` is found in the value's text; EvalTimeout once `deadline` passed.

    `deadline` is a `time.monotonic()` time, or math.inf for no limit.
    """
    timeout = None
    if deadline != math.inf:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise EvalTimeout
    try:
        return pattern.search(as_text(value), timeout=timeout) is not None
    except TimeoutError:
        raise EvalTimeout from None


CONVERTERS: dict[str, Callable[[Value], Value]] = {
    "float": _to_float,
    "int": _to_int,
    "str": as_text,
    "len": _length,
}


def call_method(name: str, value: Value, args: Sequence[Value]) -> Value:
    text = as_text(value)
    if name == "lower":
        return text.lower()
    if name == "upper":
        return text.upper()
    if name == "strip":
        return text.strip(*[_text_arg(name, arg) for arg in args])
    (arg,) = args
    prefixes = tuple(_text_arg(name, a) for a in arg) if isinstance(arg, tuple | list) else None
    wanted = prefixes if prefixes is not None else _text_arg(name, arg)
    return text.startswith(wanted) if name == "startswith" else text.endswith(wanted)


def _text_arg(name: str, arg: Value) -> str:
    if not isinstance(arg, str):
        raise EvalError(f"{name}() needs text, not {_kind(arg)}")
    return arg
