"""One mercure rule as a `[[rules]]` block (plus, sometimes, a companion rule and channels).

mercure's actions and what they become:

- `route`: `targets`. `both`: `process` + `targets`. `process` ("processing only", output
  kept in mercure's success folder): `process` + the folder target `mercure-processed`.
- `discard`: `action = "discard"` (in both, a matching discard rule discards the series,
  whatever else matched).
- `notification`, and rules whose targets are all dummy (or gone): `fallback = true` +
  `action = "discard"`. Decisions stay mercure's: alone they discard (mercure: discard or
  nothing sent); with another rule matching, that rule decides (the fallback is not needed);
  a mercure fallback rule does not apply after such a rule matched, and in mercli the
  discard wins over it. What changes: their notifications are only sent when no other rule
  matched (reported).
- Only mercure's last fallback rule can ever apply; earlier ones are kept commented out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mercli.migrate.common import PROCESSED, State, fix_keyword_case, slug
from mercli.migrate.notify import email_channel, webhook_channel
from mercli.migrate.notify import events as notify_events
from mercli.migrate.series import SeriesSyntaxError, require_expressions
from mercli.migrate.toml_out import Block, key

__all__ = ["RuleConverter"]

_ACTIONS = ("route", "both", "process", "discard", "notification")
_FORCE = {"proceed": "proceed", "discard": "discard", "ignore": "discard"}


class RuleConverter:
    def __init__(self, owner: State, name: str, rule: Any) -> None:
        self.owner = owner
        self.name = name
        self.rule: Mapping[str, Any] = rule if isinstance(rule, Mapping) else {}
        self.report = owner.report
        self.where = f'rule "{name}"'
        self.block = Block("[[rules]]", origin=("rule", name))
        self.extra: list[Block] = []
        self.disabled = bool(self.rule.get("disabled"))

    def blocks(self) -> list[Block]:
        if not isinstance(self.owner.config["rules"][self.name], Mapping):
            self.report.dropped(self.where, "not a JSON object")
            return []
        self.block.comments.append(f'mercure rule "{self.name}"')
        self.block.comments += [
            f"{k}: {self.rule[k]}" for k in ("comment", "contact", "tags") if self.rule.get(k)
        ]
        refused = self.owner.excluded.get(("rule", self.name))
        if refused:
            return [self.commented(f"not carried over, mercli refused it: {refused}", False)]
        if self.disabled:
            self.block.comments.append("disabled in mercure: kept commented out")
            self.block.disabled = True
        elif self.rule.get("fallback") and self.owner.fallback != self.name:
            message = "a fallback rule before the last one: mercure never applies it"
            self.report.changed(self.where, message + " (kept commented out)")
            self.block.comments.append(message)
            self.block.disabled = True
        problem = self.fill()
        if problem:
            return [self.commented(f"not carried over: {problem}", True)]
        if self.disabled or self.block.disabled:
            for block in self.extra:
                block.disabled = True
        return [self.block, *self.extra]

    def commented(self, reason: str, report: bool) -> Block:
        if report and not self.block.disabled:
            self.report.dropped(self.where, reason.removeprefix("not carried over: "))
        self.block.comments.append(reason)
        self.block.disabled = True
        self.extra = []
        return self.block

    # -- the pieces --------------------------------------------------------------------------

    def fill(self) -> str | None:
        """Fill the block; a reason when the rule cannot be carried over."""
        action = self.rule.get("action", "route")
        if action not in _ACTIONS:
            return f'unknown action "{action}"'
        printable = self.name.strip() and self.name.isprintable()
        self.block.add("name", self.name if printable else slug(self.name, set()))
        when, problem = self.expression()
        self.block.add("when", when)
        if problem:
            return problem
        targets = self.targets()
        chain: list[str] = []
        if action in ("both", "process"):
            found = self.chain()
            if found is None:
                return "a processing module it needs was not carried over"
            chain = found
        effect = self.effect(action, targets, chain)
        self.body(effect, targets, chain, when)
        return None

    def expression(self) -> tuple[str, str | None]:
        from mercli.rules.expr import ExpressionError, compile_expression

        text = str(self.rule.get("rule") or "").strip() or "False"
        text, fixed = fix_keyword_case(text)
        if fixed:
            self.report.changed(self.where, "keyword case corrected: " + ", ".join(fixed))
        try:
            compile_expression(text)
        except ExpressionError as exc:
            return text, f"expression {text!r}: {exc}"
        return text, None

    def targets(self) -> list[str]:
        found = []
        for name in dict.fromkeys(_names(self.rule.get("target"))):
            if name in self.owner.target_names:
                found.append(self.owner.target_names[name])
            elif name in self.owner.dummies:
                continue
            elif name in self.owner.lost_targets:
                self.report.dropped(self.where, f'target "{name}" was not carried over')
            else:
                self.report.dropped(self.where, f'unknown target "{name}" (not in mercure.json)')
        return found

    def chain(self) -> list[str] | None:
        names = _names(self.rule.get("processing_module"))
        chain = []
        for name in names:
            if name not in self.owner.module_names:
                self.report.dropped(self.where, f'module "{name}" was not carried over')
                return None
            chain.append(self.owner.module_names[name])
        return chain

    def effect(self, action: str, targets: list[str], chain: list[str]) -> str:
        """route | process | discard | none (the rule sends nothing anywhere)."""
        if action == "discard":
            return "discard"
        if action in ("both", "process") and chain:
            return "process"
        if action in ("both", "process"):
            self.report.changed(self.where, "processing without a module: routed as is")
        if action == "notification" or not targets:
            return "none"
        return "route"

    def body(self, effect: str, targets: list[str], chain: list[str], when: str) -> None:
        block, action = self.block, self.rule.get("action", "route")
        if effect in ("discard", "none"):
            if effect == "none":
                self.nothing_sent(action)
            block.add("action", "discard")
        else:
            if effect == "process":
                targets = self.process_outputs(action, targets, chain)
            block.add("targets", targets)
            self.study()
        if self.rule.get("fallback") and effect != "none":
            block.add("fallback", True)
        self.priority(effect)
        for unsupported in ("dynamic_routing", "conditional_alternate_target"):
            if self.rule.get(unsupported):
                self.report.dropped(self.where, f"{unsupported}: not in mercli")
        self.notifications(effect, targets)
        if effect == "process" and self.rule.get("processing_retain_images"):
            self.inputs_rule(targets, when)

    def nothing_sent(self, action: str) -> None:
        why = "notification only" if action == "notification" else "no target carried over"
        self.block.comments.append(
            f"{why}: a discard-like fallback (decides as mercure did; see README)"
        )
        self.block.add("fallback", True)
        if self.rule.get("fallback"):
            return
        if action == "notification" and self.has_notifications():
            message = "notification only: notified only when no other rule matches the series"
            self.report.changed(self.where, message)
        elif action != "notification":
            self.report.changed(self.where, "sends nowhere: becomes a discard-like fallback")
        if self.rule.get("action_trigger") == "study":
            self.report.changed(self.where, "study trigger dropped: it applies per series")

    def process_outputs(self, action: str, targets: list[str], chain: list[str]) -> list[str]:
        self.block.add("process", self.settings_chain(chain))
        settings = self.rule_settings(len(chain))
        if settings:
            self.block.add("process_settings", settings)
        if action == "process" or not targets:
            self.owner.processed_needed = True
            self.block.comments.append("processing only: the output goes to mercure-processed")
            return [PROCESSED]
        return targets

    def settings_chain(self, chain: list[str]) -> list[str]:
        """The chain, with per-module copies when mercure gives each module its own settings."""
        given = self.rule.get("processing_settings")
        if not isinstance(given, list) or len({json.dumps(s, sort_keys=True) for s in given}) < 2:
            return chain
        copies = []
        for index, module in enumerate(chain):
            own = given[index] if index < len(given) and isinstance(given[index], Mapping) else {}
            table = dict(self.owner.module_tables[module])
            table["settings"] = {**table.get("settings", {}), **_safe(own)}
            copy = slug(f"{module}-{self.name}", self.owner.taken["modules"])
            block = Block(f"[modules.{key(copy)}]", origin=("rule", self.name))
            block.comments.append(f'module "{module}" with rule "{self.name}"\'s settings')
            for item, value in table.items():
                block.add(item, value)
            self.owner.blocks["modules"].append(block)
            copies.append(copy)
        self.report.changed(self.where, "per-module settings: one module copy per module")
        return copies

    def rule_settings(self, modules: int) -> dict[str, Any]:
        given = self.rule.get("processing_settings") or {}
        if isinstance(given, list):
            if len({json.dumps(s, sort_keys=True) for s in given}) != 1:
                return {}
            given = given[0]
        return _safe(given) if isinstance(given, Mapping) else {}

    def study(self) -> None:
        if self.rule.get("action_trigger") != "study":
            return
        self.block.add("trigger", "study")
        condition = self.rule.get("study_trigger_condition", "timeout")
        series = str(self.rule.get("study_trigger_series") or "")
        if condition != "received_series" or not series.strip():
            return
        try:
            self.block.add("require", require_expressions(series))
        except SeriesSyntaxError as exc:
            message = f"study_trigger_series {series!r}: {exc}; completes by study_timeout"
            self.report.dropped(self.where, message)
            return
        action = str(self.rule.get("study_force_completion_action") or "discard")
        self.block.add("on_timeout", _FORCE.get(action, "discard"))
        if action == "ignore":
            message = "incomplete study: mercli cannot wait forever; discarded (resendable)"
            self.report.changed(self.where, message)

    def priority(self, effect: str) -> None:
        value = self.rule.get("priority", "normal")
        if value == "normal" or effect in ("discard", "none"):
            return
        if value == "urgent" or (value == "offpeak" and self.owner.offpeak):
            self.block.add("priority", value)
        else:
            self.report.dropped(self.where, f'priority "{value}" (no offpeak hours set)')

    def has_notifications(self) -> bool:
        return bool(self.rule.get("notification_webhook") or self.rule.get("notification_email"))

    def notifications(self, effect: str, targets: list[str]) -> None:
        if not self.has_notifications():
            return
        kind = {"route": "route", "process": "route" if targets != [PROCESSED] else "process"}
        events = notify_events(self.rule, kind.get(effect, "discard"), self.report, self.where)
        if not events:
            self.report.changed(self.where, "every notification trigger is off: no channel")
            return
        names = []
        for what, build in (("webhook", webhook_channel), ("email", email_channel)):
            if not self.rule.get(f"notification_{what}"):
                continue
            if ("notify", f"{self.name} {what}") in self.owner.excluded:
                continue
            name = self.channel(what, build)
            if name:
                names.append(name)
        if names:
            self.block.add("notify", names)
            self.block.add("notify_on", events)

    def channel(self, what: str, build: Any) -> str | None:
        where = f"{self.where} {what}"
        try:
            table = build(self.rule, self.owner.config, self.report, where)
        except ValueError as exc:
            self.report.dropped(where, str(exc))
            return None
        name = slug(f"{self.name}-{what}", self.owner.taken["notify"])
        block = Block(f"[notify.{key(name)}]", origin=("notify", f"{self.name} {what}"))
        block.comments.append(f'the {what} notification of mercure rule "{self.name}"')
        block.disabled = self.block.disabled
        for item, value in table.items():
            block.add(item, value)
        self.owner.blocks["notify"].append(block)
        return name

    def inputs_rule(self, targets: list[str], when: str) -> None:
        """mercure's "retain input images": the originals go to the targets too."""
        block = Block("[[rules]]", origin=("rule", self.name))
        block.comments.append(
            f'mercure rule "{self.name}" retains its input images: '
            "the originals go to the same targets"
        )
        block.add("name", f"{self.name} (input images)")
        block.add("when", when)
        block.add("targets", targets)
        for item in ("trigger", "require", "on_timeout", "priority"):
            value = dict(self.block.pairs).get(item)
            block.add(item, value)
        self.extra.append(block)
        self.report.changed(self.where, "retain input images: a second rule sends the originals")


def _names(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(item) for item in items if isinstance(item, str) and item.strip()]


def _safe(value: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in value.items() if v is not None}
