"""The `when` language: what it means, what it refuses, and that nothing can escape it."""

from __future__ import annotations

import ast
import builtins
import contextlib
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mercli.errors import ConfigError
from mercli.rules.expr import EvalError, EvalTimeout, ExpressionError, compile_expression

CT = {
    "Modality": "CT",
    "StudyDescription": "Chest CT w/o",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "SeriesNumber": 3,
    "SliceThickness": 1.25,
    "SeriesDescription": "T1 axial",
    "PatientName": "Doe^John",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Modality == "CT"', True),
        ('Modality != "CT"', False),
        ('tags.Modality == "CT"', True),
        ('@Modality@ == "CT"', True),
        ('@Modality@ == "CT" and "CHEST" in @StudyDescription@.upper()', True),
        ('"CHEST" in StudyDescription.upper()', True),
        ('"Chest" in StudyDescription', True),
        ('"chest" in StudyDescription', False),
        ('"AXIAL" in ImageType', True),
        ('"AXI" in ImageType', False),  # membership, not substring, on a list
        ('"LOCALIZER" not in ImageType', True),
        ('ImageType == "ORIGINAL\\\\PRIMARY\\\\AXIAL"', True),
        ('"ORIGINAL\\\\PRIMARY" != ImageType', True),
        ('ImageType.lower().startswith("original")', True),
        ('Modality in ("CT", "MR")', True),
        ('Modality in ["MR", "PT"]', False),
        ('Modality not in ("MR",)', True),
        ('StudyDescription.lower().startswith(("chest", "abdomen"))', True),
        ('StudyDescription.endswith("w/o")', True),
        ('"  x ".strip() == "x"', True),
        ('"xxaxx".strip("x") == "a"', True),
        ('BodyPartExamined == ""', True),  # missing reads as ""
        ("not BodyPartExamined", True),
        ("Modality", True),
        ("SeriesNumber == 3", True),
        ('SeriesNumber == "3"', True),  # mercure rules quote numbers
        ('SeriesNumber == "three"', False),
        ("SeriesNumber > 2 and SeriesNumber <= 3", True),
        ("1 < SeriesNumber < 3", False),
        ("0 < SeriesNumber <= 3 < 4", True),
        ('SeriesNumber > "2"', True),
        ("SliceThickness < 2.0", True),
        ("float(SliceThickness) >= 1.25", True),
        ('int("3.0") == 3 and int("3.7") == 3', True),
        ('str(SeriesNumber) == "3"', True),
        ('str(SliceThickness) == "1.25"', True),
        ("len(ImageType) == 3", True),
        ("len(Modality) == 2", True),
        ('re("^T[12]", SeriesDescription)', True),
        ('re("(?i)chest", StudyDescription) and not re("LOCALIZER", ImageType)', True),
        ('re("PRIMARY\\\\\\\\AX", ImageType)', True),  # the joined form
        ('(BodyPartExamined or "CHEST") == "CHEST"', True),
        ('Modality == "MR" or Modality == "CT"', True),
        ("not (Modality == 'CT')", False),
        ("SeriesNumber == -3 or SeriesNumber > -1.5", True),
        ("True", True),
        ("None", False),
        ("()", False),
        ('Modality == "CT" == Modality', True),
        ('"@Modality@" == "@Modality@"', True),  # no rewrite inside strings
        ('SenderAET == ""', True),
    ],
)
def test_expression_meaning(text: str, expected: bool) -> None:
    assert compile_expression(text).evaluate(CT) is expected


def test_keywords_are_the_names_read() -> None:
    expression = compile_expression('tags.Modality == "CT" and @ImageType@ and re("x", Rows)')
    assert expression.keywords == frozenset({"Modality", "ImageType", "Rows"})
    assert compile_expression('"CT" == "CT"').keywords == frozenset()


def test_mercure_rewrite_keeps_columns() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("@Modality@ == Modalty")
    assert info.value.column == 15


