"""Writing notifications into `notify/`, inside the transaction of the event they tell of.

`add_notifications` takes, for every subscription that wants the event, the event's
variables (patient data only for `phi = true` channels) and adds the notification to the
caller's transaction: it goes into the worker's notification log, synced before the commit
rename, and counts only if that rename happens (`mercli.spool.notices`); `mercli notify`
then renders the channel's templates with those variables (`rendered`) and makes it an item
of `notify/` (`mercli.notify.collect`). The state change and its notifications exist
together, or neither does. A template that fails at run time (it passed `rules check` with
sample values) still yields a notification, whose body says so: an event is never silently
dropped.

`settle` ends a claim in a state together with notifications (dispatch and process use it
for delivered and failed): the item is hard-linked into the transaction, so nothing is
copied, and the claim goes as every transaction's does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mercli.fsutil import link_tree
from mercli.names import new_id
from mercli.notify.channels import (
    PHI_VARIABLES,
    Channel,
    Subscription,
    TemplateProblem,
    render,
)
from mercli.spool import ERROR, ERROR_FILE, Claim, Transaction
from mercli.spool.items import error_record, json_bytes, now_iso

_TAG_VARIABLES = {  # sidecar keyword -> template variable
    "SeriesInstanceUID": "series_uid",
    "StudyInstanceUID": "study_uid",
    "SeriesDescription": "series_description",
    "StudyDescription": "study_description",
    "Modality": "modality",
    "SenderAET": "sender_aet",
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "PatientBirthDate": "patient_birth_date",
    "AccessionNumber": "accession_number",
}
_HOSTNAME = os.uname().nodename
VARIABLES_LIMIT = 16 * 1024  # bytes of variables a log line carries; larger: rendered at once


def event_variables(
    event: str, tags: Mapping[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    """The template variables of an event: from a sidecar (or job.json) and the fields the
    stage knows (rule, target, module, item, instances, error, result...)."""
    values: dict[str, Any] = {"event": event, "at": now_iso(), "hostname": _HOSTNAME}
    for keyword, name in _TAG_VARIABLES.items():
        value = (tags or {}).get(keyword)
        values[name] = "" if value is None else str(value)
    values |= {key: value for key, value in fields.items() if value is not None}
    result = values.get("result")
    if isinstance(result, Mapping):
        note = result.get("__mercure_notification")
        if isinstance(note, Mapping) and isinstance(note.get("text"), str):
            values.setdefault("notification", note["text"])
    return values


def wanted(subscriptions: Iterable[Subscription], event: str) -> list[Subscription]:
    return [s for s in subscriptions if event in s.events]


def add_notifications(
    transaction: Transaction,
    subscriptions: Iterable[Subscription],
    event: str,
    variables: Mapping[str, Any],
    source: Mapping[str, Any],
) -> int:
    """Prepare one notification item per subscription wanting `event`; how many."""
    made = 0
    seen: set[str] = set()
    for subscription in wanted(subscriptions, event):
        channel = subscription.channel
        if channel.name in seen:  # two owners (a rule and its target) on one channel
            continue
        seen.add(channel.name)
        values = dict(variables)
        if not channel.phi:
            for name in PHI_VARIABLES:
                values.pop(name, None)
        record = {
            "id": new_id(),
            "created": now_iso(),
            "event": event,
            "channel": channel.record(),
            "source": {key: value for key, value in source.items() if value is not None},
            "variables": values,  # rendered when collected: `rendered`
        }
        if len(json.dumps(values, default=str)) > VARIABLES_LIMIT:
            record = rendered(record)  # a large result.json: only the (capped) text is kept
        transaction.notify(record)
        made += 1
    return made


def rendered(record: dict[str, Any]) -> dict[str, Any]:
    """The notification item a log record becomes (`mercli.notify.collect`): subject and body
    rendered from the channel's templates with the event's variables, which it then drops.

    Rendering waits until here, off the path of the stage that caused the event (a tenth of
    the cost a notification adds to routing a small series): the variables were taken, and
    patient data left out for channels without `phi = true`, when the event happened.
    """
    values = record.get("variables")
    if not isinstance(values, dict):
        return record  # rendered already
    item = {key: value for key, value in record.items() if key != "variables"}
    event = str(record.get("event") or "")
    try:
        channel = Channel.from_json(record["channel"])
        body = render(channel.body_template(), values)
        subject_template = channel.subject_template()
        subject = render(subject_template, values) if subject_template else ""
    except (TemplateProblem, KeyError, TypeError, ValueError) as exc:
        name = (
            record.get("channel", {}).get("name")
            if isinstance(record.get("channel"), dict)
            else "?"
        )
        body = f"mercli {event}: the {name} template failed at run time: {exc}"
        subject = f"mercli {event}"
    return {**item, "subject": subject, "body": body}


def settle(
    claim: Claim,
    state: str,
    subscriptions: Sequence[Subscription],
    event: str,
    variables: Mapping[str, Any],
    source: Mapping[str, Any],
    name: str | None = None,
) -> None:
    """End the claim in `state` (as `name`) together with its notifications for `event`;
    a plain move when nobody wants the event."""
    if not wanted(subscriptions, event):
        claim.move_to(state, name)
        return
    transaction = claim.transaction()
    link_tree(claim.path, transaction.new_item(state, name or claim.name))
    add_notifications(transaction, subscriptions, event, variables, source)
    transaction.commit()


def quarantine(
    claim: Claim,
    reason: str,
    subscriptions: Sequence[Subscription],
    variables: Mapping[str, Any],
    source: Mapping[str, Any],
    **detail: Any,
) -> None:
    """`Claim.quarantine` (error.json, then error/) with the `failed` notifications."""
    if not wanted(subscriptions, "failed"):
        claim.quarantine(reason, **detail)
        return
    record = error_record(reason, claim.state, detail)
    claim.worker.replace_file(claim.path / ERROR_FILE, json_bytes(record))
    settle(claim, ERROR, subscriptions, "failed", variables, source)


def subscriptions_from(record: Mapping[str, Any], key: str = "notify") -> list[Subscription]:
    """The subscriptions a job record carries (none for jobs written before them)."""
    found = []
    for data in record.get(key) or ():
        try:
            found.append(Subscription.from_json(data))
        except (KeyError, TypeError, ValueError):
            continue
    return found
