"""`mercli rules check|test`: validate a rules file, and see what it does to DICOM files."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mercli.errors import ExitCode
from mercli.rules.config import RuleSet, load_rules
from mercli.rules.decide import MATCH, Decision, RuleTrace, decide, trace
from mercli.tags import UnreadableDicom, read_tags

_RULES_ARG = click.argument("rules_file", metavar="RULES", type=click.Path(path_type=Path))


@click.group("rules", context_settings={"help_option_names": ["-h", "--help"]})
def rules() -> None:
    """Check a rules file, and try it on DICOM files before route uses it.

    rules.toml says where each series goes: [route] timing, [targets.NAME] to send to,
    and [[rules]] with a `when` expression (see SPEC §4). `route` refuses to start on a
    file that `rules check` rejects, so run it after every edit.

    \b
    Examples:
      mercli rules check /etc/mercli/rules.toml
      mercli rules test /etc/mercli/rules.toml scan/*.dcm
      mercli rules test --set SenderAET=CT01 --json rules.toml image.dcm | jq .
    """


@rules.command("check")
@_RULES_ARG
def check(rules_file: Path) -> None:
    """Validate RULES: syntax, keys, targets, expressions; exit 3 on the first error.

    Errors name file, line and rule, e.g.
    `Error: rules.toml:12: rule "ct-to-pacs": unknown target "pcas"`.
    On success prints a one-line summary and the rules in the order route checks them.

    \b
    Examples:
      mercli rules check rules.toml && systemctl restart mercli-route
    """
    ruleset = load_rules(rules_file)
    click.echo(f"ok: {rules_file}: {len(ruleset.targets)} targets, {len(ruleset.rules)} rules")
    for rule in ruleset.rules:
        click.echo(
            f"  {rule.name}: {_summary(rule.action, rule.targets, rule.final, rule.fallback)}"
        )


def _summary(action: str, targets: Sequence[str], final: bool, fallback: bool) -> str:
    text = "discard" if action == "discard" else "-> " + ", ".join(targets)
    flags = [flag for flag, on in (("final", final), ("fallback", fallback)) if on]
    return f"{text} ({', '.join(flags)})" if flags else text


@rules.command("test")
@_RULES_ARG
@click.argument(
    "files", metavar="FILE...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "--set",
    "overrides",
    metavar="KEY=VALUE",
    multiple=True,
    help="Pretend the sidecar holds KEY=VALUE, e.g. the receive metadata a file on disk "
    "lacks (SenderAET=CT01, ReceiverAET=MERCLI). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def test(
    rules_file: Path, files: tuple[Path, ...], overrides: tuple[str, ...], as_json: bool
) -> None:
    """Show which rules each DICOM FILE matches, why the others do not, and the result.

    Each FILE is taken as a series of its own. For every rule: match; false (with the
    values of the keywords the rule reads, so Modality="MR" shows why a CT rule did
    not match); error (the expression could not be evaluated: the rule counts as false);
    skipped (a final rule above matched); not-needed (a fallback, and another rule
    matched). Then the decision: the targets, or discard and why.

    Only keywords that a rule reads are shown: patient names and IDs appear only when a
    rule uses them. A file on disk has no receive metadata; add it with --set.

    \b
    Examples:
      mercli rules test rules.toml ct/IM0001.dcm
      mercli rules test --set SenderAET=CT01 rules.toml ct/*.dcm
      mercli rules test --json rules.toml a.dcm | jq '.files[].decision'
    """
    ruleset = load_rules(rules_file)
    extra = _parse_overrides(overrides)
    reports, failed = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd values; `tags -v` shows them
        for path in files:
            try:
                tags = read_tags(path) | extra
            except UnreadableDicom as exc:
                failed += 1
                click.echo(f"Error: {exc} ({path})", err=True)
                continue
            reports.append(_report(ruleset, path, tags))
    if as_json:
        click.echo(json.dumps({"rules": str(ruleset.path), "files": reports}, indent=2))
    else:
        for report in reports:
            _print_report(report)
    if failed:
        click.get_current_context().exit(int(ExitCode.SOME_FAILED))


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        values[key] = value
    return values


def _report(ruleset: RuleSet, path: Path, tags: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready explanation for one file; values only of keywords rules read."""
    label = str(tags.get("SeriesInstanceUID") or path)
    (decision,) = decide(ruleset, [(str(path), tags)], series_label=label)
    return {
        "file": str(path),
        "rules": [_trace_json(result, tags) for result in trace(ruleset, tags)],
        "decision": _decision_json(decision),
    }


def _trace_json(result: RuleTrace, tags: dict[str, Any]) -> dict[str, Any]:
    keywords = sorted(result.rule.when.keywords) if result.rule.when else []
    return {
        "rule": result.rule.name,
        "result": result.status,
        "detail": result.detail,
        "values": {keyword: tags.get(keyword) for keyword in keywords},
    }


def _decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "targets": list(decision.targets),
        "discarded": decision.discarded,
        "reason": decision.reason,
        "matched": list(decision.rules),
        "warnings": list(decision.warnings),
    }


def _print_report(report: dict[str, Any]) -> None:
    click.echo(report["file"])
    width = max(len(rule["rule"]) for rule in report["rules"])
    for rule in report["rules"]:
        values = ", ".join(f"{key}={_show(value)}" for key, value in rule["values"].items())
        detail = rule["detail"] if rule["result"] != MATCH or not values else values
        if rule["result"] in ("false", "error") and values:
            detail = f"{rule['detail']}; {values}" if rule["detail"] else values
        click.echo(f"  {rule['result']:<10} {rule['rule']:<{width}}  {detail}".rstrip())
    decision = report["decision"]
    if decision["discarded"]:
        click.echo(f"  => discard: {decision['reason']}")
    else:
        click.echo(f"  => {', '.join(decision['targets'])}: {decision['reason']}")
    for warning in decision["warnings"]:
        click.echo(f"  warning: {warning}")


def _show(value: Any) -> str:
    return "(missing)" if value is None else json.dumps(value, ensure_ascii=False)
