"""The `when` expression language of rules.toml (SPEC §4), compiled without eval.

An expression is parsed with `ast.parse(mode="eval")` and every node is checked against a
short whitelist, then turned into a tree of Python closures. Nothing is ever handed to
`eval`, `exec` or `compile`, no attribute is looked up by name on a runtime object, and the
only callables reachable are the handful below, so a rules file cannot reach builtins,
imports or dunder attributes whatever it says. Mistakes are caught when the rules are loaded
(`rules check`, `route` startup), not when the first series arrives.

The language, for admins:

- Names are sidecar keywords (`Modality`), also written mercure's way (`tags.Modality`,
  `@Modality@`). Only DICOM keywords and receive's `SenderAET`, `SenderAddress`,
  `ReceiverAET`, `ReceivedAt` are names: `Modalty` is a compile error, not a silent `""`.
- A missing keyword reads as `""`.
- Literals: strings, numbers, `True`, `False`, `None`, tuples and lists of those.
- `== != < <= > >=` (chainable), `and or not`, `in` / `not in`.
- `in`: membership when the right side is a list (a multi-valued keyword such as ImageType,
  or a literal tuple/list), else substring of its text.
- A multi-valued value compared with a string, or used as text (methods, `str`, `re`,
  substring), is its backslash-joined form: `ImageType == "ORIGINAL\\PRIMARY\\AXIAL"`.
- A number compared with a string compares numerically when the string is a number, so
  mercure rules that quote numbers (`@SeriesNumber@ == "3"`) still work; `==` is simply false
  when it is not, and ordering a number against non-numeric text is an evaluation error.
- Methods `lower() upper() strip() startswith(x) endswith(x)` on any value's text; functions
  `float(x) int(x) str(x) len(x) re(pattern, x)` (`re` is `re.search`, true when it finds).
  `int("3.0")` is 3; `len` of a multi-valued value counts its values.
- The pattern of `re` is a string literal, in Python's `re` syntax, checked when the rules are
  loaded: a pattern taken from a DICOM value would let the network choose the regex. It runs
  on the `regex` engine, which can be stopped (see `values.compile_pattern`).

Errors: a compile error is `ExpressionError` (with the 1-based column); anything that goes
wrong at evaluation (`float("abc")`, `"" < 3`) is `EvalError`, which routing turns into
"this rule is false for this series" plus a warning.

Time: `evaluate` takes a deadline (`time.monotonic()`) and raises `EvalTimeout` when a `re()`
is still searching at it. No other operator backtracks: their cost is bounded by the size of
the values they read, and the caller checks the deadline between rules.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_dict

from mercli.errors import ConfigError
from mercli.rules.values import (
    CONVERTERS,
    EvalError,
    EvalTimeout,
    call_method,
    compile_pattern,
    contains,
    equal,
    order,
    search,
)

__all__ = [
    "RECEIVE_KEYWORDS",
    "EvalError",
    "EvalTimeout",
    "Expression",
    "ExpressionError",
    "compile_expression",
]

RECEIVE_KEYWORDS = frozenset({"SenderAET", "SenderAddress", "ReceiverAET", "ReceivedAt"})
"""Keys receive adds to every sidecar, usable in rules like DICOM keywords."""

_FUNCTIONS = ("float", "int", "str", "len", "re")
_METHODS = {"lower": (0, 0), "upper": (0, 0), "strip": (0, 1)}
_METHODS |= {"startswith": (1, 1), "endswith": (1, 1)}
_MAX_LENGTH = 4000
_MAX_DEPTH = 60
_MERCURE_NAME = re.compile(r"@([A-Za-z][A-Za-z0-9]*)@")
_QUOTES = re.compile(r"'''|\"\"\"|'|\"")

Value = Any
Node = Callable[[Mapping[str, Any], float], Value]  # (sidecar, deadline) -> value


class ExpressionError(ConfigError):
    """A `when` expression that does not compile; the message names what and where."""

    def __init__(self, message: str, column: int | None = None, line: int = 1) -> None:
        where = "" if column is None else f" (column {column})"
        if column is not None and line > 1:
            where = f" (line {line}, column {column})"
        super().__init__(message + where)
        self.reason = message
        self.column = column


@dataclass(frozen=True)
class Expression:
    """A compiled `when` expression: the keywords it reads and a safe evaluator."""

    text: str
    keywords: frozenset[str]
    _root: Node = field(repr=False, compare=False)

    def evaluate(self, tags: Mapping[str, Any], deadline: float = math.inf) -> bool:
        """True when the expression holds for this sidecar; EvalError when it cannot be told.

        EvalTimeout when a `re()` is still searching at `deadline` (a `time.monotonic()` time).
        """
        try:
            return bool(self._root(tags, deadline))
        except EvalError:
            raise
        except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as exc:
            raise EvalError(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def compile_expression(text: str) -> Expression:
    """Compile a `when` expression; ExpressionError for anything outside the language."""
    if len(text) > _MAX_LENGTH:
        raise ExpressionError(f"expression longer than {_MAX_LENGTH} characters")
    source = rewrite_mercure_names(text)
    stripped = source.lstrip()
    prefix = source[: len(source) - len(stripped)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Python's "invalid escape sequence"
            tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        line = (exc.lineno or 1) + prefix.count("\n")
        column = (exc.offset or 1) + (_first_line_shift(prefix) if line == 1 else 0)
        raise ExpressionError(f"syntax error: {exc.msg}", column, line) from None
    except (ValueError, MemoryError, RecursionError):
        raise ExpressionError("expression cannot be parsed (too deeply nested?)") from None
    compiler = _Compiler(stripped, prefix)
    root = compiler.node(tree.body, 0)
    return Expression(text, frozenset(compiler.keywords), root)


def _first_line_shift(prefix: str) -> int:
    return len(prefix) - prefix.rfind("\n") - 1


def rewrite_mercure_names(text: str) -> str:
    """`@Modality@` becomes `Modality  ` outside string literals, keeping every column."""
    out: list[str] = []
    pos = 0
    while pos < len(text):
        quote = _QUOTES.search(text, pos)
        code_end = quote.start() if quote else len(text)
        out.append(_MERCURE_NAME.sub(lambda m: m.group(1) + "  ", text[pos:code_end]))
        if not quote:
            break
        end = _string_end(text, quote.end(), quote.group())
        out.append(text[quote.start() : end])
        pos = end
    return "".join(out)


def _string_end(text: str, pos: int, quote: str) -> int:
    """Index just past the literal's closing quote (or the end of an unterminated one)."""
    while pos < len(text):
        if text[pos] == "\\":
            pos += 2
        elif text.startswith(quote, pos):
            return pos + len(quote)
        else:
            pos += 1
    return len(text)


