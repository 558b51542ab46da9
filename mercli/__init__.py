"""mercli: a DICOM router as composable Unix commands over one crash-safe spool.

Where the code lives, in the order data flows through it (dependencies point down this list's
reverse: commands use stages, stages use the spool, nothing imports back):

- `cli`, `commands/`       the click layer: one `cmd_*.py` per command, options, exit codes
- `dicom/`                 DICOM on the wire: `scp/` accepts, `scu/` requests; `dimse`,
                           `part10`, `sender` shared by both
- `receive/`               the durable C-STORE handler and its service; `dcmtk/` is the
                           storescp + getdcmtags engine
- `tags/`                  the sidecar format and the readers that build it
- `rules/`                 rules.toml: loader, the safe expression language, `decide`
- `route/`                 complete series batches -> jobs in outgoing/ or discard/
- `jobs`                   the job file format (job.json, dispatch.json, `Target`)
- `dispatch/`              jobs -> targets (`targets/`: one module per type), retries
- `purge`, `resend`,       retention, re-injection, the read-only view, `mercli run`
  `status`, `supervisor`
- `service`                what every long-running stage shares: signals, wake-ups, rescans
- `spool/`                 the protocol (its docstring) and its primitives: publish, claim,
                           transactions, recovery, events
- `errors`, `names`,       typed errors with exit codes, safe names and ids, durations,
  `durations`, `fsutil`    durable file operations
"""

__version__ = "0.1.0"
