"""`mercli rules check|test`: validate a rules file, and see what it does to DICOM files."""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mercli.dispatch.preview import file_edits
from mercli.durations import format_duration
from mercli.errors import ExitCode
from mercli.rules.config import Rule, RuleSet, load_rules
from mercli.rules.decide import MATCH, Decision, RuleTrace, decide, trace
from mercli.secrets import exposure_warnings
from mercli.tags import UnreadableDicom, read_tags

if TYPE_CHECKING:
    from mercli.dispatch.edits import EditPlan

_RULES_ARG = click.argument("rules_file", metavar="RULES", type=click.Path(path_type=Path))


@click.group("rules", context_settings={"help_option_names": ["-h", "--help"]})
def rules() -> None:
    """Check a rules file, and try it on DICOM files before route uses it.

    rules.toml says where each series goes: [route] timing, [targets.NAME] to send to,
    and [[rules]] with a `when` expression (see SPEC §4; `trigger = "study"` rules hold
    series until their study is complete, §4.1). `route` refuses to start on a file that
    `rules check` rejects, so run it after every edit.

    \b
    Examples:
      mercli rules check /etc/mercli/rules.toml
      mercli rules test /etc/mercli/rules.toml scan/*.dcm
      mercli rules test /etc/mercli/rules.toml study-folder/
      mercli rules test --set SenderAET=CT01 --json rules.toml image.dcm | jq .
      mercli rules test --target research rules.toml image.dcm  # what de-identification changes
    """


@rules.command("check")
@_RULES_ARG
def check(rules_file: Path) -> None:
    """Validate RULES: syntax, keys, targets, expressions; exit 3 on the first error.

    Errors name file, line and rule, e.g.
    `Error: rules.toml:12: rule "ct-to-pacs": unknown target "pcas"`.
    On success prints a one-line summary and the rules in the order route checks them,
    then warnings (on stderr, exit still 0) about targets' secret files: missing,
    unreadable, or open to other users.

    \b
    Examples:
      mercli rules check rules.toml && systemctl restart mercli-route
    """
    ruleset = load_rules(rules_file)
    click.echo(f"ok: {rules_file}: {len(ruleset.targets)} targets, {len(ruleset.rules)} rules")
    for rule in ruleset.rules:
        click.echo(f"  {rule.name}: {_summary(rule)}")
    for name, target in ruleset.targets.items():
        for warning in exposure_warnings(target.to_json()):
            click.echo(f'warning: target "{name}": {warning}', err=True)
    for name, channel in ruleset.notify.items():
        for warning in exposure_warnings(channel.to_json()):
            click.echo(f'warning: notify "{name}": {warning}', err=True)


def _summary(rule: Rule) -> str:
    outputs: Sequence[str] = ("(rules)",) if rule.results == "route" else rule.targets
    text = "discard" if rule.discard else "-> " + ", ".join(outputs)
    if rule.process:
        text = "process " + " | ".join(rule.process) + " " + text
    flags = [flag for flag, on in (("final", rule.final), ("fallback", rule.fallback)) if on]
    return f"{text} ({', '.join(flags)})" if flags else text


