"""The audit trail read back: `mercli log`, the event index, and the keys events are found by.

The spool's event log (`mercli.spool.events`) records every state change of every item. An
item's trail is a chain of events linked by the names they share:

    received   series (incoming/ folder name = safe_name(SeriesInstanceUID)), instance, sender
    routed     item, series, rules, target | process   (+ study, accession_key, patient_key)
    held       item (<study>/<batch>), series, study   (+ accession_key, patient_key)
    discarded  item, series, reason                     (+ study, accession_key, patient_key)
    routed     item, study, rules, target | process     a study job (study rules, SPEC §4.1)
    processed  item, outputs [state/name]               processing made new items or series
    dispatched item, target, instances                  delivered
    retry      item, target, error, delay
    failed     item, target, reason
    resent     from, item, to (state/name)              a new item (or series) from an old one
    purged     item, state

So a series leads to the items routed from it, an item to its dispatch, failure, resend and
purge, a resend or processing step to the items it made. `study` is the study's spool name
(safe_name(StudyInstanceUID): the UID itself for every well-formed UID); `accession_key` and
`patient_key` are keyed hashes, never the values (`keys`).

Modules: `keys` (the per-spool secret and the keyed hashes; used by routing when it writes
events), `index` (the SQLite index beside the log: which lines carry which key), `trail`
(walking from the keys asked for to every linked event, and following new ones).
"""
