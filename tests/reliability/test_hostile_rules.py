"""Hostile values against the admin's rules (SPEC §9): rule evaluation has a deadline per series.

A regex from rules.toml that backtracks without end on a crafted value from the network once
hung `route --once`, and, taken first again after every restart, stopped all routing for good.
Now the rules on one series get `[route] rule_timeout`; a series that exceeds it goes whole to
error/ naming the rule, and routing goes on. Outcomes are asserted, never how long things took:
the subprocess timeouts below only keep a regression from hanging the suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import mercli.rules.decide as decide_module
from mercli.cli import cli
from mercli.rules.config import RuleSet, load_rules
from mercli.rules.decide import RuleTimeout, decide
from mercli.spool import ERROR, ERROR_FILE, INCOMING, JOB_FILE, OUTGOING, Spool, Worker
from tests.kit import PACS_AND_ARCHIVE
from tests.reliability.kit import mercli
from tests.test_route import receive_file, series_files

RUNAWAY = "(a|aa)+$"  # exponential backtracking in `re` and in `regex` alike
HOSTILE = "a" * 60 + "!"  # about fib(60) ways to fail: hours, whatever the engine
REPORTED = "^(a+)+$"  # the report's pattern: exponential in `re`, not in `regex`
LIMIT = 'rule "ct-to-pacs" exceeded the 0.5 s evaluation limit'


def rules_text(pattern: str = RUNAWAY, route: str = 'rule_timeout = "0.5s"') -> str:
    return f"""\
[route]
{route}

{PACS_AND_ARCHIVE}
[[rules]]
name = "ct-to-pacs"
when = 'Modality == "CT" and re("{pattern}", StudyDescription)'
targets = ["pacs"]

[[rules]]
name = "rest"
fallback = true
targets = ["archive"]
"""


def write_rules(folder: Path, text: str) -> Path:
    path = folder / "rules.toml"
    path.write_text(text)
    return path


def ruleset(
    tmp_path: Path, pattern: str = RUNAWAY, route: str = 'rule_timeout = "0.5s"'
) -> RuleSet:
    return load_rules(write_rules(tmp_path, rules_text(pattern, route)))


def tags(description: str, number: int = 1) -> dict[str, Any]:
    return {"Modality": "CT", "StudyDescription": description, "InstanceNumber": number}


# -- route --------------------------------------------------------------------------------------


def test_route_once_sends_a_runaway_series_to_error_and_routes_the_others(
    tmp_path: Path, spool: Spool
) -> None:
    hostile = series_files(tmp_path / "a", "1.2.666", 2, StudyDescription=HOSTILE)
    normal = series_files(tmp_path / "b", "1.2.777", 2, StudyDescription="aaaa")
    with Worker(spool, "receive") as worker:
        for path in [*hostile, *normal]:  # the hostile series first: it is taken first
            receive_file(worker, path)
    rules = write_rules(tmp_path, rules_text())

    result = mercli("route", "--spool", spool.root, "--rules", rules, "--once", "--all", timeout=60)

    assert result.returncode == 1, result.stderr  # a batch command that failed on one series
    assert f"series 1.2.666: {LIMIT}; moved to error/" in result.stderr
    assert "1 jobs, 0 discarded, 1 failed" in result.stderr
    assert spool.items(INCOMING) == [] and list(spool.claims.iterdir()) == []
    (error,) = spool.items(ERROR)
    record = json.loads((error.path / ERROR_FILE).read_text())
    assert record["reason"] == LIMIT
    assert (record["rule"], record["series"], record["from"]) == ("ct-to-pacs", "1.2.666", INCOMING)
    assert {p.name for p in error.path.glob("*.dcm")} == {p.name for p in hostile}
    (job,) = [json.loads((item.path / JOB_FILE).read_text()) for item in spool.items(OUTGOING)]
    assert (job["series"], job["target"]["name"], job["rules"]) == (
        "1.2.777",
        "pacs",
        ["ct-to-pacs"],
    )
    (event,) = [e for e in spool.events.read() if e["event"] == "quarantined"]
    assert (event["item"], event["rule"], event["reason"]) == (error.name, "ct-to-pacs", LIMIT)

    again = mercli("route", "--spool", spool.root, "--rules", rules, "--once", "--all", timeout=60)
    assert again.returncode == 0 and "routed 0 series" in again.stderr  # nothing left stuck


def test_the_reported_pattern_routes_by_the_other_rules(tmp_path: Path, spool: Spool) -> None:
    """`^(a+)+$` on 40 a's and "!" hung `route` for good; it is now simply false."""
    files = series_files(tmp_path / "a", "1.2.668", 2, StudyDescription="a" * 40 + "!")
    with Worker(spool, "receive") as worker:
        for path in files:
            receive_file(worker, path)
    rules = write_rules(tmp_path, rules_text(REPORTED))
    result = mercli("route", "--spool", spool.root, "--rules", rules, "--once", "--all", timeout=60)
    assert result.returncode == 0, result.stderr
    (item,) = spool.items(OUTGOING)
    job = json.loads((item.path / JOB_FILE).read_text())
    assert (job["target"]["name"], job["rules"]) == ("archive", ["rest"])


# -- decide -------------------------------------------------------------------------------------


