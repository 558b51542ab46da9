"""SPEC §4 semantics: every matching rule applies, discard wins, final stops, fallback, splits.

Throughput, measured by hand on one core (Python 3.11, the SPEC example plus two rules, a
1000-instance series with a distinct SOPInstanceUID per instance, 200 repeats):
about 430 000 instances/s through `decide` (target: 50 000). Not asserted: benchmarks live
in `make bench`, never in timed tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mercli.rules.config import RuleSet, load_rules
from mercli.rules.decide import Decision, decide, trace

TARGETS = """\
[targets.pacs]
type = "dicom"
host = "h"
port = 104
called_aet = "PACS"
[targets.archive]
type = "folder"
path = "a"
[targets.ai]
type = "folder"
path = "ai"
"""


def ruleset(tmp_path: Path, rules: str) -> RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(TARGETS + rules)
    return load_rules(path)


def rule(name: str, when: str | None = None, targets: str = "", **flags: Any) -> str:
    text = f'[[rules]]\nname = "{name}"\n'
    if when is not None:
        text += f"when = '{when}'\n"
    if targets:
        text += f"targets = [{', '.join(repr(t) for t in targets.split())}]\n"
    for key, value in flags.items():
        text += f"{key} = {value if isinstance(value, str) else str(value).lower()}\n"
    return text


def one(rules: RuleSet, tags: dict[str, Any]) -> Decision:
    (decision,) = decide(rules, [("i1", tags)], series_label="1.2.3")
    return decision


CT = {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SeriesNumber": 2}
SCOUT = {**CT, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}


def test_every_matching_rule_applies_and_targets_are_deduplicated(tmp_path: Path) -> None:
    rules = ruleset(
        tmp_path,
        rule("ct", 'Modality == "CT"', "pacs archive")
        + rule("mr", 'Modality == "MR"', "ai")
        + rule("all", None, "archive ai pacs"),
    )
    decision = one(rules, CT)
    assert decision.targets == ("pacs", "archive", "ai")
    assert decision.rules == ("ct", "all")
    assert (decision.discarded, decision.reason) == (False, 'routed by rule "ct", "all"')
    assert decision.instances == ("i1",) and decision.warnings == ()


def test_discard_wins_over_routing_before_and_after(tmp_path: Path) -> None:
    scouts = rule("no-scouts", '"LOCALIZER" in ImageType', action='"discard"')
    for rules_text in (
        rule("ct", 'Modality == "CT"', "pacs") + scouts,
        scouts + rule("ct", 'Modality == "CT"', "pacs"),
    ):
        decision = one(ruleset(tmp_path, rules_text), SCOUT)
        assert (decision.discarded, decision.targets) == (True, ())
        assert decision.reason == 'discarded by rule "no-scouts"'
        assert set(decision.rules) == {"ct", "no-scouts"}
        assert not one(ruleset(tmp_path, rules_text), CT).discarded


def test_final_stops_further_rules_including_discard(tmp_path: Path) -> None:
    rules = ruleset(
        tmp_path,
        rule("keep-ct", 'Modality == "CT"', "pacs", final=True)
        + rule("no-scouts", '"LOCALIZER" in ImageType', action='"discard"')
        + rule("archive", None, "archive"),
    )
    decision = one(rules, SCOUT)
    assert (decision.discarded, decision.targets, decision.rules) == (
        False,
        ("pacs",),
        ("keep-ct",),
    )
    statuses = [(t.rule.name, t.status, t.detail) for t in trace(rules, SCOUT)]
    assert statuses == [
        ("keep-ct", "match", ""),
        ("no-scouts", "skipped", 'after final rule "keep-ct"'),
        ("archive", "skipped", 'after final rule "keep-ct"'),
    ]
    assert one(rules, {**SCOUT, "Modality": "MR"}).discarded  # final only once it matched


def test_fallback_only_when_nothing_else_matched(tmp_path: Path) -> None:
    rules = ruleset(
        tmp_path,
        rule("rest", None, "archive", fallback=True) + rule("ct", 'Modality == "CT"', "pacs"),
    )
    assert one(rules, CT).targets == ("pacs",)
    assert [t.status for t in trace(rules, CT)] == ["not-needed", "match"]
    mr = one(rules, {"Modality": "MR"})
    assert (mr.targets, mr.rules, mr.reason) == (("archive",), ("rest",), 'routed by rule "rest"')


def test_fallback_with_condition_and_fallback_discard(tmp_path: Path) -> None:
    rules = ruleset(
        tmp_path,
        rule("ct", 'Modality == "CT"', "pacs")
        + rule("sr", 'Modality == "SR"', "archive", fallback=True, final=True)
        + rule("rest", None, fallback=True, action='"discard"'),
    )
    assert one(rules, {"Modality": "SR"}).targets == ("archive",)
    other = one(rules, {"Modality": "OT"})
    assert (other.discarded, other.reason) == (True, 'discarded by rule "rest"')


def test_no_match_discards(tmp_path: Path) -> None:
    decision = one(ruleset(tmp_path, rule("ct", 'Modality == "CT"', "pacs")), {"Modality": "MR"})
    assert decision == Decision(("i1",), (), True, "no rule matched", ())


def test_eval_error_is_false_with_a_warning(tmp_path: Path) -> None:
    rules = ruleset(
        tmp_path,
        rule("thin", "float(SliceThickness) < 2", "ai")
        + rule("rest", None, "archive", fallback=True),
    )
    decision = one(rules, {"SliceThickness": "thin"})
    assert decision.targets == ("archive",)
    assert decision.warnings == (
        'rule "thin": series 1.2.3: cannot evaluate (float() of text that is not a number);'
        " rule is false",
    )
    alone = one(ruleset(tmp_path, rule("thin", "float(SliceThickness) < 2", "ai")), {})
    assert alone.reason == "no rule matched (1 could not be evaluated)"


def test_disagreeing_instances_are_split_never_merged(tmp_path: Path) -> None:
    rules = ruleset(
        tmp_path,
        rule("ct", 'Modality == "CT"', "pacs")
        + rule("no-scouts", '"LOCALIZER" in ImageType', action='"discard"'),
    )
    instances = [("a", CT), ("b", SCOUT), ("c", {**CT, "SeriesNumber": 9}), ("d", SCOUT)]
    first, second = decide(rules, instances, series_label="1.2.3")
    assert (first.instances, first.targets) == (("a", "c"), ("pacs",))
    assert (second.instances, second.discarded) == (("b", "d"), True)
    warning = "series 1.2.3: instances disagree on ImageType; split into 2 decisions"
    assert first.warnings == second.warnings == (warning,)


def test_same_outcome_different_values_stay_together(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, rule("ct", 'Modality in ("CT", "PT")', "pacs"))
    decisions = decide(rules, [("a", CT), ("b", {"Modality": "PT"})], series_label="x")
    assert [d.instances for d in decisions] == [("a", "b")]
    assert decide(rules, [], series_label="x") == []


def test_cache_keeps_types_apart(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, rule("one", 'str(SeriesNumber) == "1"', "pacs"))
    as_int = decide(rules, [("a", {"SeriesNumber": 1})], series_label="x")
    as_float = decide(rules, [("b", {"SeriesNumber": 1.0})], series_label="x")
    assert (as_int[0].discarded, as_float[0].discarded) == (False, True)
    lists = decide(
        rules, [("c", {"SeriesNumber": ["1"]}), ("d", {"SeriesNumber": "1"})], series_label="x"
    )
    assert [d.instances for d in lists] == [("c", "d")]  # a one-value list reads as its value


def test_many_instances(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, rule("ct", 'Modality == "CT"', "pacs"))
    instances = [(f"i{n}", {**CT, "SOPInstanceUID": f"1.{n}"}) for n in range(5000)]
    (decision,) = decide(rules, instances, series_label="x")
    assert len(decision.instances) == 5000
