"""The spool: one directory tree that is the whole state of a mercli installation.

Every command reads and writes only the spool, and only through this package. The protocol
below is what makes any number of `receive`, `route`, `dispatch`, `purge` and `resend`
processes safe on one spool, across `kill -9` and power cuts.

Layout::

    spool/
      tmp/                       partial writes; only the spool modules read it
        <owner>/                   scratch of one live process
        lease.<owner>              a lease being born (see 4)
      incoming/<series>/         received instances of one series, open for more:
                                   NAME.dcm + NAME.tags, NAME = safe_name(SOPInstanceUID)
      studies/<study>/           series held for study rules (SPEC §4.1), a group like incoming/:
        <batch>/                   one held series batch: its instances and held.json
      processing/<job>/          processing jobs waiting for (or in) `mercli process` (SPEC §7):
                                   job.json + instances, laid out as a series or study job
      outgoing/<job>/            jobs waiting for dispatch (job.json + instances; a study job
                                   has them in one sub-folder per series)
      success/<job>/             delivered jobs
      discard/<id>/              series no rule wanted
      error/<id>/                failed jobs and unreadable instances, each with error.json
      leases/<owner>             one per live process: JSON (role, host, pid, start) + flock
      claims/<owner>/<state>~<name>/
        item                       the claimed item, renamed here from <state>/<name>
        out.tmp/<state>/<name>     a transaction being prepared
        out/<state>/<name>         a committed transaction being applied
      hints/<series>             "the association that sent this series has ended" (receive
                                   writes, route reads: advisory, replaced whole, aged out)
      events/YYYY-MM-DD.ndjson   audit trail (mercli.spool.events)
      staging/                   what storescp is writing (`receive --engine dcmtk` only;
                                   mercli.receive.dcmtk.engine hands finished files to getdcmtags)
      journal/<owner>/<n>.seg    receive's write-ahead journal: instances acknowledged, not yet
                                   (all) published into incoming/ (mercli.spool.journal)
      journal/spare/             reset segments a receiver may take instead of making new ones
      notices/<owner>/<n>.log    a worker's notification log: the notifications of its
                                   transactions, collected into notify/ once committed
                                   (mercli.spool.notices); cursor.json: the collector's place

Protocol:

1. **Publish.** A file is written under a unique name in `tmp/<owner>/`, fsync'ed, renamed
   into its state folder, and that folder is fsync'ed. Readers never look in `tmp/`, so they
   see a file whole or not at all. Items (jobs, batches) are directories prepared the same way
   and renamed into place whole, with `renameat2(RENAME_NOREPLACE)` so nothing is clobbered.
2. **Groups.** `incoming/<series>/` and `studies/<study>/` are the folders that grow after
   they are published. Each received instance is renamed into its incoming group, `.dcm`
   first, then `.tags` (a `.dcm` without a sidecar is complete data whose sidecar can be
   rebuilt; never the reverse); a held series batch, a folder, is renamed whole into its
   study's group (a transaction's output merged into the group: `Spool.place`). Publishers
   hold a shared `flock` on the group directory while they rename; a claimer holds an
   exclusive one while it renames the group away. After locking, both check the directory is
   still at its path (same inode), else retry. So an instance (or batch) lands wholly in the
   claimed group or wholly in a new group that the next pass takes: never split, never lost.
3. **Claim.** A worker owns an item by renaming it to `claims/<owner>/<state>~<name>/item`.
   rename(2) is atomic: of several workers exactly one succeeds, the rest get ENOENT. The
   claim then ends in one of three ways, each safe at every instant:
   - *release*: renamed back to `<state>/<name>` (merged into a newer group of that name);
   - *move*: renamed to another state (one rename: e.g. a delivered job into `success/`);
   - *transaction*: outputs are prepared under `out.tmp/` (hard links, never copies of pixel
     data), fsync'ed, and committed by renaming `out.tmp` to `out`. From that instant the
     outputs are decided: each `out/<state>/<name>` is renamed into place, then the item is
     deleted. An entry is either still in `out/` or already published, never both.
4. **Leases.** Each process creates `leases/<owner>` (born in `tmp/`, renamed in) and holds an
   exclusive `flock` on it for its lifetime. The kernel drops the lock when the process dies,
   however it dies, so "is the owner alive?" is a non-blocking lock attempt, with no clocks and
   no marker files. Whoever takes a dead owner's lock recovers its claims: a claim with `out/`
   is rolled forward, any other is rolled back (its `out.tmp/` dropped, its item released).
   Then the owner's scratch, claims folder and lease are deleted, the lease last.
5. **Reaping.** `tmp/<owner>` of a dead owner is deleted by recovery; loose files in `tmp/`
   older than a grace period (a foreign tool's leftovers) are deleted too.

5a. **Receive's journal.** A receiver may make an instance durable by appending it (its Part
   10 bytes and its sidecar) as a checksummed record to a segment of `journal/<owner>/` and
   `fdatasync`ing it, instead of publishing it first: it is then published into its incoming
   group as in step 2, behind the acknowledgement, a batch at a time. The acknowledged
   records of a segment are exactly its valid prefix past its checkpoint; recovery of the
   owner (step 4) publishes them before anything else of the owner is removed. See
   `mercli.spool.journal` for the format, the checkpoint and the reuse of segments.
5b. **Notifications.** A transaction's notifications (SPEC §8) are one line of its worker's
   log in `notices/<owner>/`, written into preallocated blocks and `fdatasync`ed before the
   commit rename, then marked `commit` after it (or `abort`, synced, before a failed
   transaction's claim is released). A line counts iff its transaction committed; recovery of
   a dead owner decides its unmarked lines from its claims before settling them (`out/` there
   or the item gone: committed) and writes the markers. A collector (`mercli notify`) turns
   committed lines into items of `notify/`, and waits at an unmarked line while its owner's
   lease exists. See `mercli.spool.notices`.
6. **Deadlines.** Every lock is tried without blocking, again and again, until a deadline
   (`LOCK_DEADLINE`, 3 s): a group locked longer (a hung or hostile process holding a
   `flock` on it) makes a publish or a claim fail with `LockTimeout`, an OSError, having
   done nothing: receive answers the C-STORE with a failure status in time, route tries the
   series again later. A lease whose lock cannot be had at once is alive (step 4).
7. **Modes.** Files are created 0640 and folders 0750, whatever the umask, so patient data is
   never readable by other users; a setgid spool root (or `Spool.open(group=...)`, which makes
   one) gives every folder and file made below it its group. Item files that are sent or
   copied are opened without following symlinks, and must be regular files.

The spool must live on one local filesystem (or NFSv4 with working flock): renames are only
atomic within one filesystem, which `Spool.open` checks.

Modules, each depending only on those before it: `items` (folder and file names, `Item`, the
files inside items; a leaf), `events` (the audit trail), `store` (`Spool`: layout, reading,
publishing, placing items, hints), `journal` (receive's write-ahead journal: step 5a),
`notices` (the notification log: step 5b), `recovery` (`recover`, `lease_is_held`: steps 4
and 5) and `claims` (`Worker`, `Claim`, `Transaction`: steps 3 and 4). Callers import the
public names from `mercli.spool`.
"""

