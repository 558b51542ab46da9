"""rules.toml (SPEC §4) loaded into frozen dataclasses, or refused with file, line and rule.

The dataclasses are the one place where defaults live: the loader passes on only what the
file says. Validation is strict because a routing mistake is found late and costs images: an
unknown key, a typo in a target or keyword name, or a bad duration stops `rules check` and
`route` at startup with `rules.toml:12: rule "ct-to-pacs": unknown target "pcas"`, exit 3.

tomllib gives no line numbers, so `_Lines` finds them in the raw text: the header of the n-th
`[[rules]]`, of `[targets.NAME]`, and the line of a key inside such a block.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercli.deid.model import OPTIONS as DEIDENTIFY_OPTIONS
from mercli.dicom.convert.syntaxes import (
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    LOSSY,
    RLE_LOSSLESS,
    SYNTAXES,
)
from mercli.errors import ConfigError
from mercli.jobs import (
    CONTAINERS,
    HOPS_KEY,
    NORMAL,
    PRIORITIES,
    Module,
    OffpeakWindow,
    Target,
    highest_priority,
    processing_record,
)
from mercli.notify import CHANNEL_TYPES
from mercli.notify.channels import (
    ALLOWED_EVENTS,
    DEFAULT_EVENTS,
    Channel,
    Subscription,
    TemplateProblem,
    check_templates,
    subscriptions_json,
)
from mercli.rules.tables import Lines, Table
from mercli.secrets import env_reference

if TYPE_CHECKING:  # expr imports pydicom's dictionary: only loading rules needs it, not Target
    from mercli.rules.expr import Expression

__all__ = [
    "PURGE_STATES",
    "TARGET_TYPES",
    "PurgeSettings",
    "RouteSettings",
    "Rule",
    "RuleSet",
    "load_rules",
]

TRANSFER_SYNTAX_NAMES = {  # friendlier spellings of the UIDs transfer_syntax takes
    "implicit-little-endian": IMPLICIT_LE,
    "explicit-little-endian": EXPLICIT_LE,
    "deflated-explicit-little-endian": DEFLATED_LE,
    "rle-lossless": RLE_LOSSLESS,
    "jpeg-ls-lossless": JPEG_LS_LOSSLESS,
    "jpeg-2000-lossless": JPEG_2000_LOSSLESS,
    "jpeg-ls-near-lossless": JPEG_LS_NEAR_LOSSLESS,
    "jpeg-2000": JPEG_2000,
    "jpeg-baseline": JPEG_BASELINE,
}
TARGET_TYPES = ("dicom", "folder", "dicomweb", "sftp", "s3")
_RETRY_KEYS = ("retry_delay", "retry_backoff", "retry_max_delay", "max_attempts", "max_age")
_TLS_KEYS = ("tls_ca", "tls_cert", "tls_key")
_TARGET_KEYS = {
    "dicom": (
        *("type", "host", "port", "called_aet", "calling_aet", "ordered", "timeout", "tls"),
        *_TLS_KEYS,
    ),
    "folder": ("type", "path", "link"),
    "dicomweb": (
        *("type", "url", "auth", "username", "password", "password_file", "token"),
        *("token_file", "batch", "timeout", *_TLS_KEYS),
    ),
    "sftp": (
        *("type", "host", "port", "user", "key_file", "password", "password_file"),
        *("known_hosts", "path", "timeout"),
    ),
    "s3": (
        *("type", "bucket", "prefix", "endpoint_url", "region", "credentials_file", "profile"),
        *("timeout", "tls_ca"),
    ),
}
AUTH_KINDS = ("none", "basic", "bearer")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_EMAIL = re.compile(r"[^@\s<>,;]{1,64}@[A-Za-z0-9.-]{1,253}")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_NOTIFY_KEYS = ("notify", "notify_on")
_DEID_KEYS = (
    *("deidentify", "deidentify_options", "pseudonym_secret_file", "allow_burned_in"),
    "keep_private",
)
_EDIT_KEYS = (*_DEID_KEYS, "modify", "transfer_syntax", "allow_lossy")
_COMMON_TARGET_KEYS = (*_RETRY_KEYS, "priority", *_NOTIFY_KEYS, *_EDIT_KEYS)
DEIDENTIFY_OPTION_ALIASES = {  # SPEC §5.1's example name -> the option it means
    "retain-longitudinal-dates": "retain-longitudinal-full-dates",
}
_RULE_KEYS = (
    *("name", "when", "targets", "action", "final", "fallback", "priority"),
    *("trigger", "action_trigger", "require", "on_timeout"),
    *("process", "process_settings", "results"),
    *_NOTIFY_KEYS,
)
_SLURM_KEYS = ("partition", "gpus", "sbatch_args")
_MODULE_KEYS = (
    *("command", "image", "container", "timeout", "settings", "env", *_RETRY_KEYS),
    *_NOTIFY_KEYS,
    "runner",
    *_SLURM_KEYS,
)
RUNNERS = ("local", "slurm")
_RUNNER_KEYS = {"slurm": (*_SLURM_KEYS, "time", "poll_max")}
_SBATCH_OWN = (  # options mercli sets itself (job name, folder, log, limit, environment)
    *("--job-name", "-J", "--chdir", "-D", "--output", "-o", "--error", "-e"),
    *("--parsable", "--wrap", "--export", "--time", "-t", "--wait", "-W"),
)
_CHANNEL_KEYS = {
    "webhook": ("type", "url", "method", "headers", "body", "content_type", "tls_ca"),
    "email": (
        *("type", "smtp_host", "smtp_port", "starttls", "tls", "user", "password"),
        *("password_file", "from", "to", "subject", "body", "tls_ca"),
    ),
}
_COMMON_CHANNEL_KEYS = ("phi", "timeout", *_RETRY_KEYS)
_HTTP_METHODS = ("POST", "PUT", "PATCH")
_MODULE_DIRS = ("MERCURE_IN_DIR", "MERCURE_OUT_DIR", "MERCLI_IN_DIR", "MERCLI_OUT_DIR")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TRIGGERS = ("series", "study")
ON_TIMEOUT = ("proceed", "discard")
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PURGE_STATES = ("success", "discard", "error")  # the spool states `mercli purge` may empty


@dataclass(frozen=True)
class RouteSettings:
    """`[route]`: when a series or study counts as complete, how long rules may take (seconds).

    A study (rules with `trigger = "study"`, SPEC §4.1) is complete `study_settle` after the
    association of its last held series ended once every `require` is met, or `study_timeout`
    after its last held series.

    `rule_timeout` bounds the evaluation of all rules on one series, `re()` included; a series
    that exceeds it goes to error/ naming the rule (SPEC §9). `offpeak` is the local time
    window (`22:00-06:00`) in which `priority = "offpeak"` jobs may be sent (SPEC §4.1);
    without it no rule or target may be offpeak.
    """

    series_timeout: float = 60.0
    settle: float = 2.0
    study_timeout: float = 900.0
    study_settle: float = 10.0
    rule_timeout: float = 2.0
    offpeak: OffpeakWindow | None = None


@dataclass(frozen=True)
class PurgeSettings:
    """`[purge]`: how long finished items are kept (seconds) before `mercli purge` deletes them.

    `error` is None by default: failed items are evidence, kept until someone asks for their
    retention explicitly (here, or with `mercli purge --state error --older-than`).
    """

    success: float = 3 * 86400.0
    discard: float = 3 * 86400.0
    error: float | None = None

    def retention(self, state: str) -> float | None:
        """The retention of one of PURGE_STATES; None: not purged by retention."""
        value: float | None = getattr(self, state)
        return value


@dataclass(frozen=True)
class Rule:
    """One `[[rules]]` entry; `when` None means always true. `line` is its header's line."""

    name: str
    when: Expression | None
    targets: tuple[str, ...] = ()
    action: str = "route"
    final: bool = False
    fallback: bool = False
    line: int = 0
    priority: str = NORMAL
    trigger: str = "series"
    require: tuple[Expression, ...] = ()
    on_timeout: str = "proceed"
    process: tuple[str, ...] = ()
    process_settings: Mapping[str, Any] = field(default_factory=dict, hash=False)
    results: str | None = None
    notify: tuple[str, ...] = ()
    notify_on: tuple[str, ...] = ()

    @property
    def study(self) -> bool:
        """True for `trigger = "study"`: matching series are held until the study is complete."""
        return self.trigger == "study"

    @property
    def discard(self) -> bool:
        """True for `action = "discard"`."""
        return self.action == "discard"


