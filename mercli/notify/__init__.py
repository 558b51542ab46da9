"""Notifications that are never lost (SPEC §8): an outbox in the spool, sent by `mercli notify`.

The stage that causes an event (route: received, routed, discarded; process: processed,
failed; dispatch: delivered, failed) writes one notification per channel that asked for the
event in the same transaction as its own state change, as a line of its worker's
notification log (`mercli.spool.notices`): the event and its notification exist together or
not at all. `mercli notify` collects the committed ones into **notification items** in
`notify/` (`collect`), claims them (leases, as dispatch), sends, retries with backoff and
ends each in `notify_sent/` or, after its last try, in `notify_failed/` with `error.json`. A
dead webhook delays nothing but its own notifications.

A notification item is a folder holding `notification.json` (and, once tried,
`progress.json`):

    {
      "id": "<txn>.<nnnn>", "created": "<ISO 8601 UTC>", "event": "delivered",
      "subject": "<rendered subject: email only, else empty>",
      "body": "<rendered body>",
      "channel": { ...the [notify.NAME] definition: name, type and the settings that
                   differ from the defaults (Channel.record; older items hold them all)... },
      "source": {"item": "<job/series id>", "rule": "...", "target": "...", "module": "..."}
    }

The id is the item's name: the id of the transaction that wrote the notification
(time-sortable, unique) and its place in that transaction's line, given when it is
collected, so a line collected twice yields the same id (and `Idempotency-Key`); lines of
earlier versions carry an id of their own, which is kept.

The event's variables are taken when the event happens and travel with the notification
(in the worker's log); the templates are rendered with them (Jinja2's sandbox, bounded) when
`mercli notify` collects the notification into its item, off the path of the stage that
caused the event. So `mercli notify` needs no rules file and sends exactly what the event
said. Secrets stay
references (`password_file`, `${ENV}` header values and passwords), read at send time.
The variables and the rendered text hold patient data only for channels with `phi = true`;
`source` never.
"""

from __future__ import annotations

EVENTS = ("received", "routed", "discarded", "processed", "delivered", "failed")
CHANNEL_TYPES = ("webhook", "email")
PROGRESS_FILE = "progress.json"