def test_decide_stops_a_runaway_regex_and_names_rule_and_series(tmp_path: Path) -> None:
    rules = ruleset(tmp_path)
    (ok,) = decide(rules, [("n1", tags("aaaa"))], series_label="1.2.777")
    assert (ok.targets, ok.rules) == (("pacs",), ("ct-to-pacs",))
    instances = [("i1", tags("aaaa")), ("i2", tags(HOSTILE)), ("i3", tags("CHEST"))]
    with pytest.raises(RuleTimeout) as raised:
        decide(rules, instances, series_label="1.2.666")
    assert (raised.value.rule, raised.value.series, raised.value.limit) == (
        "ct-to-pacs",
        "1.2.666",
        0.5,
    )
    assert raised.value.reason == LIMIT
    assert str(raised.value) == f"{LIMIT} (series 1.2.666)"
    assert not isinstance(raised.value, OSError)  # route retries OSErrors forever; not this
    assert len(rules.cache) == 1  # what could not be evaluated is never cached as an outcome
    (rest,) = decide(rules, [("i3", tags("CHEST"))], series_label="1.2.778")
    assert rest.rules == ("rest",)  # and the rule set goes on deciding other series


def test_decide_on_the_reported_pattern_decides(tmp_path: Path) -> None:
    (decision,) = decide(
        ruleset(tmp_path, REPORTED), [("i", tags("a" * 40 + "!"))], series_label="s"
    )
    assert (decision.targets, decision.rules, decision.warnings) == (("archive",), ("rest",), ())


def test_the_deadline_is_for_the_whole_series_and_cache_hits_are_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many cheap evaluations add up: a clock that moves 1 s per look runs out at the 10th."""
    text = rules_text(route='rule_timeout = "10s"')
    cheap = text.replace(f're("{RUNAWAY}", StudyDescription)', "InstanceNumber > 0")
    rules = load_rules(write_rules(tmp_path, cheap))
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(decide_module, "monotonic", lambda: float(next(ticks)))
    same = [(f"i{n}", tags("aaaa")) for n in range(50)]  # one evaluation, 49 cache hits
    (decision,) = decide(rules, same, series_label="1.2.1")
    assert len(decision.instances) == 50
    distinct = [(f"i{n}", tags("aaaa", number=n + 1)) for n in range(50)]
    with pytest.raises(RuleTimeout, match=r'rule "ct-to-pacs" exceeded the 10 s evaluation limit'):
        decide(rules, distinct, series_label="1.2.2")


def test_an_evaluation_error_is_still_false_with_a_warning(tmp_path: Path) -> None:
    text = rules_text().replace("re(", "float(StudyDescription) > 1 and re(")
    (decision,) = decide(
        load_rules(write_rules(tmp_path, text)), [("i", tags(HOSTILE))], series_label="s"
    )
    assert decision.rules == ("rest",)
    assert decision.warnings == (
        'rule "ct-to-pacs": series s: cannot evaluate (float() of text that is not a number);'
        " rule is false",
    )


def test_rules_test_reports_the_limit_instead_of_hanging(tmp_path: Path) -> None:
    (path,) = series_files(tmp_path / "a", "1.2.669", 1, StudyDescription=HOSTILE)
    rules = write_rules(tmp_path, rules_text())
    result = mercli("rules", "test", rules, path, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"Error: {LIMIT} (series 1.2.669)")


# -- rules check --------------------------------------------------------------------------------


def test_rules_check_accepts_rule_timeout(tmp_path: Path) -> None:
    path = write_rules(tmp_path, rules_text(route='rule_timeout = "0.5s"'))
    result = CliRunner().invoke(cli, ["rules", "check", str(path)])
    assert result.exit_code == 0, result.stderr
    assert load_rules(path).settings.rule_timeout == 0.5
    assert ruleset(tmp_path, route="").settings.rule_timeout == 2.0  # the default


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ('rule_timeout = "0s"', '2: [route]: "rule_timeout" must be more than 0'),
        ("rule_timeout = 0", '2: [route]: "rule_timeout" must be more than 0'),
        (
            'rule_timeout = "soon"',
            "2: [route]: \"rule_timeout\": not a duration: 'soon' (use e.g. 90s, 15m, 2h, 3d or"
            " seconds)",
        ),
        (
            "rule_timeout = true",
            '2: [route]: "rule_timeout" must be a duration such as 90s or 15m, not a boolean',
        ),
    ],
)
def test_rules_check_refuses_a_bad_rule_timeout(tmp_path: Path, route: str, message: str) -> None:
    path = write_rules(tmp_path, rules_text(route=route))
    result = CliRunner().invoke(cli, ["rules", "check", str(path)])
    assert result.exit_code == 3
    assert result.stderr == f"Error: {path}:{message}\n"


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (
            're("(a", StudyDescription)',
            "bad regular expression: missing ), unterminated subpattern at position 0 (column 4)",
        ),
        (
            "re(StudyDescription, Modality)",
            'the pattern of re() must be a string literal, as in re("^T1", SeriesDescription)'
            " (column 4)",
        ),
    ],
)
def test_rules_check_refuses_bad_and_network_chosen_patterns(
    tmp_path: Path, when: str, message: str
) -> None:
    text = rules_text().replace(
        f"""'Modality == "CT" and re("{RUNAWAY}", StudyDescription)'""", f"'{when}'"
    )
    path = write_rules(tmp_path, text)
    result = CliRunner().invoke(cli, ["rules", "check", str(path)])
    assert result.exit_code == 3
    assert result.stderr == f'Error: {path}:16: rule "ct-to-pacs": bad expression: {message}\n'