@rules.command("test")
@_RULES_ARG
@click.argument(
    "files", metavar="FILE_OR_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "--set",
    "overrides",
    metavar="KEY=VALUE",
    multiple=True,
    help="Pretend the sidecar holds KEY=VALUE, e.g. the receive metadata a file on disk "
    "lacks (SenderAET=CT01, ReceiverAET=MERCLI). Repeatable.",
)
@click.option(
    "--target",
    "named",
    metavar="NAME",
    multiple=True,
    help="Also show what target NAME's edits (deidentify, modify, transfer_syntax) would "
    "change in each file, even where the rules do not send the file there. Repeatable.",
)
@click.option(
    "--show-phi",
    is_flag=True,
    help="Show the original values of attributes that can identify a patient in the edits "
    "(masked as *** by default). The output then holds patient data.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def test(
    rules_file: Path,
    files: tuple[Path, ...],
    overrides: tuple[str, ...],
    named: tuple[str, ...],
    show_phi: bool,
    as_json: bool,
) -> None:
    """Show which rules each DICOM file matches, why the others do not, and the result.

    A directory stands for every file in it, recursively (files that do not read as DICOM
    are reported, exit 1). Each file is decided on its own. For every rule: match; false
    (with the values of the keywords the rule reads, so Modality="MR" shows why a CT rule
    did not match); error (the expression could not be evaluated: the rule counts as
    false); skipped (a final rule above matched); not-needed (a fallback, and another rule
    matched). Then the decision: the targets, or discard and why; a matching study rule
    (`trigger = "study"`) holds the file's series for its study instead of sending it.

    Then, for each target the file would go to that edits it (deidentify, modify,
    transfer_syntax; SPEC §5.1), and each target named with --target: the attributes
    dispatch would change in its copy, `old -> new`, removed or added (sequences as item
    counts), and the transfer syntax it would be converted to. Original values of
    attributes that can identify a patient (names, IDs, dates, UIDs, everything the
    de-identification profile acts on, private elements) show as `*** (N chars)` unless
    --show-phi. A file that cannot be edited (BurnedInAnnotation = YES, an unreadable
    secret file) is reported as `target NAME: cannot edit: ...`, exit 1, as dispatch
    would fail its job.

    Then, per StudyInstanceUID and study rule that holds any of the files' series: which
    `require` expressions are met and by which series, which are missing, and what route
    would do: one study job per target `study_settle` after the last series, or wait, and
    what `on_timeout` does after `study_timeout`. Give all series of a study (a folder,
    say) to see whether it would be complete.

    Only keywords that a rule reads are shown: patient names and IDs appear only when a
    rule uses them (or with --show-phi, in edits). A file on disk has no receive metadata;
    add it with --set.

    \b
    Examples:
      mercli rules test rules.toml ct/IM0001.dcm
      mercli rules test --set SenderAET=CT01 rules.toml ct/*.dcm
      mercli rules test rules.toml mr-study/            # every series of a study
      mercli rules test --target research rules.toml ct/IM0001.dcm   # its edits, routed or not
      mercli rules test --json rules.toml a.dcm | jq '.files[].decision'
      mercli rules test --json rules.toml a.dcm | jq '.files[].edits.research.changes'
      mercli rules test --json rules.toml mr-study/ | jq '.studies[].rules[].verdict'
    """
    ruleset = load_rules(rules_file)
    extra = _parse_overrides(overrides)
    named = _known_targets(ruleset, named)
    editing = bool(named) or any(target.edits for target in ruleset.targets.values())
    plans: dict[str, EditPlan | str] = {}
    reports, read, failed = [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about odd values; `tags -v` shows them
        for path in _expand(files):
            try:
                tags = read_tags(path) | extra
            except UnreadableDicom as exc:
                failed += 1
                click.echo(f"Error: {exc} ({path})", err=True)
                continue
            report = _report(ruleset, path, tags)
            if editing:
                names = _edit_targets(ruleset, report, named)
                report["edits"] = file_edits(ruleset, path, names, plans, show_phi)
                failed += _edit_errors(report)
            reports.append(report)
            read.append(tags)
    studies = _studies(ruleset, reports, read)
    if as_json:
        document = {"rules": str(ruleset.path), "files": reports, "studies": studies}
        click.echo(json.dumps(document, indent=2))
    else:
        for report in reports:
            _print_report(report)
        for study in studies:
            _print_study(study)
    if failed:
        click.get_current_context().exit(int(ExitCode.SOME_FAILED))


def _expand(paths: Sequence[Path]) -> Iterator[Path]:
    """The files to test: each path given, a directory as every file under it (sorted)."""
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        found = 0
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                found += 1
                yield Path(folder) / name
        if not found:
            yield path  # read_tags reports it: a directory is not DICOM


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
    held = [
        {"rule": rule, "study": str(tags.get("StudyInstanceUID") or ""), "met": list(met)}
        for rule, met in decision.study
    ]
    return {
        "file": str(path),
        "rules": [_trace_json(result, tags) for result in trace(ruleset, tags)],
        "decision": _decision_json(decision) | {"held": held},
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
    held = decision["held"]
    if decision["discarded"]:
        click.echo(f"  => discard: {decision['reason']}")
    elif not held:
        click.echo(f"  => {', '.join(decision['targets'])}: {decision['reason']}")
    elif decision["targets"]:  # the reason names the study rules too: say who sends it
        studied = {entry["rule"] for entry in held}
        series_rules = ", ".join(f'"{r}"' for r in decision["matched"] if r not in studied)
        click.echo(f"  => {', '.join(decision['targets'])}: routed by rule {series_rules}")
    for entry in held:
        meets = f"; meets {', '.join(entry['met'])}" if entry["met"] else ""
        study = entry["study"] or _NO_STUDY
        click.echo(f'  => held for study {study} (study rule "{entry["rule"]}"){meets}')
    for warning in decision["warnings"]:
        click.echo(f"  warning: {warning}")
    for name, edits in report.get("edits", {}).items():
        _print_edits(name, edits)


def _known_targets(ruleset: RuleSet, named: Sequence[str]) -> tuple[str, ...]:
    """--target's names, checked; each once."""
    for name in named:
        if name not in ruleset.targets:
            known = ", ".join(ruleset.targets)
            message = f'unknown target "{name}" (targets: {known})'
            raise click.BadParameter(message, param_hint="--target")
    return tuple(dict.fromkeys(named))


def _edit_targets(ruleset: RuleSet, report: dict[str, Any], named: Sequence[str]) -> list[str]:
    """The targets whose edits a file's report shows: those it would go to that edit (the
    targets of study rules holding it too), then those named with --target."""
    decision = report["decision"]
    study_targets = {rule.name: rule.targets for rule in ruleset.rules}
    going = [*decision["targets"]]
    for entry in decision["held"]:
        going += study_targets[entry["rule"]]
    return list(dict.fromkeys([n for n in going if ruleset.targets[n].edits] + [*named]))


def _edit_errors(report: dict[str, Any]) -> int:
    """Echo the file's edit errors on stderr; 1 if there are any."""
    errors = [(name, e["error"]) for name, e in report["edits"].items() if e["error"]]
    for name, error in errors:
        click.echo(f"Error: target {name}: cannot edit: {error} ({report['file']})", err=True)
    return 1 if errors else 0


_WIDTH = 64  # characters of a value shown in the human output


def _print_edits(name: str, edits: dict[str, Any]) -> None:
    if edits["error"]:
        click.echo(f"  target {name}: cannot edit: {edits['error']}")
        return
    changes, syntax = edits["changes"], edits["transfer_syntax"]
    if not changes and syntax is None:
        click.echo(f"  target {name} edits: none")
        return
    click.echo(f"  target {name} edits:")
    if syntax is not None:
        click.echo(f"    (0002,0010) TransferSyntaxUID: {_syntax_change(syntax)}")
    for key, run in itertools.groupby(changes, _private_block):
        block = list(run)
        if len(block) > 1:  # a private block removed: one line, not one per element
            click.echo(f"    ({key},xxxx) private: {len(block)} elements removed")
            continue
        (change,) = block
        old = "(missing)" if change["old"] is None else _value(change, "old")
        new = "(removed)" if change["new"] is None else _value(change, "new")
        click.echo(f"    {change['tag']} {change['keyword']}: {old} -> {new}")
    count = {kind: sum(c["kind"] == kind for c in changes) for kind in _KINDS}
    attributes = "attribute" if count["changed"] == 1 else "attributes"
    click.echo(
        f"    {count['changed']} {attributes} changed, {count['removed']} removed, "
        f"{count['added']} added"
    )


_KINDS = ("changed", "removed", "added")


def _syntax_change(syntax: dict[str, Any]) -> str:
    """`Explicit VR Little Endian -> JPEG 2000 ... (1.2.840.10008.1.2.4.90), transcoded ...`"""
    from pydicom.uid import UID

    old = UID(syntax["old"]).name if syntax["old"] else "(missing)"
    new = UID(syntax["new"])
    named = new.name if new.name == str(new) else f"{new.name} ({new})"
    return f"{old} -> {named}, transcoded at dispatch"


def _private_block(change: dict[str, Any]) -> str:
    """A removed private element's group ("0009"); any other change's own tag."""
    tag: str = change["tag"]
    return tag[1:5] if int(tag[1:5], 16) % 2 and change["kind"] == "removed" else tag


def _value(change: dict[str, Any], which: str) -> str:
    """The old or new value as the human output shows it: masked, counted or quoted (and
    cut short)."""
    text: str = change[which]
    vr: str = change["vr"]
    if change["masked"] and (which == "old" or text == change["old"]):
        return text
    if vr == "SQ" or ((vr[:1] == "O" or vr == "UN") and text.endswith(" bytes")):
        return text
    return _show(text if len(text) <= _WIDTH else text[: _WIDTH - 1] + "…")


def _show(value: Any) -> str:
    return "(missing)" if value is None else json.dumps(value, ensure_ascii=False)


_NO_STUDY = "(no StudyInstanceUID)"


def _studies(
    ruleset: RuleSet, reports: Sequence[dict[str, Any]], read: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per study and study rule that holds any series of the files: what route would do."""
    held: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # study > rule > series > info
    for report, tags in zip(reports, read, strict=True):
        label = str(tags.get("SeriesInstanceUID") or report["file"])
        for entry in report["decision"]["held"]:
            rules = held.setdefault(entry["study"], {})
            series = rules.setdefault(entry["rule"], {}).setdefault(
                label,
                {
                    "SeriesInstanceUID": label,
                    "SeriesDescription": tags.get("SeriesDescription"),
                    "files": [],
                    "met": [],
                },
            )
            series["files"].append(report["file"])
            series["met"] += [text for text in entry["met"] if text not in series["met"]]
    return [
        {
            "study": study,
            "rules": [
                _study_rule(ruleset, rule, list(rules[rule.name].values()))
                for rule in ruleset.rules
                if rule.study and rule.name in rules
            ],
        }
        for study, rules in held.items()
    ]


def _study_rule(ruleset: RuleSet, rule: Rule, series: list[dict[str, Any]]) -> dict[str, Any]:
    """One study rule on the series it holds of one study: requires met, missing, verdict."""
    require = [
        {
            "expression": need.text,
            "met_by": [
                {key: s[key] for key in ("SeriesInstanceUID", "SeriesDescription")}
                for s in series
                if need.text in s["met"]
            ],
        }
        for need in rule.require
    ]
    met = {text for s in series for text in s["met"]}
    missing = [need.text for need in rule.require if need.text not in met]
    complete = bool(rule.require) and not missing
    return {
        "rule": rule.name,
        "targets": list(rule.targets),
        "series": series,
        "require": require,
        "missing": missing,
        "complete": complete,
        "after": "study_settle" if complete else "study_timeout",
        "on_timeout": rule.on_timeout,
        "verdict": _verdict(ruleset, rule, missing),
    }


def _verdict(ruleset: RuleSet, rule: Rule, missing: Sequence[str]) -> str:
    """What route would do with the study for `rule`, in words (SPEC §4.1)."""
    settings = ruleset.settings
    each = "" if len(rule.targets) == 1 else "each "
    jobs = f"one study job {each}to {', '.join(rule.targets)}"
    timeout = f"study_timeout ({_duration(settings.study_timeout)})"
    if not rule.require:
        return f"no require: {jobs} after {timeout}"
    if not missing:
        return f"complete: {jobs} after study_settle ({_duration(settings.study_settle)})"
    wait = f"would wait for: {', '.join(missing)}; after {timeout}: "
    if rule.on_timeout == "discard":
        return wait + f"discard (study incomplete: missing {', '.join(missing)})"
    return wait + "proceed (send what is there)"


def _print_study(study: dict[str, Any]) -> None:
    click.echo(f"study {study['study'] or _NO_STUDY}")
    for rule in study["rules"]:
        click.echo(f'  study rule "{rule["rule"]}" holds {len(rule["series"])} series:')
        for series in rule["series"]:
            files = len(series["files"])
            click.echo(f"    {_series_label(series)} ({files} file{'' if files == 1 else 's'})")
        width = max((len(need["expression"]) for need in rule["require"]), default=0)
        for need in rule["require"]:
            if need["met_by"]:
                by = ", ".join(_series_label(s) for s in need["met_by"])
                click.echo(f"  {'met':<10} {need['expression']:<{width}}  by {by}")
            else:
                click.echo(f"  {'missing':<10} {need['expression']}")
        click.echo(f"  => {rule['verdict']}")


def _duration(seconds: float) -> str:
    """`15m` rather than format_duration's `15m 0s`."""
    return format_duration(seconds).removesuffix(" 0s").removesuffix(" 0m").removesuffix(" 0h")


def _series_label(series: dict[str, Any]) -> str:
    description = series["SeriesDescription"]
    uid = series["SeriesInstanceUID"]
    return uid if description is None else f"{uid} {_show(description)}"
