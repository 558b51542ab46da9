"""The spool: one directory tree that is the whole state of a mercli installation.

Every command reads and writes only the spool, and only through this module (and the
`spool_*` modules it is made of, listed at the end). The protocol below is what makes any
number of `receive`, `route`, `dispatch`, `purge` and `resend` processes safe on one spool,
across `kill -9` and power cuts.

Layout::

    spool/
      tmp/                       partial writes; only the spool modules read it
        <owner>/                   scratch of one live process
        lease.<owner>              a lease being born (see 4)
      incoming/<series>/         received instances of one series, open for more:
                                   NAME.dcm + NAME.tags, NAME = safe_name(SOPInstanceUID)
      outgoing/<job>/            jobs waiting for dispatch (job.json + instances)
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
      events/YYYY-MM-DD.ndjson   audit trail (mercli.events)
      staging/                   what storescp is writing (`receive --engine dcmtk` only;
                                   mercli.dcmtk_engine hands finished files to getdcmtags)

Protocol:

1. **Publish.** A file is written under a unique name in `tmp/<owner>/`, fsync'ed, renamed
   into its state folder, and that folder is fsync'ed. Readers never look in `tmp/`, so they
   see a file whole or not at all. Items (jobs, batches) are directories prepared the same way
   and renamed into place whole, with `renameat2(RENAME_NOREPLACE)` so nothing is clobbered.
2. **Groups.** `incoming/<series>/` is the one folder that grows after it is published: each
   received instance is renamed into it, `.dcm` first, then `.tags` (a `.dcm` without a sidecar
   is complete data whose sidecar can be rebuilt; never the reverse). Publishers hold a shared
   `flock` on the group directory while they rename; a claimer holds an exclusive one while it
   renames the group away. After locking, both check the directory is still at its path (same
   inode), else retry. So an instance lands wholly in the claimed batch or wholly in a new
   group that the next routing pass takes: it is never split from its sidecar, never lost.
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

The spool must live on one local filesystem (or NFSv4 with working flock): renames are only
atomic within one filesystem, which `Spool.open` checks.

Modules: this one holds `Spool` (layout, reading, publishing, hints) and re-exports the public
names of the others, so callers import everything from `mercli.spool`:
`mercli.spool_items` (folder and file names, `Item`, placing and merging items, files inside
items), `mercli.spool_claims` (`Worker`, `Claim`, `Transaction`: steps 3 and 4) and
`mercli.spool_recovery` (`recover`, `lease_is_held`: steps 4 and 5).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.errors import SpoolError
from mercli.events import EVENTS_DIR, EventLog
from mercli.fsutil import fsync_dir, remove_tree, rename_noreplace, unlink_quietly, write_new
from mercli.names import new_id
from mercli.spool_claims import Claim, Transaction, Worker
from mercli.spool_items import (
    CLAIMS,
    DISCARD,
    ERROR,
    ERROR_FILE,
    HINTS,
    INCOMING,
    INSTANCE_SUFFIX,
    ITEM,
    JOB_FILE,
    KEY_SEPARATOR,
    LEASES,
    OUTGOING,
    SIDECAR_SUFFIX,
    STATES,
    SUCCESS,
    TMP,
    Item,
    error_record,
    fsync_tree,
    json_bytes,
    link_instances,
    list_subdirs,
    locked_dir,
    replace_file,
    write_json,
)
from mercli.spool_recovery import RecoveryReport, lease_is_held, recover

__all__ = [
    "DISCARD",
    "ERROR",
    "ERROR_FILE",
    "INCOMING",
    "INSTANCE_SUFFIX",
    "JOB_FILE",
    "OUTGOING",
    "SIDECAR_SUFFIX",
    "STATES",
    "SUCCESS",
    "Claim",
    "Item",
    "RecoveryReport",
    "Spool",
    "Transaction",
    "Worker",
    "lease_is_held",
    "link_instances",
    "recover",
    "replace_file",
    "write_json",
]

log = logging.getLogger(__name__)


class Spool:
    """A spool directory: its layout, its items, and its event log."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        self.tmp = self.root / TMP
        self.leases = self.root / LEASES
        self.claims = self.root / CLAIMS
        self.hints = self.root / HINTS
        self.events = EventLog(self.root / EVENTS_DIR)

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> Spool:
        """Open a spool, creating its layout if missing; SpoolError if it is unusable."""
        spool = cls(root)
        spool.ensure_layout()
        return spool

    def ensure_layout(self) -> None:
        """Create every folder, then prove the spool writable and on one filesystem."""
        folders = [self.tmp, *(self.root / s for s in STATES), self.leases, self.claims, self.hints]
        folders.append(self.events.directory)
        try:
            if self.root.exists() and not self.root.is_dir():
                raise SpoolError(f"spool path is not a directory ({self.root})")
            for folder in folders:
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)
                    fsync_dir(folder.parent)
            probe = self.tmp / f"probe.{os.getpid()}.{new_id()}"
            write_new(probe, b"mercli")
            unlink_quietly(probe)
        except OSError as exc:
            where = exc.filename or self.root
            raise SpoolError(f"spool unusable: {exc.strerror or exc} ({where})") from exc
        devices = {folder.stat().st_dev for folder in folders}
        if len(devices) > 1:
            raise SpoolError(
                f"spool folders span several filesystems; renames would not be atomic ({self.root})"
            )

    @classmethod
    def open_for_reading(cls, root: str | os.PathLike[str]) -> Spool:
        """Open an existing spool without writing to it (status on a read-only mount)."""
        spool = cls(root)
        if not spool.root.is_dir() or not (spool.root / INCOMING).is_dir():
            raise SpoolError(f"not a spool (no incoming/ folder) ({spool.root})")
        if not os.access(spool.root, os.R_OK | os.X_OK):
            raise SpoolError(f"spool unusable: permission denied ({spool.root})")
        return spool

    def state_dir(self, state: str) -> Path:
        """The folder of a state; ValueError for a name that is not one of STATES."""
        if state not in STATES:
            raise ValueError(f"unknown spool state {state!r}")
        return self.root / state

    def log(self, event: str, **fields: Any) -> None:
        """Append to the audit trail; a full disk must not stop the work it describes."""
        try:
            self.events.append(event, **fields)
        except OSError as exc:
            log.warning("event log unwritable (%s): %s %s", exc.strerror, event, fields)

    # -- reading -----------------------------------------------------------------------------

    def items(self, state: str) -> list[Item]:
        """Published, unclaimed items of a state, sorted by name."""
        directory = self.state_dir(state)
        try:
            with os.scandir(directory) as entries:
                names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        return [Item(state, name, directory / name) for name in names]

    def claimed(self, state: str | None = None) -> list[Item]:
        """Items currently claimed by some worker (live or not yet recovered)."""
        found = []
        for owner_dir in list_subdirs(self.claims):
            for key_dir in list_subdirs(owner_dir):
                key_state, _, name = key_dir.name.partition(KEY_SEPARATOR)
                item = key_dir / ITEM
                if (state is None or key_state == state) and item.exists():
                    found.append(Item(key_state, name, item, claimed_by=owner_dir.name))
        return found

    # -- publishing into groups ----------------------------------------------------------------

    def publish_to_group(self, state: str, group: str, files: Sequence[tuple[Path, str]]) -> bool:
        """Rename prepared files (tmp path, final name) into `<state>/<group>/`, durably.

        Follows protocol step 2. Files with an existing name replace it atomically (a resent
        instance replaces the earlier copy). Returns True if any name was replaced.
        """
        directory = self.state_dir(state) / group
        while True:
            created = _mkdir(directory)
            if created:
                fsync_dir(directory.parent)
            with locked_dir(directory, fcntl.LOCK_SH) as fd:
                if fd is None:
                    continue  # claimed away between mkdir and lock: make a new group
                replaced = False
                for source, name in files:
                    with suppress(FileNotFoundError):
                        os.stat(name, dir_fd=fd, follow_symlinks=False)
                        replaced = True
                    os.rename(source, name, dst_dir_fd=fd)
                os.fsync(fd)
                return replaced

    def publish_item(self, prepared: Path, state: str, name: str) -> Item:
        """Publish a folder built in tmp/ as the new item `<state>/<name>` (never clobbers)."""
        fsync_tree(prepared)
        target = self.state_dir(state) / name
        rename_noreplace(prepared, target)
        fsync_dir(target.parent)
        return Item(state, name, target)

    def quarantine_files(
        self, worker: Worker, files: dict[str, Path], reason: str, origin: str, **detail: Any
    ) -> Item:
        """Keep loose files (not a claimed item) as a new error/<id>/ with an error.json.

        The files are moved (renamed) into a folder built in the worker's scratch, which is
        published whole; if anything fails, the folder and the files in it are removed.
        """
        folder = worker.tmp_path()
        folder.mkdir()
        try:
            for name, source in files.items():
                os.rename(source, folder / name)
            record = error_record(reason, origin, detail)
            write_new(folder / ERROR_FILE, json_bytes(record))
            return self.publish_item(folder, ERROR, new_id())
        except BaseException:
            remove_tree(folder)
            raise

    def write_hint(self, worker: Worker, series: str, record: dict[str, Any]) -> None:
        """Say that an association carrying `series` has ended (advisory; see `hints/`)."""
        record = {"at": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        try:
            replace_file(worker, self.hints / series, json_bytes(record))
        except OSError as exc:  # a lost hint only delays routing until the series timeout
            log.warning("cannot write completion hint for series %s: %s", series, exc)

    def read_hint(self, series: str) -> dict[str, Any] | None:
        """The last hint written for a series, or None."""
        try:
            value = json.loads((self.hints / series).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


def _mkdir(path: Path) -> bool:
    try:
        path.mkdir()
        return True
    except FileExistsError:
        return False