def test_integer_and_float_sidecar_values_stay_apart() -> None:
    expression = compile_expression('str(SeriesNumber) == "3.0"')
    assert expression.evaluate({"SeriesNumber": 3.0}) is True
    assert expression.evaluate({"SeriesNumber": 3}) is False


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ('Modalty == "CT"', 'unknown keyword "Modalty" (did you mean "Modality"?)', 1),
        ("tags.Modalty", 'unknown keyword "Modalty"', 1),
        ('@Modalty@ == "CT"', 'unknown keyword "Modalty"', 1),
        ("foo", 'unknown keyword "foo"', 1),
        ("().__class__", "attribute access .__class__ is not allowed", 1),
        ("Modality.__class__", "attribute access .__class__ is not allowed", 1),
        ("__import__('os')", "calling __import__() is not allowed", 1),
        ("__builtins__", 'name "__builtins__" is not allowed', 1),
        ("open('/etc/passwd')", "calling open() is not allowed", 1),
        ("getattr(Modality, 'x')", "calling getattr() is not allowed", 1),
        ("Modality.lower", "method .lower is not allowed (call it: .lower())", 1),
        ("Modality.split()", "method .split() is not allowed", 1),
        ("ImageType[0]", "subscript [...] is not allowed", 1),
        ("(lambda: 1)()", "calling this() is not allowed", 1),
        ("lambda: 1", "lambda is not allowed", 1),
        ("[x for x in ImageType]", "comprehension is not allowed", 1),
        ("f'{Modality}'", "f-string is not allowed", 1),
        ("(x := 1)", "':=' assignment is not allowed", 2),
        ("len(*ImageType)", "'*' unpacking is not allowed", 5),
        ("float(x=1)", "keyword arguments are not allowed", 9),
        ("Modality + 'x'", "arithmetic operator '+' is not allowed", 1),
        ("Modality is None", "'is' is not allowed (use == or !=)", 1),
        ("float", "float is a function: call it, as in float(Modality)", 1),
        ("tags", "'tags' must be followed by a keyword, as in tags.Modality", 1),
        ("re('(', Modality)", "bad regular expression: missing ), unterminated subpattern", 4),
        ("re(Modality, 'x')", "the pattern of re() must be a string literal", 4),
        # where `re` and the `regex` engine would read a pattern differently: refused
        ("re('[[:alpha:]]', Modality)", "bad regular expression: possible nested set at", 4),
        ("re('[A--Z]', Modality)", "bad regular expression: possible set difference at", 4),
        ("re('C{e<=1}', Modality)", "bad regular expression: {e<=1} at position 1 reads as a", 4),
        ("re('x'.lower(), Modality)", "the pattern of re() must be a string literal", 4),
        ("re(1, Modality)", "the pattern of re() must be a string literal", 4),
        ("len(Modality, 1)", "len() takes 1 argument(s), got 2", 1),
        ("Modality.startswith()", "startswith() takes 1 argument(s), got 0", 1),
        ("b'CT' == Modality", "bytes literal is not allowed", 1),
        ("Modality in (Modality,)", "tuples and lists may only hold literals", 14),
        ("-Modality", "unary minus/plus is only allowed on a number literal", 1),
        ("{'a': 1}", "dict literal is not allowed", 1),
        ("'a' if Modality else 'b'", "'x if c else y' is not allowed", 1),
        ("Modality ==", "syntax error: invalid syntax", 1),
        ("a) or (b", "syntax error: unmatched ')'", 2),
        ("", "syntax error: invalid syntax", 1),
        ("  Modalty", 'unknown keyword "Modalty"', 3),
    ],
)
def test_compile_errors(text: str, message: str, column: int) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(text)
    assert info.value.reason.startswith(message), info.value.reason
    assert info.value.column == column
    assert str(info.value).endswith(f"(column {column})")
    assert isinstance(info.value, ConfigError)  # exit code 3 if it ever reaches the CLI


def test_error_on_a_later_line_names_line_and_column() -> None:
    with pytest.raises(ExpressionError, match=r"\(line 2, column 6\)$"):
        compile_expression('(Modality == "CT"\n and Modalty)')


def test_too_long_and_too_deep() -> None:
    with pytest.raises(ExpressionError, match="longer than"):
        compile_expression("Modality or " * 500 + "Modality")
    with pytest.raises(ExpressionError, match=r"nested too deeply|too many nested"):
        compile_expression("not " * 200 + "Modality")


@pytest.mark.parametrize(
    ("text", "tags", "message"),
    [
        ("float(SliceThickness) > 2", {}, "float() of text that is not a number"),
        ("float(PatientName) > 2", {"PatientName": "Doe^John"}, "not a number"),
        ("int(Modality) > 2", {"Modality": "CT"}, "not a number"),
        ("Modality < 3", {"Modality": "CT"}, "cannot order text and number 3"),
        ("Modality > None", {"Modality": "CT"}, "cannot order text and None"),
        ("len(SeriesNumber)", {"SeriesNumber": 3}, "len() needs text or a list"),
        ("Modality.startswith(1)", {"Modality": "CT"}, "startswith() needs text"),
        ("'a' in True", {}, "'in' needs text or a list on the right"),
        ("int(float('1e999')) > 1", {}, "int() of inf"),
    ],
)
def test_evaluation_errors(text: str, tags: dict[str, Any], message: str) -> None:
    with pytest.raises(EvalError) as info:
        compile_expression(text).evaluate(tags)
    assert message in str(info.value)
    assert "Doe" not in str(info.value)  # evaluation errors never quote values


