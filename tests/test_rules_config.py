"""rules.toml: what loads, with which defaults, and every refusal with its exact file:line."""

# ruff: noqa: E501  (tables of exact messages read best one per line)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mercli.errors import ConfigError, ExitCode
from mercli.jobs import OffpeakWindow, Target
from mercli.rules.config import PurgeSettings, RouteSettings, load_rules

EXAMPLE = """\
[route]
series_timeout = "90s"   # a comment
settle = 5
study_timeout = "15m"

[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = 104
called_aet = "PACS"
ordered = true
retry_delay = "30s"
max_attempts = 0

[targets.archive]
type = "folder"
path = "archive"

[[rules]]
name = "ct-to-pacs"
when = 'Modality == "CT" and "CHEST" in StudyDescription.upper()'
targets = ["pacs", "archive", "pacs"]

[[rules]]
name = "no-scouts"
when = '"LOCALIZER" in ImageType'
action = "discard"
final = true

[[rules]]
name = "rest"
fallback = true
targets = "archive"
"""

DICOM = '[targets.pacs]\ntype = "dicom"\nhost = "h"\nport = 104\ncalled_aet = "PACS"\n'
RULE = '[[rules]]\nname = "r"\ntargets = ["pacs"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_example_loads_with_defaults(tmp_path: Path) -> None:
    ruleset = load_rules(write(tmp_path, EXAMPLE))
    assert ruleset.settings == RouteSettings(series_timeout=90.0, settle=5.0, study_timeout=900.0)
    pacs = ruleset.targets["pacs"]
    assert (pacs.host, pacs.port, pacs.called_aet, pacs.calling_aet) == (
        "127.0.0.1",
        104,
        "PACS",
        "MERCLI",
    )
    assert (pacs.ordered, pacs.timeout, pacs.retry_delay, pacs.max_attempts) == (
        True,
        60.0,
        30.0,
        0,
    )
    assert (pacs.retry_backoff, pacs.retry_max_delay, pacs.max_age) == (2.0, 600.0, 3 * 86400.0)
    assert ruleset.targets["archive"].path == tmp_path / "archive"
    ct, scouts, rest = ruleset.rules
    assert (ct.name, ct.targets, ct.action, ct.line) == (
        "ct-to-pacs",
        ("pacs", "archive"),
        "route",
        19,
    )
    assert ct.when is not None and ct.when.keywords == {"Modality", "StudyDescription"}
    assert (scouts.discard, scouts.final, scouts.targets, scouts.line) == (True, True, (), 24)
    assert (rest.fallback, rest.when, rest.targets) == (True, None, ("archive",))
    assert ruleset.keywords == ("ImageType", "Modality", "StudyDescription")
    assert ruleset.path == tmp_path / "rules.toml"


def test_defaults_when_route_is_missing(tmp_path: Path) -> None:
    ruleset = load_rules(write(tmp_path, DICOM + RULE))
    assert ruleset.settings == RouteSettings()
    assert ruleset.targets["pacs"] == Target(
        name="pacs", type="dicom", host="h", port=104, called_aet="PACS"
    )


def test_folder_paths(tmp_path: Path) -> None:
    text = '[targets.a]\ntype = "folder"\npath = "/srv/x/../y"\n[targets.b]\ntype = "folder"\npath = "../out"\n'
    ruleset = load_rules(write(tmp_path, text + '[[rules]]\nname = "r"\ntargets = ["a", "b"]\n'))
    assert ruleset.targets["a"].path == Path("/srv/y")
    assert ruleset.targets["b"].path == tmp_path.parent / "out"


def test_target_json_round_trip(tmp_path: Path) -> None:
    ruleset = load_rules(write(tmp_path, EXAMPLE))
    for target in ruleset.targets.values():
        document = json.loads(json.dumps(target.to_json()))
        assert Target.from_json(document) == target
        assert Target.from_json({**document, "added_later": 1}) == target
    assert ruleset.targets["archive"].to_json()["path"] == str(tmp_path / "archive")


def test_inline_targets_are_located(tmp_path: Path) -> None:
    text = '[targets]\npacs = { type = "dicom", host = "h", port = 0, called_aet = "P" }\n' + RULE
    with pytest.raises(ConfigError) as info:
        load_rules(write(tmp_path, text))
    assert (
        str(info.value)
        == f'{tmp_path / "rules.toml"}:2: target "pacs": "port" must be between 1 and 65535, not 0'
    )


