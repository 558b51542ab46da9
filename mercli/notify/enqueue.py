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
_ESCAPED = 12  # the most bytes one character of a string encodes to (ensure_ascii)


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
    """Add `notifications` to the caller's transaction; how many."""
    made = notifications(subscriptions, event, variables, source)
    for record in made:
        transaction.notify(record)
    return len(made)


def notifications(
    subscriptions: Iterable[Subscription],
    event: str,
    variables: Mapping[str, Any],
    source: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One notification per channel whose subscription wants `event`.

    Route makes them while its transaction's fsyncs run (`Transaction.notify_later`);
    dispatch and process as they settle a job. Either way this does only what the event
    needs now: the notification's id is given when it is collected (`<txn>.<nnnn>`, the
    transaction's id and its place in the line: time-sortable and the same on every
    collection), its `created` is the event's `at`, and the variables are JSON-encoded to
    measure them only when they may be over VARIABLES_LIMIT.
    """
    made: list[dict[str, Any]] = []
    seen: set[str] = set()
    created = str(variables.get("at") or now_iso())
    origin = {key: value for key, value in source.items() if value is not None}
    for subscription in subscriptions:
        channel = subscription.channel
        if event not in subscription.events or channel.name in seen:
            continue  # not wanted, or a second owner (a rule and its target) on one channel
        seen.add(channel.name)
        values = dict(variables)
        if not channel.phi:
            for name in PHI_VARIABLES:
                values.pop(name, None)
        record = {
            "created": created,
            "event": event,
            "channel": channel.shared_record,  # encoded at commit, never changed
            "source": dict(origin),
            "variables": values,  # rendered when collected: `rendered`
        }
        if _maybe_large(values) and len(json.dumps(values, default=str)) > VARIABLES_LIMIT:
            record = rendered(record)  # a large result.json: only the (capped) text is kept
        made.append(record)
    return made


def _maybe_large(variables: Mapping[str, Any]) -> bool:
    """Whether the variables may encode to more than VARIABLES_LIMIT bytes. String keys with
    plain strings, lists of them, bools, None and numbers of at most 24 characters, counted
    as if every character were escaped (twelve bytes: a surrogate pair), say no for sure;
    anything else (a module's result, a subclass, a huge number) is for the exact count."""
    size = 0
    for key, value in variables.items():
        if type(key) is not str:
            return True
        size += _ESCAPED * (len(key) + 4)
        kind = type(value)
        if kind is str:
            size += _ESCAPED * len(value)
        elif kind is bool or value is None:
            size += 8
        elif kind is int or kind is float:
            if not -(10**18) < value < 10**18:  # also NaN, which compares false
                return True
            size += 24
        elif kind is list or kind is tuple:
            if not all(type(item) is str for item in value):
                return True
            size += sum(_ESCAPED * len(item) + 4 for item in value)
        else:
            return True
    return size > VARIABLES_LIMIT


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
    except Exception as exc:  # TemplateProblem, or what a filter raised on odd data
        name = (
            record.get("channel", {}).get("name")
            if isinstance(record.get("channel"), dict)
            else "?"
        )
        reason = str(exc) if isinstance(exc, TemplateProblem) else type(exc).__name__
        body = f"mercli {event}: the {name} template failed at run time: {reason}"
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
    *,
    name: str | None = None,
    **detail: Any,
) -> None:
    """`Claim.quarantine` (error.json, then error/, as `name`) with the `failed`
    notifications."""
    if not wanted(subscriptions, "failed"):
        claim.quarantine(reason, name=name, **detail)
        return
    record = error_record(reason, claim.state, detail)
    claim.worker.replace_file(claim.path / ERROR_FILE, json_bytes(record))
    settle(claim, ERROR, subscriptions, "failed", variables, source, name)


def subscriptions_from(record: Mapping[str, Any], key: str = "notify") -> list[Subscription]:
    """The subscriptions a job record carries (none for jobs written before them)."""
    found = []
    for data in record.get(key) or ():
        try:
            found.append(Subscription.from_json(data))
        except (KeyError, TypeError, ValueError):
            continue
    return found