@dataclass(frozen=True)
class RuleSet:
    """A whole rules file. `keywords` are those any rule reads, sorted; `cache` is decide's;
    `notify_cache` holds the subscriptions worked out for routing (a few entries per rule)."""

    settings: RouteSettings
    targets: Mapping[str, Target]
    rules: tuple[Rule, ...]
    path: Path
    purge: PurgeSettings = field(default_factory=PurgeSettings)
    modules: Mapping[str, Module] = field(default_factory=dict)
    notify: Mapping[str, Channel] = field(default_factory=dict)
    keywords: tuple[str, ...] = field(init=False)
    cache: dict[Any, Any] = field(init=False, repr=False, compare=False, default_factory=dict)
    notify_cache: dict[Any, Any] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        used = {kw for rule in self.rules if rule.when for kw in rule.when.keywords}
        used |= {kw for rule in self.rules for need in rule.require for kw in need.keywords}
        if any(rule.process for rule in self.rules):
            used |= {"SenderAET", HOPS_KEY}  # the loop guard reads them (SPEC §7)
        object.__setattr__(self, "keywords", tuple(sorted(used)))

    def job_priority(self, target: str, rules: Iterable[str]) -> str:
        """A job's priority: the highest of the matched `rules` naming the target and of the
        target's own `priority`, if it has one."""
        named = set(rules)
        own = self.targets[target].priority
        return highest_priority(
            ([own] if own else [])
            + [r.priority for r in self.rules if r.name in named and target in r.targets]
        )

    def processing_job(
        self, rule_name: str, record: Mapping[str, Any], hops: int
    ) -> dict[str, Any]:
        """job.json of the processing job a rule with `process` makes from a series or study
        `record` (`mercli.jobs.processing_record`); `hops` counts this run."""
        rule = next(rule for rule in self.rules if rule.name == rule_name)
        made = processing_record(
            record,
            [self.modules[name] for name in rule.process],
            [self.targets[name] for name in rule.targets],
            results=rule.results,
            settings=rule.process_settings,
            hops=hops,
            priority=rule.priority,
        )
        own = [*self.subscriptions(rule)]
        for name in rule.process:
            own += self.subscriptions(self.modules[name])
        if own:
            made["notify"] = subscriptions_json(own)
        outputs = {name: self.job_subscriptions(name, [rule.name]) for name in rule.targets}
        if any(outputs.values()):
            made["notify_targets"] = outputs
        return made

    def subscriptions(self, owner: Rule | Target | Module) -> tuple[Subscription, ...]:
        """What a rule, target or module asked to be notified of, per channel."""
        key = (type(owner).__name__, owner.name)
        made = self.notify_cache.get(key)
        if made is None:  # asked once per routed series and rule: worked out once
            made = tuple(
                Subscription(self.notify[name], owner.notify_on)
                for name in owner.notify
                if name in self.notify
            )
            self.notify_cache[key] = made  # one entry per rule, target and module
        return made

    def rules_named(self, names: Iterable[str]) -> list[Rule]:
        wanted = set(names)
        return [rule for rule in self.rules if rule.name in wanted]

    def job_subscriptions(self, target: str, rules: Iterable[str]) -> list[dict[str, Any]]:
        """job.json's `notify` for a job to `target`: the target's own subscriptions and
        those of the matched rules that name it (delivered and failed only)."""
        key = (target, tuple(rules))
        made = self.notify_cache.get(key)
        if made is None:  # the same few answers for every series a rule set routes
            found = [*self.subscriptions(self.targets[target])]
            for rule in self.rules_named(key[1]):
                if target in rule.targets:
                    found += self.subscriptions(rule)
            wanted = {"delivered", "failed"}
            made = [data for data in subscriptions_json(found) if set(data["on"]) & wanted]
            if len(self.notify_cache) < 4096:
                self.notify_cache[key] = made
        return list(made)  # shared records: written into job.json, never changed

    @property
    def offpeak_window(self) -> str | None:
        """`[route] offpeak` as job.json carries it, or None."""
        window = self.settings.offpeak
        return None if window is None else str(window)