# `re()` searches with the `regex` engine (it can be stopped); for what `re` accepts it must
# find exactly what `re.search` finds.
RE_CASES = [
    ("^T[12]", ["T1 axial", "t1", "xT2"]),
    ("(?i)chest", ["Chest CT", "CHEST", "thorax"]),
    (r"\bCT\b", ["CT", "CTA", "a CT b"]),
    (r"\d{3,}", ["12", "1234", "٣٣٣"]),  # Unicode digits, as in `re`
    (r"^\w+$", ["été", "a b", "_x9"]),  # Unicode word characters
    ("a$", ["a\n", "a\n\n", "ba"]),  # `$` also before a final newline
    (r"^(?=.*T1)(?!.*FLAIR)", ["T1 axial", "T1 FLAIR", "T2"]),  # lookarounds
    (r"(\w)\1", ["aa", "ab", "xyzz"]),  # backreferences
    (r"(?P<n>x)(?P=n)", ["xx", "x"]),
    ("[^\\\\]+$", ["A\\B", "A\\"]),
    ("", ["", "x"]),
    (r"(?s)a.b", ["a\nb", "ab"]),
    (r"ß", ["SS", "ß"]),
    (r"(?i)ß", ["SS", "ẞ"]),  # simple case folding only, as in `re`
    (r"a++b|c*+", ["aab", "ccc", ""]),  # possessive quantifiers (Python 3.11)
    (r"C\{e<=1\}|a{x}|b{2}", ["C{e<=1}", "C", "a{x}", "bb"]),  # escaped: braces are text
    (r"[\[:alpha:\]]", ["a", "[", "b"]),
]


@pytest.mark.parametrize(("pattern", "values"), RE_CASES)
def test_re_finds_what_python_re_finds(pattern: str, values: list[str]) -> None:
    expression = compile_expression(f"re({pattern!r}, StudyDescription)")
    for value in values:
        expected = re.search(pattern, value) is not None
        assert expression.evaluate({"StudyDescription": value}) is expected, (pattern, value)


def test_re_stops_at_the_deadline() -> None:
    expression = compile_expression('Modality == "CT" and re("(a|aa)+$", StudyDescription)')
    hostile = {"Modality": "CT", "StudyDescription": "a" * 60 + "!"}  # hours of backtracking
    with pytest.raises(EvalTimeout):
        expression.evaluate(hostile, time.monotonic() + 0.2)
    with pytest.raises(EvalTimeout):  # a deadline already passed stops before searching
        expression.evaluate({**hostile, "StudyDescription": "aa"}, time.monotonic() - 1)
    assert expression.evaluate({**hostile, "StudyDescription": "aa"}, time.monotonic() + 60)
    assert not issubclass(EvalTimeout, EvalError | OSError)  # never "false", never "retry"


# --- safety properties -------------------------------------------------------------------------

FRAGMENTS = [
    "__class__",
    "__import__",
    "().__class__.__bases__[0].__subclasses__()",
    "getattr",
    "open",
    "lambda",
    "lambda x: x",
    "eval",
    "exec",
    "compile",
    "globals()",
    "__builtins__",
    "breakpoint()",
    "import os",
    "os.system('id')",
    "__dict__",
    "mro",
    "__globals__",
    "Modality",
    "ImageType",
    "SliceThickness",
    "tags.",
    "tags",
    "@",
    "@Modality@",
    ".",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    ":=",
    "*",
    "**",
    "'",
    '"',
    "'''",
    "\\",
    " ",
    "==",
    "<",
    ">=",
    "!=",
    "in",
    "not",
    "and",
    "or",
    "is",
    "if",
    "else",
    "for",
    "x",
    "float(",
    "int(",
    "str(",
    "len(",
    "re(",
    ".lower()",
    ".upper()",
    ".strip()",
    ".startswith(",
    ".format(",
    "'CT'",
    '"a"',
    "1",
    "-1",
    "1e999",
    "0x10",
    "f'{1}'",
    "b'x'",
    "...",
    "None",
    "True",
    "\n",
    "\t",
    "#",
    "\x00",
    "é",
]
SIDECARS = st.dictionaries(
    st.sampled_from(["Modality", "ImageType", "SliceThickness", "SeriesNumber", "PatientName"]),
    st.one_of(
        st.text(max_size=8),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=False, allow_infinity=False),
        st.lists(st.text(max_size=5), max_size=3),
    ),
)