from mercli.spool.claims import Claim, Transaction, Worker
from mercli.spool.items import (
    DISCARD,
    ERROR,
    ERROR_FILE,
    HINTS,
    INCOMING,
    INSTANCE_SUFFIX,
    JOB_FILE,
    LOCK_DEADLINE,
    NOTIFICATION_FILE,
    NOTIFY,
    NOTIFY_FAILED,
    NOTIFY_SENT,
    OUTGOING,
    PROCESSING,
    SIDECAR_SUFFIX,
    STATES,
    STUDIES,
    SUCCESS,
    Item,
    LockTimeout,
    NotRegularFile,
    irregular_entry,
    link_instances,
    open_regular,
    read_regular,
    write_json,
)
from mercli.spool.recovery import RecoveryReport, lease_is_held, lease_state, recover
from mercli.spool.store import Spool

__all__ = [
    "DISCARD",
    "ERROR",
    "ERROR_FILE",
    "HINTS",
    "INCOMING",
    "INSTANCE_SUFFIX",
    "JOB_FILE",
    "LOCK_DEADLINE",
    "NOTIFICATION_FILE",
    "NOTIFY",
    "NOTIFY_FAILED",
    "NOTIFY_SENT",
    "OUTGOING",
    "PROCESSING",
    "SIDECAR_SUFFIX",
    "STATES",
    "STUDIES",
    "SUCCESS",
    "Claim",
    "Item",
    "LockTimeout",
    "NotRegularFile",
    "RecoveryReport",
    "Spool",
    "Transaction",
    "Worker",
    "irregular_entry",
    "lease_is_held",
    "lease_state",
    "link_instances",
    "open_regular",
    "read_regular",
    "recover",
    "write_json",
]
