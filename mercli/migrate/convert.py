"""mercure.json (its `Config` model) as the blocks of a mercli rules.toml.

`convert(config, excluded)` is pure: it returns the blocks, the secret files to write and a
`Report`. `excluded` lists items (("target"|"module"|"rule"|"notify", mercure name) ->
reason) that an earlier attempt produced and `load_rules` refused; they are left out (rules:
kept commented out) and reported, so one bad item never costs the whole file.

The mapping, item by item, is in `mercli.migrate`'s docstring and README "Coming from
mercure".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mercli.errors import ConfigError
from mercli.migrate.common import PROCESSED, State, slug
from mercli.migrate.report import Report
from mercli.migrate.rules import RuleConverter
from mercli.migrate.targets import convert_target
from mercli.migrate.toml_out import Block, key

__all__ = ["Conversion", "NotMercure", "check_config", "convert"]

_ACTIONS = ("route", "both", "process", "discard", "notification")
_MARKERS = ("series_complete_trigger", "study_complete_trigger", "incoming_folder", "modules")
_NOT_NEEDED = {  # mercure settings with no mercli counterpart to set, and why
    **dict.fromkeys(
        (
            *("incoming_folder", "studies_folder", "outgoing_folder", "success_folder"),
            *("error_folder", "discard_folder", "processing_folder", "jobs_folder"),
        ),
        "one --spool DIR holds every state",
    ),
    **dict.fromkeys(
        ("router_scan_interval", "dispatcher_scan_interval", "cleaner_scan_interval"),
        "mercli wakes on file events and rescans every few seconds",
    ),
    **dict.fromkeys(
        ("bookkeeper", "bookkeeper_api_key"), "the event log in the spool + `mercli log`"
    ),
    **dict.fromkeys(("appliance_name", "appliance_color", "features"), "web UI only"),
    **dict.fromkeys(("server_time", "local_time"), "mercli uses the host's local time"),
    "accept_compressed_images": "mercli receive accepts the compressed transfer syntaxes",
    "support_root_modules": "mercli never runs modules as root",
    "processing_logs": "module logs are kept with each processing job (module.log)",
    "processing_runtime": "modules run with `container` (docker|podman|apptainer)",
    "store_sample_dicom_tags": "`mercli tags FILE` prints a sidecar",
    "persistence_folder": "see modules' requires_persistence",
}
_CARRIED = (
    *("targets", "rules", "modules", "port", "retention", "retry_delay", "retry_max"),
    *("series_complete_trigger", "study_complete_trigger", "study_forcecomplete_trigger"),
    *("offpeak_start", "offpeak_end", "dicom_receiver", "phi_notifications"),
    *("email_notification_from", "webhook_certificate_location", "process_runner"),
    *("emergency_clean_percentage", "graphite_ip", "graphite_port", "influxdb_host"),
    *("influxdb_token", "influxdb_org", "influxdb_bucket", "dicom_retrieve"),
)


class NotMercure(ConfigError):
    """The input is not a mercure configuration (exit 3, as any unusable config)."""


@dataclass
class Conversion:
    blocks: list[Block]
    secrets: dict[str, bytes]
    report: Report
    commands: list[str] = field(default_factory=list)  # how to run the stages afterwards


def check_config(document: Any, label: str) -> Mapping[str, Any]:
    """The document if it looks like mercure.json, else NotMercure naming why."""
    if not isinstance(document, dict):
        raise NotMercure(f"{label}: not a mercure configuration (not a JSON object)")
    for name in ("targets", "rules"):
        if not isinstance(document.get(name), dict):
            message = f'not a mercure configuration (no "{name}" object)'
            raise NotMercure(f"{label}: {message}")
    if not any(name in document for name in _MARKERS):
        found = ", ".join(f'"{name}"' for name in _MARKERS)
        raise NotMercure(f"{label}: not a mercure configuration (none of {found})")
    return document


def duration(seconds: Any) -> str | None:
    """`90s`, `15m`, `2h`, `3d` for a whole number of seconds; None if it is not one."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return None
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds}s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def convert(
    config: Mapping[str, Any], excluded: Mapping[tuple[str, str], str] | None = None
) -> Conversion:
    """The rules.toml blocks for a checked mercure configuration."""
    return _Converter(config, dict(excluded or {})).run()