# --- the compiler ------------------------------------------------------------------------------

_KNOWN_KEYWORDS = frozenset(keyword_dict) | RECEIVE_KEYWORDS
_LITERAL_TYPES = (str, int, float, bool, type(None))
_ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_NOT_ALLOWED = {
    ast.Subscript: "subscript [...]",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "generator expression",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.NamedExpr: "':=' assignment",
    ast.Starred: "'*' unpacking",
    ast.IfExp: "'x if c else y'",
    ast.Dict: "dict literal",
    ast.Set: "set literal",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.BinOp: "arithmetic",
    ast.Slice: "slice",
}


class _Compiler:
    """Turns a checked AST into closures; collects the keywords the expression reads."""

    def __init__(self, source: str, prefix: str) -> None:
        self.lines = source.split("\n")
        self.prefix = prefix
        self.keywords: set[str] = set()

    def error(self, message: str, node: ast.AST) -> ExpressionError:
        """An ExpressionError pointing at `node` in the text the admin wrote."""
        lineno = getattr(node, "lineno", 1)
        offset = getattr(node, "col_offset", 0)
        text = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
        column = len(text.encode()[:offset].decode(errors="ignore")) + 1
        if lineno == 1:
            column += _first_line_shift(self.prefix)
        return ExpressionError(message, column, lineno + self.prefix.count("\n"))

    def node(self, node: ast.expr, depth: int) -> Node:
        """Compile one node of the whitelist; ExpressionError for anything else."""
        if depth > _MAX_DEPTH:
            raise self.error("expression nested too deeply", node)
        if isinstance(node, ast.Constant | ast.Tuple | ast.List):
            value = self.literal(node)
            return lambda tags, deadline: value
        if isinstance(node, ast.UnaryOp):
            return self.unary(node, depth)
        if isinstance(node, ast.BoolOp):
            return self.boolean(node, depth)
        if isinstance(node, ast.Compare):
            return self.compare(node, depth)
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, ast.Name | ast.Attribute):
            return self.keyword(node)
        what = _NOT_ALLOWED.get(type(node), type(node).__name__)
        if isinstance(node, ast.BinOp):
            what = f"arithmetic operator {_op_symbol(node.op)}"
        raise self.error(f"{what} is not allowed", node)

    def literal(self, node: ast.expr) -> Any:
        """The value of a literal: a scalar constant, or a tuple/list of them."""
        if isinstance(node, ast.Tuple | ast.List):
            return tuple(self.scalar(item) for item in node.elts)
        return self.scalar(node)

    def scalar(self, node: ast.expr) -> Any:
        """A str, number, bool or None literal, negative numbers included."""
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = node.operand.value if isinstance(node.operand, ast.Constant) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return -value if isinstance(node.op, ast.USub) else value
            raise self.error("unary minus/plus is only allowed on a number literal", node)
        if isinstance(node, ast.Constant) and isinstance(node.value, _LITERAL_TYPES):
            return node.value
        if isinstance(node, ast.Constant):
            raise self.error(f"{type(node.value).__name__} literal is not allowed", node)
        if isinstance(node, ast.Tuple | ast.List):
            raise self.error("nested tuples/lists are not allowed", node)
        raise self.error("tuples and lists may only hold literals", node)

    def unary(self, node: ast.UnaryOp, depth: int) -> Node:
        """`not x`; a signed number literal."""
        if not isinstance(node.op, ast.Not):
            value = self.scalar(node)
            return lambda tags, deadline: value
        operand = self.node(node.operand, depth + 1)
        return lambda tags, deadline: not operand(tags, deadline)

    def boolean(self, node: ast.BoolOp, depth: int) -> Node:
        """`and` / `or` with Python's value semantics: `(Modality or "OT") == "CT"` works."""
        parts = tuple(self.node(value, depth + 1) for value in node.values)
        is_and = isinstance(node.op, ast.And)

        def run(tags: Mapping[str, Any], deadline: float) -> Any:
            value: Any = None
            for part in parts:
                value = part(tags, deadline)
                if bool(value) != is_and:
                    return value
            return value

        return run

    def compare(self, node: ast.Compare, depth: int) -> Node:
        """`a == b`, chains like `1 < x <= 5`, `in` and `not in`."""
        for op in node.ops:
            if isinstance(op, ast.Is | ast.IsNot):
                raise self.error("'is' is not allowed (use == or !=)", node)
        left = self.node(node.left, depth + 1)
        rights = tuple(self.node(item, depth + 1) for item in node.comparators)
        ops = tuple(_comparison(op) for op in node.ops)

        def run(tags: Mapping[str, Any], deadline: float) -> bool:
            a = left(tags, deadline)
            for op, right in zip(ops, rights, strict=True):
                b = right(tags, deadline)
                if not op(a, b):
                    return False
                a = b
            return True

        return run

    def call(self, node: ast.Call, depth: int) -> Node:
        """One of the functions or string methods, with positional arguments only."""
        if node.keywords:
            raise self.error("keyword arguments are not allowed", node.keywords[0].value)
        func = node.func
        if isinstance(func, ast.Attribute) and not _is_tags(func.value):
            return self.method(node, func, depth)
        if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
            return self.function(node, func.id, depth)
        name = func.id if isinstance(func, ast.Name) else "this"
        raise self.error(
            f"calling {name}() is not allowed (functions: {', '.join(_FUNCTIONS)};"
            f" methods: {', '.join(_METHODS)})",
            node,
        )

    def method(self, node: ast.Call, func: ast.Attribute, depth: int) -> Node:
        """`value.lower()` and friends, applied to the value's text."""
        if func.attr not in _METHODS:
            raise self.error(
                f"method .{func.attr}() is not allowed (methods: {', '.join(_METHODS)})", func
            )
        self.arity(node, func.attr, *_METHODS[func.attr])
        target = self.node(func.value, depth + 1)
        args = tuple(self.node(arg, depth + 1) for arg in node.args)
        name = func.attr
        return lambda tags, deadline: call_method(
            name, target(tags, deadline), [arg(tags, deadline) for arg in args]
        )

    def function(self, node: ast.Call, name: str, depth: int) -> Node:
        """`float int str len` of one value, `re(pattern, value)`."""
        self.arity(node, name, *((2, 2) if name == "re" else (1, 1)))
        if name == "re":
            return self.regex(node.args[0], node.args[1], depth)
        (arg,) = (self.node(arg, depth + 1) for arg in node.args)
        convert = CONVERTERS[name]
        return lambda tags, deadline: convert(arg(tags, deadline))

    def regex(self, pattern: ast.expr, subject: ast.expr, depth: int) -> Node:
        """`re("literal", value)`: compiled now, searched with the evaluation's deadline."""
        if not (isinstance(pattern, ast.Constant) and isinstance(pattern.value, str)):
            example = 're("^T1", SeriesDescription)'
            message = f"the pattern of re() must be a string literal, as in {example}"
            raise self.error(message, pattern)
        try:
            compiled = compile_pattern(pattern.value)
        except re.error as exc:
            raise self.error(f"bad regular expression: {exc}", pattern) from None
        value = self.node(subject, depth + 1)
        return lambda tags, deadline: search(compiled, value(tags, deadline), deadline)

    def arity(self, node: ast.Call, name: str, least: int, most: int) -> None:
        """Check the number of arguments; no `*args`."""
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.error("'*' unpacking is not allowed", arg)
        if not least <= len(node.args) <= most:
            wanted = str(least) if least == most else f"{least} to {most}"
            raise self.error(f"{name}() takes {wanted} argument(s), got {len(node.args)}", node)

    def keyword(self, node: ast.Name | ast.Attribute) -> Node:
        """A sidecar keyword: `Modality` or `tags.Modality`; a missing one reads as ""."""
        if isinstance(node, ast.Attribute):
            if not _is_tags(node.value):
                what = "method" if node.attr in _METHODS else "attribute access"
                hint = f" (call it: .{node.attr}())" if node.attr in _METHODS else ""
                raise self.error(f"{what} .{node.attr} is not allowed{hint}", node)
            name = node.attr
        else:
            name = node.id
        self.check_keyword(name, node)
        self.keywords.add(name)
        return lambda tags, deadline: _lookup(tags, name)

    def check_keyword(self, name: str, node: ast.AST) -> None:
        """Only DICOM keywords and receive's keys are names; typos fail here."""
        if name in _KNOWN_KEYWORDS:
            return
        if name.startswith("_"):
            raise self.error(f'name "{name}" is not allowed', node)
        if name in _FUNCTIONS:
            raise self.error(f"{name} is a function: call it, as in {name}(Modality)", node)
        if name == "tags":
            raise self.error("'tags' must be followed by a keyword, as in tags.Modality", node)
        close = difflib.get_close_matches(name, _KNOWN_KEYWORDS, n=1, cutoff=0.75)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise self.error(f'unknown keyword "{name}"{hint}', node)


def _lookup(tags: Mapping[str, Any], name: str) -> Any:
    value = tags.get(name, "")
    return "" if value is None else value


def _is_tags(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "tags"


def _comparison(op: ast.cmpop) -> Callable[[Any, Any], bool]:
    if isinstance(op, ast.Eq):
        return equal
    if isinstance(op, ast.NotEq):
        return lambda a, b: not equal(a, b)
    if isinstance(op, ast.In):
        return contains
    if isinstance(op, ast.NotIn):
        return lambda a, b: not contains(a, b)
    kind = type(op)
    assert kind in _ORDERING, kind
    return lambda a, b: order(kind, a, b)


def _op_symbol(op: ast.operator) -> str:
    symbols = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
    return repr(symbols.get(type(op), type(op).__name__))