# (text, line, message): the error must read exactly `<file>:<line>: <message>`.
ERRORS = [
    (
        "[route\n",
        1,
        "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)",
    ),
    (
        "rout = 1\n" + DICOM + RULE,
        1,
        'unknown key "rout" (did you mean "route"? allowed: route, purge, notify, targets, runners, modules, rules)',
    ),
    (
        '[route]\nsettle = "2x"\n' + DICOM + RULE,
        2,
        "[route]: \"settle\": not a duration: '2x' (use e.g. 90s, 15m, 2h, 3d or seconds)",
    ),
    (
        "[route]\nsettle = true\n" + DICOM + RULE,
        2,
        '[route]: "settle" must be a duration such as 90s or 15m, not a boolean',
    ),
    (
        "[route]\nseries_timeout = 0\n" + DICOM + RULE,
        2,
        '[route]: "series_timeout" must be more than 0',
    ),
    (
        '[route]\nrule_timeout = "0s"\n' + DICOM + RULE,
        2,
        '[route]: "rule_timeout" must be more than 0',
    ),
    (
        "[route]\ntimeout = 1\n" + DICOM + RULE,
        2,
        '[route]: unknown key "timeout" (did you mean "rule_timeout"? allowed: series_timeout, settle, study_timeout, study_settle, rule_timeout, offpeak)',
    ),
    (DICOM, None, "no [[rules]]: every series would be discarded"),
    (DICOM + '[[rules]]\ntargets = ["pacs"]\n', 6, 'rule #1: missing key "name"'),
    (DICOM + RULE + RULE, 10, 'rule "r": duplicate rule name (first used at line 6)'),
    (
        DICOM + '[[rules]]\nname = "r"\ntargets = ["pcas"]\n',
        8,
        'rule "r": unknown target "pcas" (did you mean "pacs"?)',
    ),
    (
        DICOM + '[[rules]]\nname = "r"\ntargets = ["zzz"]\n',
        8,
        'rule "r": unknown target "zzz" (defined: pacs)',
    ),
    (
        DICOM + '[[rules]]\nname = "r"\n',
        6,
        'rule "r": no targets (add targets = [...], or action = "discard")',
    ),
    (
        DICOM + '[[rules]]\nname = "r"\ntargets = []\n',
        6,
        'rule "r": no targets (add targets = [...], or action = "discard")',
    ),
    (
        DICOM + '[[rules]]\nname = "r"\naction = "discard"\ntargets = ["pacs"]\n',
        9,
        'rule "r": a rule with action = "discard" cannot have targets',
    ),
    (
        DICOM + '[[rules]]\nname = "r"\naction = "drop"\n',
        8,
        'rule "r": action must be "route" or "discard", not "drop"',
    ),
    (
        DICOM + RULE + 'tagets = ["x"]\n',
        9,
        'rule #1: unknown key "tagets" (did you mean "targets"? allowed: name, when, targets, action, final, fallback, priority, trigger, action_trigger, require, on_timeout, process, process_settings, results, notify, notify_on)',
    ),
    (DICOM + RULE + 'final = "yes"\n', 9, 'rule "r": "final" must be true or false, not a string'),
    (
        DICOM + RULE + "targets = [1]\n",
        9,
        "invalid TOML: Cannot overwrite a value (at line 9, column 14)",
    ),
    (
        DICOM + '[[rules]]\nname = "r"\ntargets = [1]\n',
        8,
        'rule "r": "targets" must be a list of strings',
    ),
    (DICOM + '[[rules]]\nname = ""\n', 7, "rule #1: a rule name must be non-empty printable text"),
    (
        DICOM + RULE + "when = 'Modalty == \"CT\"'\n",
        9,
        'rule "r": bad expression: unknown keyword "Modalty" (did you mean "Modality"?) (column 1)',
    ),
    (
        DICOM + RULE + "when = 'Modality.__class__'\n",
        9,
        'rule "r": bad expression: attribute access .__class__ is not allowed (column 1)',
    ),
    (DICOM + RULE + "when = 1\n", 9, 'rule "r": "when" must be a string, not an integer'),
    (
        '[targets.pacs]\ntype = "ftp"\n' + RULE,
        2,
        'target "pacs": unknown type "ftp" (known: dicom, folder, dicomweb, sftp, s3)',
    ),
    ('[targets.pacs]\nhost = "h"\n' + RULE, 1, 'target "pacs": missing key "type"'),
    (
        '[targets.pacs]\ntype = "dicom"\nport = 104\ncalled_aet = "P"\n' + RULE,
        1,
        'target "pacs": missing key "host"',
    ),
    (
        '[targets.pacs]\ntype = "dicom"\nhost = "h"\ncalled_aet = "P"\n' + RULE,
        1,
        'target "pacs": missing key "port"',
    ),
    (
        '[targets.pacs]\ntype = "dicom"\nhost = "h"\nport = 104\n' + RULE,
        1,
        'target "pacs": missing key "called_aet"',
    ),
    (
        DICOM.replace("104", "70000") + RULE,
        4,
        'target "pacs": "port" must be between 1 and 65535, not 70000',
    ),
    (
        DICOM.replace("104", '"104"') + RULE,
        4,
        'target "pacs": "port" must be an integer, not a string',
    ),
    (
        DICOM.replace('"PACS"', '"A_VERY_LONG_AE_TITLE"') + RULE,
        5,
        'target "pacs": "called_aet" must be an AE title: 1 to 16 printable ASCII characters without backslash, not \'A_VERY_LONG_AE_TITLE\'',
    ),
    (
        DICOM + 'calling_aet = "A\\\\B"\n' + RULE,
        6,
        'target "pacs": "calling_aet" must be an AE title: 1 to 16 printable ASCII characters without backslash, not \'A\\\\B\'',
    ),
    (
        DICOM + 'calling_aet = "A\\tB"\n' + RULE,
        6,
        'target "pacs": "calling_aet" must be an AE title: 1 to 16 printable ASCII characters without backslash, not \'A\\tB\'',
    ),
    (
        DICOM + 'calling_aet = "  "\n' + RULE,
        6,
        'target "pacs": "calling_aet" must be an AE title: 1 to 16 printable ASCII characters without backslash, not \'  \'',
    ),
    (
        DICOM + 'path = "/x"\n' + RULE,
        6,
        'target "pacs": unknown key "path" (allowed: type, host, port, called_aet, calling_aet, ordered, timeout, tls, tls_ca, tls_cert, tls_key, retry_delay, retry_backoff, retry_max_delay, max_attempts, max_age, priority, notify, notify_on, deidentify, deidentify_options, pseudonym_secret_file, allow_burned_in, keep_private, modify, transfer_syntax, allow_lossy)',
    ),
    (DICOM + "timeout = 0\n" + RULE, 6, 'target "pacs": "timeout" must be more than 0'),
    (
        DICOM + 'retry_delay = "soon"\n' + RULE,
        6,
        'target "pacs": "retry_delay": not a duration: \'soon\' (use e.g. 90s, 15m, 2h, 3d or seconds)',
    ),
    (
        DICOM + "retry_backoff = 0.5\n" + RULE,
        6,
        'target "pacs": "retry_backoff" must be at least 1, not 0.5',
    ),
    (
        DICOM + "max_attempts = -1\n" + RULE,
        6,
        'target "pacs": "max_attempts" must be between 0 and 1000000, not -1',
    ),
    (DICOM + 'host = "a b"\n', 6, "invalid TOML: Cannot overwrite a value (at line 6, column 13)"),
    (DICOM.replace('"h"', '"a b"') + RULE, 3, "target \"pacs\": bad host 'a b'"),
    ('[targets.pacs]\ntype = "folder"\n' + RULE, 1, 'target "pacs": missing key "path"'),
    (
        '[targets.pacs]\ntype = "folder"\npath = "x"\nhost = "h"\n' + RULE,
        4,
        'target "pacs": unknown key "host" (allowed: type, path, link, retry_delay, retry_backoff, retry_max_delay, max_attempts, max_age, priority, notify, notify_on, deidentify, deidentify_options, pseudonym_secret_file, allow_burned_in, keep_private, modify, transfer_syntax, allow_lossy)',
    ),
    (
        '[targets."a b"]\ntype = "folder"\npath = "x"\n' + RULE,
        1,
        "target \"a b\": target names are letters, digits, '.', '_' and '-'",
    ),
    ("targets = 3\n" + RULE, 1, '"targets" must be a table ([targets] or targets = {...})'),
    ("rules = 3\n", 1, "rules must be [[rules]] tables"),
    ("purge = 3\n" + DICOM + RULE, 1, '"purge" must be a table ([purge] or purge = {...})'),
    (
        '[purge]\nsucess = "1d"\n' + DICOM + RULE,
        2,
        '[purge]: unknown key "sucess" (did you mean "success"? allowed: success, discard, error)',
    ),
    (
        '[purge]\noutgoing = "1d"\n' + DICOM + RULE,
        2,
        '[purge]: unknown key "outgoing" (allowed: success, discard, error)',
    ),
    (
        '[purge]\nerror = "a month"\n' + DICOM + RULE,
        2,
        "[purge]: \"error\": not a duration: 'a month' (use e.g. 90s, 15m, 2h, 3d or seconds)",
    ),
    (
        "[purge]\ndiscard = true\n" + DICOM + RULE,
        2,
        '[purge]: "discard" must be a duration such as 90s or 15m, not a boolean',
    ),
    (
        DICOM + 'priority = "high"\n' + RULE,
        6,
        'target "pacs": unknown priority "high" (allowed: "urgent", "normal", "offpeak")',
    ),
    (
        DICOM + RULE + 'priority = "stat"\n',
        9,
        'rule "r": unknown priority "stat" (allowed: "urgent", "normal", "offpeak")',
    ),
    (DICOM + RULE + "priority = 1\n", 9, 'rule "r": "priority" must be a string, not an integer'),
    (
        DICOM + RULE + 'priority = "offpeak"\n',
        9,
        'rule "r": priority = "offpeak" needs a window: add offpeak = "22:00-06:00" to [route]',
    ),
    (
        DICOM + 'priority = "offpeak"\n' + RULE,
        6,
        'target "pacs": priority = "offpeak" needs a window: add offpeak = "22:00-06:00" to [route]',
    ),
    (
        '[route]\noffpeak = "22:00"\n' + DICOM + RULE,
        2,
        "[route]: \"offpeak\": not a time window: '22:00' (use HH:MM-HH:MM, e.g. 22:00-06:00)",
    ),
    (
        '[route]\noffpeak = "24:00-06:00"\n' + DICOM + RULE,
        2,
        "[route]: \"offpeak\": not a time of day in '24:00-06:00' (00:00 to 23:59)",
    ),
    (
        '[route]\noffpeak = "06:00-06:00"\n' + DICOM + RULE,
        2,
        "[route]: \"offpeak\": empty time window: '06:00-06:00' (start and end are equal)",
    ),
    (
        "[route]\noffpeak = 22\n" + DICOM + RULE,
        2,
        '[route]: "offpeak" must be a string, not an integer',
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_validation_errors(tmp_path: Path, text: str, line: int | None, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    where = f"{path}:{line}" if line else str(path)
    assert str(info.value) == f"{where}: {message}"
    assert info.value.exit_code == ExitCode.CONFIG


def test_fallback_discard_is_fine(tmp_path: Path) -> None:
    ruleset = load_rules(
        write(tmp_path, '[[rules]]\nname = "rest"\nfallback = true\naction = "discard"\n')
    )
    assert ruleset.rules[0].discard and ruleset.rules[0].fallback
    assert ruleset.targets == {}


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read rules: No such file"):
        load_rules(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_rules(tmp_path / "latin1.toml")


def test_purge_retention_defaults_and_overrides(tmp_path: Path) -> None:
    assert load_rules(write(tmp_path, DICOM + RULE)).purge == PurgeSettings()
    assert PurgeSettings().retention("success") == 3 * 86400.0
    assert PurgeSettings().retention("error") is None
    text = '[purge]\nsuccess = "3d"\ndiscard = "7d"\nerror = "30d"\n' + DICOM + RULE
    purge = load_rules(write(tmp_path, text)).purge
    assert purge == PurgeSettings(success=3 * 86400.0, discard=7 * 86400.0, error=30 * 86400.0)
    partial = load_rules(write(tmp_path, "[purge]\ndiscard = 60\n" + DICOM + RULE)).purge
    assert (partial.success, partial.discard, partial.error) == (3 * 86400.0, 60.0, None)


PRIORITIES_TOML = """\
[route]
offpeak = "22:00-06:30"

[targets.pacs]
type = "dicom"
host = "h"
port = 104
called_aet = "PACS"
priority = "urgent"

[targets.archive]
type = "folder"
path = "archive"

[targets.research]
type = "folder"
path = "research"
priority = "offpeak"

[[rules]]
name = "stroke"
when = '"STROKE" in StudyDescription'
priority = "urgent"
targets = ["archive"]

[[rules]]
name = "all"
priority = "offpeak"
targets = ["pacs", "archive", "research"]

[[rules]]
name = "scouts"
action = "discard"
priority = "normal"
"""


def test_priorities_and_the_offpeak_window_load(tmp_path: Path) -> None:
    ruleset = load_rules(write(tmp_path, PRIORITIES_TOML))
    assert ruleset.settings.offpeak == OffpeakWindow(22 * 60, 6 * 60 + 30)
    assert ruleset.offpeak_window == "22:00-06:30"
    assert [t.priority for t in ruleset.targets.values()] == ["urgent", None, "offpeak"]
    assert [r.priority for r in ruleset.rules] == ["urgent", "offpeak", "normal"]
    assert ruleset.targets["pacs"].to_json()["priority"] == "urgent"  # carried by every job
    # a job's priority: the highest of its target's and of the matched rules that name it
    assert ruleset.job_priority("pacs", ["all"]) == "urgent"  # the target says urgent
    assert ruleset.job_priority("archive", ["stroke", "all"]) == "urgent"
    assert ruleset.job_priority("archive", ["all"]) == "offpeak"
    assert ruleset.job_priority("research", ["stroke", "all"]) == "offpeak"  # stroke: not it
    assert RouteSettings().offpeak is None and Target("t", "folder").priority is None