class _Converter(State):
    def __init__(self, config: Mapping[str, Any], excluded: dict[tuple[str, str], str]) -> None:
        super().__init__(config, excluded)

    def run(self) -> Conversion:
        for (kind, name), reason in self.excluded.items():
            self.report.dropped(f'{kind} "{name}"', f"refused by mercli: {reason}")
        head = self.settings()
        self.targets()
        self.modules()
        self.rules()
        if self.processed_needed:
            self.processed_target()
        blocks = [self.header(), *head, *self.blocks["notify"], *self.blocks["targets"]]
        blocks += [*self.blocks["modules"], *self.blocks["rules"]]
        return Conversion(blocks, dict(self.secrets.files), self.report, self.commands())

    # -- settings ----------------------------------------------------------------------------

    def settings(self) -> list[Block]:
        config, report = self.config, self.report
        for name in config:
            if name in _NOT_NEEDED:
                continue
            if name not in _CARRIED:
                report.dropped("settings", f'unknown mercure setting "{name}"')
        for name in ("graphite_ip", "influxdb_host"):
            if config.get(name):
                report.dropped("settings", f"{name}: use `mercli metrics` (Prometheus) instead")
        retrieve = config.get("dicom_retrieve")
        if isinstance(retrieve, Mapping) and (retrieve.get("dicom_nodes") or []):
            report.dropped("settings", "dicom_retrieve: mercli does not query/retrieve")
        route = Block("[route]", comments=["timing, from mercure's triggers"])
        series = config.get("series_complete_trigger")
        if series == 0:
            report.dropped("settings", "series_complete_trigger 0: mercli needs a timeout")
        else:
            route.add("series_timeout", duration(series))
        route.add("study_timeout", self.study_timeout())
        route.add("offpeak", self.offpeak_window())
        purge = Block("[purge]", comments=["mercure's retention: success and discard folders"])
        kept = duration(config.get("retention"))
        if kept:
            purge.add("success", kept)
            purge.add("discard", kept)
        return [block for block in (route, purge) if block.pairs]

    def header(self) -> Block:
        return Block(
            comments=[
                "rules.toml written by `mercli import-mercure` from a mercure configuration.",
                "Check it with `mercli rules check rules.toml` and try it with",
                "`mercli rules test rules.toml some/series/` before switching over.",
                "Run the stages with:",
                *(f"  {command}" for command in self.commands()),
            ]
        )

    def commands(self) -> list[str]:
        port = self.config.get("port")
        receive = f"mercli receive --port {port if isinstance(port, int) else 11112}"
        receiver = self.config.get("dicom_receiver")
        extra = receiver.get("additional_tags") if isinstance(receiver, Mapping) else None
        for tag in extra if isinstance(extra, Mapping) else {}:
            receive += f" --extra-tag {tag}"
        commands = [receive, "mercli route --rules rules.toml", "mercli dispatch"]
        if self.config.get("modules"):
            commands.append("mercli process")
        if self.blocks["notify"]:
            commands.append("mercli notify")
        commands.append("mercli purge --once   # from cron" + self.keep_free())
        return commands

    def keep_free(self) -> str:
        used = self.config.get("emergency_clean_percentage")
        if isinstance(used, int) and not isinstance(used, bool) and 0 < used < 100:
            return f"; disk pressure: mercli purge --keep-free {100 - used}%"
        return ""

    def study_timeout(self) -> str | None:
        """study_complete_trigger; study_forcecomplete_trigger when only received-series
        study rules exist (mercure waits that long for them)."""
        rules = [r for r in self.config["rules"].values() if isinstance(r, Mapping)]
        study = [r for r in rules if r.get("action_trigger") == "study" and not r.get("disabled")]
        by_series = [
            r
            for r in study
            if r.get("study_trigger_condition") == "received_series"
            and r.get("study_trigger_series")
        ]
        if by_series:
            self.report.changed(
                "settings",
                "a study waiting for its series gives up study_timeout after its last series "
                "(mercure: study_forcecomplete_trigger after its first)",
            )
        if by_series and len(by_series) == len(study):
            return duration(self.config.get("study_forcecomplete_trigger"))
        return duration(self.config.get("study_complete_trigger"))

    def offpeak_window(self) -> str | None:
        from mercli.jobs import OffpeakWindow

        start, end = self.config.get("offpeak_start"), self.config.get("offpeak_end")
        if not start or not end:
            return None
        window = f"{start}-{end}"
        try:
            OffpeakWindow.parse(window)
        except ValueError as exc:
            self.report.dropped("settings", f"offpeak hours: {exc}")
            return None
        self.offpeak = window
        return window

    # -- targets and modules -----------------------------------------------------------------

    def targets(self) -> None:
        retry = self.retry()
        for name, target in self.config["targets"].items():
            if ("target", name) in self.excluded:
                self.lost_targets.add(name)
                continue
            table = convert_target(name, target, self.report, self.secrets)
            if table is None:
                kind = target.get("target_type") if isinstance(target, Mapping) else None
                (self.dummies if kind == "dummy" else self.lost_targets).add(name)
                continue
            ours = slug(name, self.taken["targets"])
            self.target_names[name] = ours
            block = Block(f"[targets.{key(ours)}]", origin=("target", name))
            block.comments.append(
                f'mercure target "{name}"' + (" (renamed)" if ours != name else "")
            )
            block.comments += _notes(target)
            for item, value in {**table, **retry}.items():
                block.add(item, value)
            self.blocks["targets"].append(block)

    def retry(self) -> dict[str, Any]:
        delay, most = self.config.get("retry_delay"), self.config.get("retry_max")
        values: dict[str, Any] = {}
        if duration(delay):
            values |= {"retry_delay": duration(delay), "retry_backoff": 1.0}
        if isinstance(most, int) and not isinstance(most, bool) and most >= 1:
            values["max_attempts"] = most
        return values

    def processed_target(self) -> None:
        ours = slug(PROCESSED, self.taken["targets"])
        self.target_names["\0processed"] = ours
        block = Block(f"[targets.{key(ours)}]", origin=("target", "\0processed"))
        block.comments += [
            "mercure kept the output of 'processing only' rules in its success folder;",
            "mercli sends it to this folder target (change the path, or the rules' targets)",
        ]
        block.add("type", "folder")
        block.add("path", "processed")
        self.blocks["targets"].append(block)

    def modules(self) -> None:
        modules = self.config.get("modules") or {}
        if not isinstance(modules, Mapping):
            self.report.dropped("settings", '"modules" is not a JSON object')
            return
        runner = self.config.get("process_runner")
        if runner == "nomad":
            self.report.changed("settings", "process_runner nomad: modules run with docker")
        for name, module in modules.items():
            if ("module", name) in self.excluded:
                continue
            table = self.module(name, module)
            if table is None:
                continue
            ours = slug(name, self.taken["modules"])
            self.module_names[name] = ours
            self.module_tables[ours] = table
            block = Block(f"[modules.{key(ours)}]", origin=("module", name))
            block.comments.append(f'mercure module "{name}"')
            block.comments += _notes(module)
            for item, value in table.items():
                block.add(item, value)
            self.blocks["modules"].append(block)

    def module(self, name: str, module: Any) -> dict[str, Any] | None:
        where = f'module "{name}"'
        if not isinstance(module, Mapping) or not str(module.get("docker_tag") or "").strip():
            self.report.dropped(where, "no docker_tag: nothing to run")
            return None
        table: dict[str, Any] = {"image": str(module["docker_tag"]).strip(), "container": "docker"}
        settings = _toml_safe(module.get("settings") or {}, self.report, where)
        if settings:
            table["settings"] = settings
        env = self.environment(module.get("environment"), where)
        if env:
            table["env"] = env
        for item, why in (
            ("additional_volumes", "mercli mounts only in/ and out/"),
            ("docker_arguments", "mercli builds the docker command line itself"),
            ("constraints", "nomad constraints"),
            ("resources", "nomad resources"),
            ("requires_root", "mercli never runs modules as root"),
            ("requires_persistence", "no persistence folder in mercli"),
        ):
            if module.get(item) and module.get(item) not in ("{}", "[]"):
                self.report.dropped(where, f"{item}: {why}")
        if module.get("network_enabled", True):
            self.report.changed(where, "mercli runs containers with --network none")
        return table

    def environment(self, text: Any, where: str) -> dict[str, str]:
        if not text:
            return {}
        try:
            value = json.loads(text) if isinstance(text, str) else text
        except ValueError:
            self.report.dropped(where, "environment is not JSON")
            return {}
        if not isinstance(value, Mapping):
            self.report.dropped(where, "environment is not a JSON object")
            return {}
        found = {str(k): str(v) for k, v in value.items() if v is not None}
        for name in [n for n in found if n.startswith(("MERCURE_", "MERCLI_"))]:
            self.report.changed(where, f"environment {name}: set by mercli, left out")
            del found[name]
        return found

    # -- rules -------------------------------------------------------------------------------

    def rules(self) -> None:
        rules = self.config["rules"]
        live = [n for n, r in rules.items() if isinstance(r, Mapping) and not r.get("disabled")]
        fallbacks = [n for n in live if rules[n].get("fallback")]
        self.fallback = fallbacks[-1] if fallbacks else None
        for name, rule in rules.items():
            self.blocks["rules"] += self.rule(name, rule)
        if not any(not block.disabled for block in self.blocks["rules"]):
            block = Block("[[rules]]", origin=("rule", "\0none"))
            block.comments.append("no active mercure rule: mercure discards every series")
            block.add("name", "mercure-no-rules")
            block.add("action", "discard")
            self.blocks["rules"].append(block)

    def rule(self, name: str, rule: Any) -> list[Block]:
        return RuleConverter(self, name, rule).blocks()


def _notes(item: Any) -> list[str]:
    """Comment lines for mercure's documentation fields."""
    if not isinstance(item, Mapping):
        return []
    notes = []
    for name in ("comment", "contact", "tags"):
        if item.get(name):
            notes.append(f"{name}: {item[name]}")
    return notes


def _toml_safe(value: Any, report: Report, where: str) -> Any:
    """A JSON value TOML can hold: nulls are left out (reported)."""
    if isinstance(value, Mapping):
        out = {}
        for name, item in value.items():
            if item is None:
                report.dropped(where, f'setting "{name}" is null (TOML has no null)')
                continue
            out[str(name)] = _toml_safe(item, report, where)
        return out
    if isinstance(value, list):
        return [_toml_safe(item, report, where) for item in value if item is not None]
    if isinstance(value, float) and value != value:
        return None
    return value