class Forbidden(BaseException):
    """Raised by patched builtins; BaseException so no `except Exception` can swallow it."""


def _ast_only_compile(
    source: Any, filename: Any, mode: Any, flags: int = 0, *a: Any, **kw: Any
) -> Any:
    if not flags & ast.PyCF_ONLY_AST:
        raise Forbidden("compile() to code")
    return REAL_COMPILE(source, filename, mode, flags, *a, **kw)


REAL_COMPILE = builtins.compile


@contextlib.contextmanager
def sandbox() -> Iterator[None]:
    """Any escape into builtins that have side effects fails the test.

    Patched through `builtins.__dict__` (not mock.patch, which itself imports), restored after.
    """

    def forbidden(name: str) -> Any:
        def forbid(*args: Any, **kwargs: Any) -> Any:
            raise Forbidden(name)  # not repr(args): __import__'s globals hold `license`

        return forbid

    names = ("eval", "exec", "open", "__import__", "breakpoint", "input", "compile")
    saved = {name: builtins.__dict__[name] for name in names}
    builtins.__dict__.update({name: forbidden(name) for name in names})

    def parser_import(name: str, *args: Any, **kwargs: Any) -> Any:
        # CPython's parser normalizes non-ASCII names with unicodedata; the regex engine reads
        # its DEFAULT_VERSION with `from regex import` on every compile. Nothing else.
        if name not in ("unicodedata", "regex"):
            raise Forbidden(f"__import__ {name}")
        return saved["__import__"](name, *args, **kwargs)

    builtins.__dict__["__import__"] = parser_import
    builtins.__dict__["compile"] = _ast_only_compile
    try:
        yield
    finally:
        builtins.__dict__.update(saved)


def check_safe(text: str, sidecar: dict[str, Any]) -> None:
    """Compile raises ExpressionError, or evaluation returns a bool or raises EvalError."""
    with sandbox():
        try:
            expression = compile_expression(text)
        except ExpressionError:
            return
        try:
            result = expression.evaluate(sidecar)
        except EvalError:
            return
    assert result is True or result is False


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60), SIDECARS)
def test_arbitrary_text_is_safe(text: str, sidecar: dict[str, Any]) -> None:
    check_safe(text, sidecar)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=10).map("".join), SIDECARS)
def test_dangerous_fragments_are_safe(text: str, sidecar: dict[str, Any]) -> None:
    check_safe(text, sidecar)


LEAVES = st.sampled_from(
    [
        *("Modality", "ImageType", "tags.SeriesNumber", "@SliceThickness@", "PatientName"),
        *("'CT'", "''", "'a\\\\b'", "1", "-2.5", "0", "None", "True", "('CT', 1)", "['x']"),
    ]
)


PATTERNS = st.sampled_from(["''", "'C'", "'^T[12]'", "'(?i)ct$'", "'a\\\\b'", "'[^x]+'"])


def _grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    ops = st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not in", "and", "or"])
    funcs = st.sampled_from(["float", "int", "str", "len", "(not "])
    methods = st.sampled_from([".lower()", ".upper()", ".strip()", ".startswith('C')"])
    return st.one_of(
        st.tuples(inner, ops, inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(funcs, inner).map(lambda t: f"{t[0]}({t[1]})" + ")" * t[0].startswith("(")),
        st.tuples(inner, methods).map(lambda t: f"({t[0]}){t[1]}"),
        st.tuples(PATTERNS, inner).map(lambda t: f"re({t[0]}, {t[1]})"),
    )


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(LEAVES, _grow, max_leaves=8), SIDECARS)
def test_well_formed_expressions_evaluate_to_bool_or_eval_error(
    text: str, sidecar: dict[str, Any]
) -> None:
    compile_expression(text)  # the grammar above only builds valid expressions
    check_safe(text, sidecar)


def test_nan_and_huge_numbers_do_not_escape() -> None:
    for text in (
        "float('nan') < 1",
        "int('99999999999999999999') > 1",
        "float('1e400') > 1",
        "int('1e400') > 1",
    ):
        with contextlib.suppress(EvalError):
            assert compile_expression(text).evaluate({}) in (True, False)
    assert math.isnan(float("nan"))  # the test host behaves as Python does
