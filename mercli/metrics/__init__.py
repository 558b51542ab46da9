"""`mercli metrics`: the spool as Prometheus metrics (SPEC §8).

Two sources, read at scrape time:

- **Counters** come from the event log (`mercli.spool.events`): how many instances were
  received, jobs routed, dispatched, failed, items purged, and so on since the spool began.
  They are counted incrementally: `state.CounterStore` keeps the counts and an event-log
  `Cursor` (in memory for `--listen`, in `<spool>/metrics/state.json` between one-shot runs)
  and reads only the lines written after the cursor, so a scrape costs the new events, never
  the history. A torn last line is not counted until it is whole.
- **Gauges** come from the spool folders as `mercli status` sees them
  (`mercli.status.collect_status`): items, instances and bytes per state, oldest item age,
  the backlog per target and priority, live and dead workers.

Labels are bounded: only target, rule and module names (checked against the names rules.toml
allows, at most `counters.MAX_NAMES` of each; the rest count as `_other`), spool states,
priorities, stages and event names. Never UIDs, item ids, AE titles or free text.

Modules: `counters` (event -> counter families; a leaf), `state` (the counts + cursor and
their state file), `collector` (the prometheus_client Collector and the exposition text),
`listen` (the HTTP listener, bounded against slow and idle clients) and `textfile` (atomic
writes for node_exporter's textfile collector).
"""