def load_rules(path: str | os.PathLike[str]) -> RuleSet:
    """Read and validate a rules file; ConfigError naming file, line and rule on any problem."""
    label = os.fspath(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read rules: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text ({exc.reason})") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        where = f"{label}:{found.group(1)}" if found else label
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc
    return _Loader(Path(path), Lines(label, text)).load(document)


class _Loader:
    """Builds a RuleSet from the parsed document, one section at a time."""

    def __init__(self, path: Path, lines: Lines) -> None:
        self.path = path
        self.lines = lines
        self.offpeak: OffpeakWindow | None = None
        self.channels: dict[str, Channel] = {}
        self.runners: dict[str, dict[str, Any]] = {}

    def load(self, document: dict[str, Any]) -> RuleSet:
        """Validate the top level, then [route], [purge], [targets.*] and [[rules]]."""
        top = Table(document, self.lines, None, "")
        top.check_keys(("route", "purge", "notify", "targets", "runners", "modules", "rules"))
        settings = self.settings(top.table("route", self.lines.table("route")))
        notify_table = top.table("notify", self.lines.table("notify"))
        self.channels = {
            name: self.channel(name, notify_table.table(name, self.lines.table(f"notify.{name}")))
            for name in notify_table.raw
        }
        self.offpeak = settings.offpeak
        purge = self.purge(top.table("purge", self.lines.table("purge")))
        targets_table = top.table("targets", self.lines.table("targets"))
        targets = {
            name: self.target(name, targets_table.table(name, self.lines.table(f"targets.{name}")))
            for name in targets_table.raw
        }
        self.runners = self.runner_settings(top.table("runners", self.lines.table("runners")))
        modules_table = top.table("modules", self.lines.table("modules"))
        modules = {
            name: self.module(name, modules_table.table(name, self.lines.table(f"modules.{name}")))
            for name in modules_table.raw
        }
        rules = self.rules(top, targets, modules)
        return RuleSet(
            settings, targets, rules, self.path.absolute(), purge, modules, self.channels
        )

    def settings(self, table: Table) -> RouteSettings:
        """`[route]`, all keys optional."""
        table.check_keys(
            ("series_timeout", "settle", "study_timeout", "study_settle", "rule_timeout", "offpeak")
        )
        positive = ("series_timeout", "rule_timeout")
        values: dict[str, Any] = {
            key: table.duration(key, positive=key in positive)
            for key in table.raw
            if key != "offpeak"
        }
        if "offpeak" in table.raw:
            try:
                values["offpeak"] = OffpeakWindow.parse(table.string("offpeak") or "")
            except ValueError as exc:
                raise table.fail("offpeak", f'"offpeak": {exc}') from None
        return RouteSettings(**values)

    def priority(self, table: Table) -> str | None:
        """`priority`, one of PRIORITIES; "offpeak" only with a `[route] offpeak` window."""
        value = table.string("priority")
        if value is not None and value not in PRIORITIES:
            allowed = ", ".join(f'"{p}"' for p in PRIORITIES)
            raise table.fail("priority", f'unknown priority "{value}" (allowed: {allowed})')
        if value == "offpeak" and self.offpeak is None:
            message = 'priority = "offpeak" needs a window: add offpeak = "22:00-06:00" to [route]'
            raise table.fail("priority", message)
        return value

    def purge(self, table: Table) -> PurgeSettings:
        """`[purge]`: a retention per finished state, all optional."""
        table.check_keys(PURGE_STATES)
        return PurgeSettings(**{key: table.duration(key) for key in table.raw})

    def target(self, name: str, table: Table) -> Target:
        """One `[targets.NAME]`, checked for its type."""
        table.context = f'target "{name}"'
        if not _TARGET_NAME.fullmatch(name):
            raise table.fail(None, "target names are letters, digits, '.', '_' and '-'")
        kind = table.string("type", required=True)
        if kind not in TARGET_TYPES:
            raise table.fail("type", f'unknown type "{kind}" (known: {", ".join(TARGET_TYPES)})')
        table.check_keys(_TARGET_KEYS[kind] + _COMMON_TARGET_KEYS)
        values: dict[str, Any] = {"name": name, "type": kind, **self.retry(table)}
        values["priority"] = self.priority(table)
        values |= self.subscriber(table, "target")
        values |= self.edits(table)
        if kind == "dicom":
            values |= _dicom(table) | self.tls(table)
        elif kind == "folder":
            values["path"] = self.folder(table.string("path", required=True))
            values["link"] = table.boolean("link") if "link" in table.raw else None
        elif kind == "dicomweb":
            values |= self.dicomweb(table)
        elif kind == "sftp":
            values |= self.sftp(table)
        else:
            values |= self.s3(table)
        if kind != "folder" and "timeout" in table.raw:
            values["timeout"] = table.duration("timeout", positive=True)
        return Target(**{key: value for key, value in values.items() if value is not None})

    def edits(self, table: Table) -> dict[str, Any]:
        """The per-target edits: de-identification, `modify`, `transfer_syntax`."""
        return self.deidentification(table) | _modify(table) | _transfer_syntax(table)

    def deidentification(self, table: Table) -> dict[str, Any]:
        """`deidentify` ("basic") with its options, secret file and exceptions."""
        given = [key for key in _DEID_KEYS if key in table.raw and key != "deidentify"]
        kind = table.string("deidentify")
        if kind is None:
            if given:
                raise table.fail(given[0], f'"{given[0]}" needs deidentify = "basic"')
            return {}
        if kind != "basic":
            message = f'deidentify must be "basic" (PS3.15 Annex E), not "{kind}"'
            raise table.fail("deidentify", message)
        options = []
        for option in table.string_list("deidentify_options"):
            option = DEIDENTIFY_OPTION_ALIASES.get(option, option)
            if option not in DEIDENTIFY_OPTIONS:
                known = ", ".join(DEIDENTIFY_OPTIONS)
                message = f'unknown option "{option}" (known: {known})'
                raise table.fail("deidentify_options", message)
            options.append(option)
        if set(DEIDENTIFY_OPTIONS[:2]) <= set(options):
            raise table.fail("deidentify_options", "full and modified dates exclude each other")
        secret = self.secret_file(table, "pseudonym_secret_file")
        if secret is None:
            message = 'deidentify needs "pseudonym_secret_file" (it keys the new UIDs)'
            raise table.fail(None, message)
        return {
            "deidentify": kind,
            "deidentify_options": tuple(_dedupe(options)),
            "pseudonym_secret_file": secret,
            "allow_burned_in": table.boolean("allow_burned_in") or None,
            "keep_private": tuple(_dedupe(table.string_list("keep_private"))),
        }

    def secret_file(self, table: Table, key: str) -> str | None:
        """A secret file's path, absolute against the rules file's folder (job.json keeps
        the path, and dispatch may run anywhere)."""
        text = table.string(key)
        if text is None:
            return None
        if not text.strip():
            raise table.fail(key, f'"{key}" is empty')
        return str(self.folder(text))

    def tls(self, table: Table, *, url: str | None = None) -> dict[str, Any]:
        """`tls` (dicom targets) and the files: CA bundle, client certificate and key."""
        on = table.boolean("tls") if url is None else url.startswith("https://")
        values: dict[str, Any] = {key: self.secret_file(table, key) for key in _TLS_KEYS}
        given = [key for key in _TLS_KEYS if values[key] is not None]
        if given and not on:
            needs = "tls = true" if url is None else "an https:// url"
            raise table.fail(given[0], f'"{given[0]}" needs {needs}')
        if values["tls_key"] and not values["tls_cert"]:
            raise table.fail("tls_key", '"tls_key" needs "tls_cert" (the client certificate)')
        if url is None:
            values["tls"] = on or None
        return values

    def dicomweb(self, table: Table) -> dict[str, Any]:
        """A STOW-RS endpoint: url, auth and its secret, batch size, TLS files."""
        url = _url(table)
        auth = table.string("auth") or "none"
        if auth not in AUTH_KINDS:
            raise table.fail("auth", f'unknown auth "{auth}" (known: {", ".join(AUTH_KINDS)})')
        values: dict[str, Any] = {"url": url.rstrip("/"), "auth": auth}
        values["batch"] = table.integer("batch", 1, 10_000)
        values["username"] = table.string("username")
        values |= self.credentials(table, auth)
        return values | self.tls(table, url=url)

    def credentials(self, table: Table, auth: str) -> dict[str, Any]:
        """The secret an auth kind needs: one of password/password_file (basic, with a
        username) or token/token_file (bearer); none for "none"."""
        wanted = {"basic": ("password", "password_file"), "bearer": ("token", "token_file")}
        allowed = wanted.get(auth, ())
        for key in ("username", "password", "password_file", "token", "token_file"):
            if (
                key in table.raw
                and key not in allowed
                and not (key == "username" and auth == "basic")
            ):
                raise table.fail(key, f'"{key}" does not go with auth = "{auth}"')
        values: dict[str, Any] = {}
        if not allowed:
            return values
        if auth == "basic" and not table.string("username"):
            raise table.fail(None, 'auth = "basic" needs "username"')
        values |= self.one_secret(table, *allowed)
        return values

    def one_secret(self, table: Table, env_key: str, file_key: str) -> dict[str, Any]:
        """Exactly one of `env_key` ("${NAME}") and `file_key` (a path)."""
        if (env_key in table.raw) == (file_key in table.raw):
            message = f'give "{file_key}" (a file) or {env_key} = "${{ENV_VAR}}", one of them'
            raise table.fail(None if env_key not in table.raw else file_key, message)
        if file_key in table.raw:
            return {file_key: self.secret_file(table, file_key)}
        value = table.string(env_key) or ""
        if env_reference(value) is None:
            message = (
                f'"{env_key}" must be "${{ENV_VAR}}": a secret written here would be copied '
                f'into every job.json; put it in "{file_key}" or the environment'
            )
            raise table.fail(env_key, message)
        return {env_key: value.strip()}

    def sftp(self, table: Table) -> dict[str, Any]:
        """An SFTP server: host, user, known_hosts (required), key and/or password."""
        values = {
            "host": _host(table),
            "port": table.integer("port", 1, 65535) or 22,
            "user": table.string("user", required=True),
            "known_hosts": self.secret_file(table, "known_hosts"),
            "key_file": self.secret_file(table, "key_file"),
            "path": Path(table.string("path") or "."),
        }
        if values["known_hosts"] is None:
            message = 'missing key "known_hosts" (unknown host keys are refused; see README)'
            raise table.fail(None, message)
        if "password" in table.raw or "password_file" in table.raw:
            values |= self.one_secret(table, "password", "password_file")
        elif values["key_file"] is None:
            raise table.fail(None, 'give "key_file" or "password_file" (or password = "${ENV}")')
        return values

    def s3(self, table: Table) -> dict[str, Any]:
        """An S3-compatible bucket: bucket, prefix, endpoint, region, credentials."""
        bucket = table.string("bucket", required=True) or ""
        if not _S3_BUCKET.fullmatch(bucket):
            raise table.fail("bucket", f"bad bucket name {bucket!r} (3-63 of a-z, 0-9, '.', '-')")
        prefix = table.string("prefix") or ""
        if prefix.startswith("/") or any(not c.isprintable() for c in prefix):
            raise table.fail("prefix", f'"prefix" must not start with "/": {prefix!r}')
        endpoint = table.string("endpoint_url")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise table.fail("endpoint_url", '"endpoint_url" must be an http(s):// URL')
        values: dict[str, Any] = {
            "bucket": bucket,
            "prefix": prefix,
            "endpoint_url": endpoint,
            "region": table.string("region"),
            "credentials_file": self.secret_file(table, "credentials_file"),
            "profile": table.string("profile"),
            "tls_ca": self.secret_file(table, "tls_ca"),
        }
        if values["tls_ca"] and endpoint and not endpoint.startswith("https://"):
            raise table.fail("tls_ca", '"tls_ca" needs an https:// endpoint_url')
        return values

    def module(self, name: str, table: Table) -> Module:
        """One `[modules.NAME]`: `command` or `image` + `container`, and how to run it."""
        table.context = f'module "{name}"'
        if not _TARGET_NAME.fullmatch(name):
            raise table.fail(None, "module names are letters, digits, '.', '_' and '-'")
        table.check_keys(_MODULE_KEYS)
        if ("command" in table.raw) == ("image" in table.raw):
            message = 'give "command" (argv, run on the host) or "image" (a container), not both'
            raise table.fail(None if "command" not in table.raw else "image", message)
        values: dict[str, Any] = {"name": name, **self.retry(table)}
        if "command" in table.raw:
            values["command"] = _argv(table)
        else:
            values |= _image(table)
        if "timeout" in table.raw:
            values["timeout"] = table.duration("timeout", positive=True)
        values["settings"] = _json_table(table, "settings")
        values["env"] = _env(table)
        values |= self.subscriber(table, "module")
        values |= self.runner(table)
        return Module(**{key: value for key, value in values.items() if value is not None})

    def runner_settings(self, table: Table) -> dict[str, dict[str, Any]]:
        """`[runners.slurm]`: the defaults of every module with runner = "slurm"."""
        table.check_keys(tuple(_RUNNER_KEYS))
        found = {}
        for name in table.raw:
            sub = table.table(name, self.lines.table(f"runners.{name}"))
            sub.context = f"[runners.{name}]"
            sub.check_keys(_RUNNER_KEYS[name])
            values = _slurm_options(sub)
            if "time" in sub.raw:
                values["timeout"] = sub.duration("time", positive=True)
            if "poll_max" in sub.raw:
                values["poll_max"] = sub.duration("poll_max", positive=True)
            found[name] = values
        return found

    def runner(self, table: Table) -> dict[str, Any]:
        """`runner` and the module's own Slurm options over [runners.slurm]'s."""
        runner = table.string("runner") or "local"
        if runner not in RUNNERS:
            raise table.fail("runner", f'unknown runner "{runner}" (known: {", ".join(RUNNERS)})')
        own = _slurm_options(table)
        if runner != "slurm":
            if own:
                key = next(iter(own))
                raise table.fail(key, f'"{key}" needs runner = "slurm"')
            return {}
        defaults = dict(self.runners.get("slurm", {}))
        if "timeout" in table.raw:
            defaults.pop("timeout", None)  # the module's own timeout is its time limit
        return {"runner": runner, **defaults, **own}

    def channel(self, name: str, table: Table) -> Channel:
        """One `[notify.NAME]`: a webhook or an email destination, templates checked."""
        table.context = f'notify "{name}"'
        if not _TARGET_NAME.fullmatch(name):
            raise table.fail(None, "channel names are letters, digits, '.', '_' and '-'")
        kind = table.string("type", required=True)
        if kind not in CHANNEL_TYPES:
            message = f'unknown type "{kind}" (known: {", ".join(CHANNEL_TYPES)})'
            raise table.fail("type", message)
        table.check_keys(_CHANNEL_KEYS[kind] + _COMMON_CHANNEL_KEYS)
        values: dict[str, Any] = {"name": name, "type": kind, **self.retry(table)}
        values["phi"] = table.boolean("phi")
        values["body"] = table.string("body")
        values["tls_ca"] = self.secret_file(table, "tls_ca")
        if "timeout" in table.raw:
            values["timeout"] = table.duration("timeout", positive=True)
        values |= self.webhook(table) if kind == "webhook" else self.email(table)
        channel = Channel(**{key: value for key, value in values.items() if value is not None})
        try:
            check_templates(channel)
        except TemplateProblem as exc:
            raise table.fail("body" if "body" in str(exc)[:5] else "subject", str(exc)) from None
        return channel

    def webhook(self, table: Table) -> dict[str, Any]:
        url = _url(table)
        if url.startswith("http://") and "tls_ca" in table.raw:
            raise table.fail("tls_ca", '"tls_ca" needs an https:// url')
        method = (table.string("method") or "POST").upper()
        if method not in _HTTP_METHODS:
            raise table.fail("method", f'"method" must be one of {", ".join(_HTTP_METHODS)}')
        headers = table.raw.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise table.fail("headers", '"headers" must be a table of strings')
        for key, value in headers.items():
            if not _HEADER_NAME.fullmatch(key) or any(c in value for c in "\r\n\0"):
                raise table.fail("headers", f"bad header {key!r}")
            if key.lower() in ("authorization", "x-api-key") and env_reference(value) is None:
                message = (
                    f'header "{key}" must be "${{ENV_VAR}}": a secret written here would be '
                    "copied into every notification"
                )
                raise table.fail("headers", message)
        return {
            "url": url,
            "method": method,
            "headers": dict(headers),
            "content_type": table.string("content_type"),
        }

    def email(self, table: Table) -> dict[str, Any]:
        starttls, tls = table.boolean("starttls"), table.boolean("tls")
        if starttls and tls:
            raise table.fail("tls", "give starttls = true or tls = true (implicit TLS), not both")
        values: dict[str, Any] = {
            "smtp_host": _host_key(table, "smtp_host"),
            "smtp_port": table.integer("smtp_port", 1, 65535) or (465 if tls else 587),
            "starttls": starttls,
            "tls": tls,
            "user": table.string("user"),
            "sender": _address(table, "from", required=True),
            "to": tuple(_address(table, "to", value=v) for v in table.string_list("to")),
            "subject": table.string("subject"),
        }
        if not values["to"]:
            raise table.fail(None, 'missing key "to" (a list of addresses)')
        if "password" in table.raw or "password_file" in table.raw:
            if values["user"] is None:
                raise table.fail(None, 'a password needs "user"')
            values |= self.one_secret(table, "password", "password_file")
            if not (starttls or tls):
                message = "a password needs starttls = true or tls = true (never sent in clear)"
                raise table.fail(None, message)
        return values

    def subscriber(self, table: Table, kind: str) -> dict[str, Any]:
        """`notify` (known channels) and `notify_on` (events this kind has; a default)."""
        names = _dedupe(table.string_list("notify"))
        for name in names:
            if name not in self.channels:
                known = _known(name, self.channels, "notify")
                raise table.fail("notify", f'unknown notification channel "{name}"{known}')
        events = _dedupe(table.string_list("notify_on"))
        if events and not names:
            raise table.fail("notify_on", '"notify_on" needs notify = ["channel", ...]')
        allowed = ALLOWED_EVENTS[kind]
        for event in events:
            if event not in allowed:
                message = f'a {kind} cannot notify on "{event}" (it can: {", ".join(allowed)})'
                raise table.fail("notify_on", message)
        if not names:
            return {}
        return {"notify": names, "notify_on": events or DEFAULT_EVENTS[kind]}

    def retry(self, table: Table) -> dict[str, Any]:
        """The retry keys every target type has."""
        values: dict[str, Any] = {}
        for key in ("retry_delay", "retry_max_delay", "max_age"):
            values[key] = table.duration(key) if key in table.raw else None
        values["retry_backoff"] = table.number("retry_backoff", minimum=1.0)
        values["max_attempts"] = table.integer("max_attempts", 0, 1_000_000)
        return values

    def folder(self, text: str | None) -> Path:
        """A folder target's path, made absolute against the rules file's folder."""
        path = Path(os.path.expanduser(text or ""))
        return Path(os.path.normpath(self.path.parent.absolute() / path))

    def rules(
        self, top: Table, targets: Mapping[str, Target], modules: Mapping[str, Module]
    ) -> tuple[Rule, ...]:
        """Every `[[rules]]`, with unique names and known targets."""
        raw = top.raw.get("rules", [])
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise top.fail("rules", "rules must be [[rules]] tables")
        if not raw:
            raise top.fail(None, "no [[rules]]: every series would be discarded")
        seen: dict[str, int] = {}
        result = []
        for index, item in enumerate(raw):
            table = Table(item, self.lines, self.lines.rule(index), f"rule #{index + 1}")
            rule = self.rule(table, targets, modules)
            if rule.name in seen:
                message = f"duplicate rule name (first used at line {seen[rule.name]})"
                raise table.fail("name", message)
            seen[rule.name] = rule.line
            result.append(rule)
        return tuple(result)

    def rule(
        self, table: Table, targets: Mapping[str, Target], modules: Mapping[str, Module]
    ) -> Rule:
        """One rule: keys, expression, action and targets."""
        table.check_keys(_RULE_KEYS)
        name = table.string("name", required=True) or ""
        if not name.strip() or not name.isprintable():
            raise table.fail("name", "a rule name must be non-empty printable text")
        table.context = f'rule "{name}"'
        action = table.string("action") or "route"
        if action not in ("route", "discard"):
            raise table.fail("action", f'action must be "route" or "discard", not "{action}"')
        names = _dedupe(table.string_list("targets"))
        if action == "discard" and names:
            raise table.fail("targets", 'a rule with action = "discard" cannot have targets')
        priority = self.priority(table)  # on a discard rule: checked, then without effect
        processing = self.processing(table, action, modules)
        if processing.get("results") == "route" and names:
            message = 'results = "route" sends the output back through the rules: no targets'
            raise table.fail("targets", message)
        if action == "route" and not names and "results" not in processing:
            if processing:
                message = 'no targets for the output (add targets = [...], or results = "route")'
                raise table.fail(None, message)
            raise table.fail(None, 'no targets (add targets = [...], or action = "discard")')
        for target in names:
            if target not in targets:
                raise table.fail("targets", f'unknown target "{target}"{_known(target, targets)}')
        return Rule(
            name=name,
            when=self.expression(table),
            targets=names,
            action=action,
            final=table.boolean("final"),
            fallback=table.boolean("fallback"),
            line=table.line or 0,
            priority=priority or NORMAL,
            **self.study(table, action),
            **processing,
            **self.subscriber(table, "rule"),
        )

    def processing(
        self, table: Table, action: str, modules: Mapping[str, Module]
    ) -> dict[str, Any]:
        """`process` (a chain of known modules, none twice), `process_settings`, `results`."""
        chain = table.string_list("process")
        if not chain:
            for only in ("process_settings", "results"):
                if only in table.raw:
                    raise table.fail(only, f'"{only}" needs process = ["module", ...]')
            return {}
        if action == "discard":
            raise table.fail("process", 'a rule with action = "discard" cannot process')
        for index, name in enumerate(chain):
            if name not in modules:
                known = _known(name, modules, "modules")
                raise table.fail("process", f'unknown module "{name}"{known}')
            if name in chain[:index]:
                message = f'module "{name}" twice in the chain (a loop): a module runs once'
                raise table.fail("process", message)
        values: dict[str, Any] = {"process": tuple(chain)}
        values["process_settings"] = _json_table(table, "process_settings")
        results = table.string("results")
        if results is not None:
            if results != "route":
                raise table.fail("results", f'results must be "route", not "{results}"')
            values["results"] = results
        return values

    def study(self, table: Table, action: str) -> dict[str, Any]:
        """`trigger` (or mercure's `action_trigger`), and the study-only `require`, `on_timeout`."""
        if "trigger" in table.raw and "action_trigger" in table.raw:
            raise table.fail("action_trigger", 'give "trigger" or "action_trigger", not both')
        key = "action_trigger" if "action_trigger" in table.raw else "trigger"
        trigger = table.string(key) or "series"
        if trigger not in TRIGGERS:
            raise table.fail(key, f'{key} must be "series" or "study", not "{trigger}"')
        if trigger != "study":
            for only in ("require", "on_timeout"):
                if only in table.raw:
                    raise table.fail(only, f'"{only}" needs trigger = "study"')
            return {}
        if action == "discard":
            raise table.fail(key, 'a study rule cannot have action = "discard"')
        on_timeout = table.string("on_timeout") or "proceed"
        if on_timeout not in ON_TIMEOUT:
            message = f'on_timeout must be "proceed" or "discard", not "{on_timeout}"'
            raise table.fail("on_timeout", message)
        from mercli.rules.expr import ExpressionError, compile_expression

        require = []
        for text in _dedupe(table.string_list("require")):
            try:
                require.append(compile_expression(text))
            except ExpressionError as exc:
                raise table.fail("require", f"bad require expression {text!r}: {exc}") from None
        return {"trigger": trigger, "require": tuple(require), "on_timeout": on_timeout}

    def expression(self, table: Table) -> Expression | None:
        """The compiled `when`, or None when the rule has none."""
        text = table.string("when")
        if text is None:
            return None
        from mercli.rules.expr import ExpressionError, compile_expression

        try:
            return compile_expression(text)
        except ExpressionError as exc:
            raise table.fail("when", f"bad expression: {exc}") from None


def _url(table: Table) -> str:
    """An http(s) URL without credentials in it (they would be copied into every job)."""
    url = (table.string("url", required=True) or "").strip()
    if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        shown = url if "@" not in url else url.split("://", 1)[0] + "://..."
        raise table.fail("url", f'"url" must be an http:// or https:// URL, not {shown!r}')
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        message = '"url" must not hold a user or password (use auth and password_file)'
        raise table.fail("url", message)
    return url


def _host(table: Table) -> str:
    return _host_key(table, "host")


def _host_key(table: Table, key: str) -> str:
    host = table.string(key, required=True) or ""
    if not host.strip() or any(ch.isspace() or not ch.isprintable() for ch in host):
        raise table.fail(key, f"bad host {host!r}")
    return host


def _address(table: Table, key: str, *, required: bool = False, value: str | None = None) -> str:
    """An email address: something@something, printable, no spaces or line breaks."""
    text = table.string(key, required=required) if value is None else value
    if text is None:
        return ""
    if not _EMAIL.fullmatch(text):
        raise table.fail(key, f"bad email address {text!r}")
    return text


def _dicom(table: Table) -> dict[str, Any]:
    """The keys of a dicom target (TLS aside)."""
    return {
        "host": _host(table),
        "port": table.integer("port", 1, 65535, required=True),
        "called_aet": table.ae_title("called_aet", required=True),
        "calling_aet": table.ae_title("calling_aet"),
        "ordered": table.boolean("ordered") if "ordered" in table.raw else None,
    }


def _argv(table: Table) -> tuple[str, ...]:
    """`command`: a non-empty list of strings, the first one not empty."""
    value = table.raw["command"]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise table.fail("command", '"command" must be a list of strings (argv, no shell)')
    if not value or not value[0].strip():
        raise table.fail("command", '"command" must name a program first')
    return tuple(value)


def _image(table: Table) -> dict[str, Any]:
    """`image` and its `container` engine."""
    image = table.string("image", required=True) or ""
    if not image.strip() or any(ch.isspace() or not ch.isprintable() for ch in image):
        raise table.fail("image", f"bad image {image!r}")
    container = table.string("container")
    if container is None:
        engines = ", ".join(f'"{name}"' for name in CONTAINERS)
        raise table.fail(None, f'"image" needs container = {engines}')
    if container not in CONTAINERS:
        message = f'unknown container "{container}" (known: {", ".join(CONTAINERS)})'
        raise table.fail("container", message)
    return {"image": image, "container": container}


def _json_table(table: Table, key: str) -> dict[str, Any]:
    """A table handed to a module as JSON: no TOML dates or times in it."""
    value = table.raw.get(key, {})
    if not isinstance(value, dict):
        raise table.fail(key, f'"{key}" must be a table ({key} = {{...}})')
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        message = f'"{key}" must hold strings, numbers, booleans, arrays and tables only'
        raise table.fail(key, message + " (no dates, inf or nan)") from None
    return value


def _env(table: Table) -> dict[str, str]:
    """`env`: variable names to strings; the in/out folder variables are mercli's own."""
    value = table.raw.get("env", {})
    if not isinstance(value, dict):
        raise table.fail("env", '"env" must be a table (env = { NAME = "value" })')
    for name, item in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise table.fail("env", f"bad environment variable name {name!r}")
        if name in _MODULE_DIRS:
            raise table.fail("env", f'"{name}" is set by mercli, not by env')
        if not isinstance(item, str) or "\0" in item:
            raise table.fail("env", f'env "{name}" must be a string (quote numbers)')
    return dict(value)


def _dedupe(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _known(name: str, defined: Mapping[str, object], section: str = "targets") -> str:
    close = difflib.get_close_matches(name, list(defined), n=1)
    if close:
        return f' (did you mean "{close[0]}"?)'
    return f" (defined: {', '.join(defined)})" if defined else f" (no [{section}] defined)"


def _modify(table: Table) -> dict[str, Any]:
    """`modify = { Keyword = "value", "(gggg,eeee)" = "delete", ... }`, each value checked
    against the attribute's VR now (pydicom's dictionary: loaded only when the key is used)."""
    if "modify" not in table.raw:
        return {}
    raw = table.raw["modify"]
    if not isinstance(raw, dict) or not raw:
        message = 'modify must be a table such as { InstitutionName = "RESEARCH" }'
        raise table.fail("modify", message)
    from mercli.dicom.modify import ModifyError, parse_modify

    try:
        parse_modify(raw)
    except ModifyError as exc:
        raise table.fail("modify", f"modify: {exc}") from None
    return {"modify": tuple(raw.items())}


def _transfer_syntax(table: Table) -> dict[str, Any]:
    """`transfer_syntax`: a UID (or a name of TRANSFER_SYNTAX_NAMES); lossy ones only with
    `allow_lossy = true`."""
    lossy = table.boolean("allow_lossy")
    text = table.string("transfer_syntax")
    if text is None:
        if lossy:
            raise table.fail("allow_lossy", '"allow_lossy" needs a lossy transfer_syntax')
        return {}
    syntax = TRANSFER_SYNTAX_NAMES.get(text.lower(), text)
    if syntax not in SYNTAXES:
        known = ", ".join(f"{uid} ({name})" for name, uid in TRANSFER_SYNTAX_NAMES.items())
        message = f'unknown or unsupported transfer_syntax "{text}" (known: {known})'
        raise table.fail("transfer_syntax", message)
    if syntax in LOSSY and not lossy:
        message = (
            f'transfer_syntax "{text}" is lossy: it changes pixel values for good; '
            "set allow_lossy = true if that is what the target needs"
        )
        raise table.fail("transfer_syntax", message)
    return {"transfer_syntax": syntax, "allow_lossy": lossy or None}


def _slurm_options(table: Table) -> dict[str, Any]:
    """`partition`, `gpus` ("2", "a100:1") and `sbatch_args` (options only; the ones mercli
    sets itself, such as --output and --time, are refused)."""
    values: dict[str, Any] = {}
    for key in ("partition", "gpus"):
        text = table.string(key)
        if text is None:
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.:,-]{1,64}", text):
            raise table.fail(key, f'bad {key} {text!r} (letters, digits, "_.:,-")')
        values[key] = text
    if "sbatch_args" in table.raw:
        args = table.string_list("sbatch_args")
        for arg in args:
            if not arg.startswith("-") or any(c in arg for c in "\n\r\0"):
                raise table.fail(
                    "sbatch_args", f"sbatch_args are options (--name=value), not {arg!r}"
                )
            if arg.split("=", 1)[0] in _SBATCH_OWN:
                message = f"{arg.split('=', 1)[0]} is set by mercli (job name, folder, log, limit)"
                raise table.fail("sbatch_args", message)
        values["sbatch_args"] = tuple(args)
    return values
