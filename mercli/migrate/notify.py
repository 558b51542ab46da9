"""A mercure rule's notification fields as `[notify.NAME]` channels and `notify_on` events.

mercure renders a webhook payload (JSON without its outer braces) and an email body with
Jinja2 after replacing the macros `@rule@`, `@task_id@`, `@event@`; its variables are
`rule`, `task_id`, `event` (RECEIVED, COMPLETED, ERROR), `details`, `DeviceSerialNumber`,
`body` (the rendered webhook body, JSON-escaped without quotes) and, with
`phi_notifications`, `acc`, `mrn`, `patient_name` (documented as `phi_data.*` too).

The mercli template keeps the text as written and starts with `{% set %}` lines that give
mercure's names their mercli values (`task_id` = item, `details` = error, `event` mapped back
to mercure's three names, `acc` = accession_number...), so `rules check` renders it with
mercli's variables and the payload reads as it did. A variable mercli has no value for
renders empty and is reported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mercli.migrate.report import Report

__all__ = ["email_channel", "events", "webhook_channel"]

_MACROS = {"@rule@": "{{ rule }}", "@task_id@": "{{ task_id }}", "@event@": "{{ event }}"}
_EVENT = '{% set event = {"received": "RECEIVED", "failed": "ERROR"}.get(event, "COMPLETED") %}'
_ALIASES = {"task_id": "item", "details": "error"}
_PHI = {"acc": "accession_number", "mrn": "patient_id", "patient_name": "patient_name"}
_MERCLI_NAMES = ("event", "rule", "item", "error", "target", "module", "series_uid")


def _macros(text: str) -> str:
    for macro, replacement in _MACROS.items():
        text = text.replace(macro, replacement)
    return text


def _used(*templates: str) -> set[str]:
    from jinja2 import Environment, TemplateSyntaxError, meta

    names: set[str] = set()
    for template in templates:
        try:
            names |= meta.find_undeclared_variables(Environment().parse(template))
        except TemplateSyntaxError as exc:
            raise ValueError(f"template does not compile: {exc.message}") from None
    return names


def _prelude(used: set[str], phi: bool, webhook: bool, report: Report, where: str) -> list[str]:
    """`{% set %}` lines giving mercure's variable names mercli values."""
    lines = [_EVENT] if "event" in used else []
    lines += [f"{{% set {old} = {new} %}}" for old, new in _ALIASES.items() if old in used]
    missing = '"UNKNOWN"' if webhook else '""'  # what mercure renders without phi_notifications
    wanted = set(_PHI) if "phi_data" in used else set()
    for name in _PHI:
        if name in used or name in wanted:
            lines.append(f"{{% set {name} = {_PHI[name] if phi else missing} %}}")
    if "phi_data" in used:
        lines.append('{% set phi_data = {"acc": acc, "mrn": mrn, "patient_name": patient_name} %}')
    known = {"event", "rule", "body", "phi_data", *_ALIASES, *_PHI, *_MERCLI_NAMES}
    for name in sorted(used - known):
        lines.append(f'{{% set {name} = "" %}}')
        report.dropped(where, f'template variable "{name}" has no mercli value: renders empty')
    return lines


def webhook_channel(
    rule: Mapping[str, Any], config: Mapping[str, Any], report: Report, where: str
) -> dict[str, Any]:
    """The `[notify.X]` table of a rule's webhook."""
    payload = _macros(str(rule.get("notification_payload") or ""))
    body = _macros(str(rule.get("notification_payload_body") or ""))
    phi = bool(config.get("phi_notifications"))
    channel: dict[str, Any] = {"type": "webhook", "url": str(rule["notification_webhook"])}
    if not payload.strip():
        report.changed(where, "empty webhook payload: mercli's default JSON body is sent")
    else:
        used = _used(payload, body)
        lines = _prelude(
            used | (_used(body) if "body" in used else set()), phi, True, report, where
        )
        if "body" in used:
            lines.append("{% set body_text %}" + body + "{% endset %}")
            lines.append("{% set body = (body_text | tojson)[1:-1] %}")
        channel["body"] = "".join(lines) + "{" + payload + "}"
    if phi:
        channel["phi"] = True
    if config.get("webhook_certificate_location") and channel["url"].startswith("https://"):
        channel["tls_ca"] = str(config["webhook_certificate_location"])
    return channel


def email_channel(
    rule: Mapping[str, Any], config: Mapping[str, Any], report: Report, where: str
) -> dict[str, Any]:
    """The `[notify.X]` table of a rule's email addresses (mercure sends through localhost)."""
    addresses = [a for a in re.split(r"[,;\s]+", str(rule["notification_email"])) if a]
    phi = bool(config.get("phi_notifications"))
    channel: dict[str, Any] = {
        "type": "email",
        "smtp_host": "localhost",
        "smtp_port": 25,
        "from": str(config.get("email_notification_from") or "mercure@mercure.mercure"),
        "to": addresses,
        "subject": "[Mercure] Rule {{ rule }}: " + _EVENT_NAME,
    }
    text = _macros(str(rule.get("notification_email_body") or ""))
    if text.strip():
        lines = _prelude(_used(text), phi, False, report, where)
        channel["body"] = "".join(lines) + text
    else:
        report.changed(where, "empty email body: mercli's default text is sent")
    if str(rule.get("notification_email_type") or "plain") != "plain":
        report.changed(where, "HTML email: mercli sends the same text as text/plain")
    if phi:
        channel["phi"] = True
    return channel


_EVENT_NAME = '{{ {"received": "RECEIVED", "failed": "ERROR"}.get(event, "COMPLETED") }}'


def events(rule: Mapping[str, Any], effect: str, report: Report, where: str) -> list[str]:
    """`notify_on` from mercure's trigger switches; `effect` is what the mercli rule does:
    "route", "process" (output kept, not sent on) or "discard"."""
    found: list[str] = []
    if rule.get("notification_trigger_reception", True):
        found.append("received")
    if rule.get("notification_trigger_completion", True):
        found.append({"route": "delivered", "process": "processed"}.get(effect, "discarded"))
    if rule.get("notification_trigger_error", True) and effect != "discard":
        found.append("failed")
    if rule.get("notification_trigger_completion_on_request") and "processed" not in found:
        found.append("processed")
        message = "completion-on-request: mercli notifies every processed event (with the text)"
        report.changed(where, message)
    return found
