"""`Spool`: the layout of one spool directory, reading it, and publishing and placing items in it.

The protocol these follow is written down in `mercli.spool`. Who may read the spool (SPEC §9):
its files are 0640 and its folders 0750 (`mercli.fsutil`), so only the owner and the spool's
group get in. The group is the one of a setgid spool root, whose folders pass it (and the
setgid bit) on to everything made below them; `Spool.open(root, group=...)` makes a root so.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import logging
import os
import stat
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from mercli.errors import SpoolError
from mercli.fsutil import (
    fsync_dir,
    give_file_mode,
    make_dir,
    remove_tree,
    rename_noreplace,
    unlink_quietly,
    write_new,
)
from mercli.names import new_id
from mercli.spool.events import EVENTS_DIR, EventLog
from mercli.spool.items import (
    CLAIMS,
    GROUP_STATES,
    HINTS,
    INCOMING,
    INSTANCE_SUFFIX,
    ITEM,
    KEY_SEPARATOR,
    LEASES,
    SIDECAR_SUFFIX,
    STAGING,
    STATES,
    TMP,
    Item,
    fsync_tree,
    list_subdirs,
    lock_deadline,
    locked_dir,
)

log = logging.getLogger(__name__)


class Spool:
    """A spool directory: its layout, its items, and its event log."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(root))
        self.tmp = self.root / TMP
        self.leases = self.root / LEASES
        self.claims = self.root / CLAIMS
        self.hints = self.root / HINTS
        self.staging = self.root / STAGING  # created by the dcmtk engine, which alone uses it
        self.events = EventLog(self.root / EVENTS_DIR)

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, group: str | int | None = None) -> Spool:
        """Open a spool, creating its layout if missing; SpoolError if it is unusable.

        `group` (a name or gid): give the spool to that group, setgid, so that everything
        created in it from now on is readable by the group (`--group`).
        """
        spool = cls(root)
        spool.ensure_layout(group)
        return spool

    def layout(self) -> list[Path]:
        """The spool's own folders (not items), root first."""
        folders = [self.root, self.tmp, *(self.root / s for s in STATES), self.leases]
        # keys/: the audit key of `mercli log` (mercli.audit.keys), a spool folder so that
        # --group and the modes apply to it
        return [*folders, self.claims, self.hints, self.events.directory, self.root / "keys"]

    def ensure_layout(self, group: str | int | None = None) -> None:
        """Create every folder, then prove the spool writable and on one filesystem.

        New folders are 0750; others' access to existing ones (made by an older mercli) is
        taken away. With `group`, every layout folder is given to it, setgid.
        """
        folders = self.layout()
        try:
            if self.root.exists() and not self.root.is_dir():
                raise SpoolError(f"spool path is not a directory ({self.root})")
            self.root.parent.mkdir(parents=True, exist_ok=True)
            gid = None if group is None else _gid(group)
            for folder in folders:
                if not folder.is_dir() and make_dir(folder, exist_ok=True):
                    fsync_dir(folder.parent)
                elif folder != self.root:
                    _tighten(folder)
                if gid is not None:
                    _give_to_group(folder, gid)
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

    def publish_to_group(
        self,
        state: str,
        group: str,
        files: Sequence[tuple[Path, str]],
        *,
        sync: bool = True,
        wait: float | None = None,
    ) -> bool:
        """Rename prepared files (tmp path, final name) into `<state>/<group>/`, durably.

        Follows protocol step 2. Files with an existing name replace it atomically (a resent
        instance replaces the earlier copy). Returns True if any name was replaced. The files
        get FILE_MODE first. A group locked past the deadline raises LockTimeout (an OSError),
        with nothing renamed: the files are still where they were. `sync=False`: the group
        directory is not fsync'ed (the caller syncs many at once: the receive journal).
        `wait`: seconds to try the group's lock, instead of LOCK_DEADLINE.
        """
        directory = self.state_dir(state) / group
        deadline = lock_deadline(wait)
        for source, _name in files:
            give_file_mode(source)  # receive creates the dataset file itself
        while True:
            if make_dir(directory, exist_ok=True):
                fsync_dir(directory.parent)
            with locked_dir(directory, fcntl.LOCK_SH, deadline) as fd:
                if fd is None:
                    continue  # claimed away between mkdir and lock: make a new group
                replaced = False
                for source, name in files:
                    with suppress(FileNotFoundError):
                        os.stat(name, dir_fd=fd, follow_symlinks=False)
                        replaced = True
                    os.rename(source, name, dst_dir_fd=fd)
                if sync:
                    os.fsync(fd)
                return replaced

    def publish_item(self, prepared: Path, state: str, name: str) -> Item:
        """Publish a folder built in tmp/ as the new item `<state>/<name>` (never clobbers)."""
        fsync_tree(prepared)
        target = self.state_dir(state) / name
        rename_noreplace(prepared, target)
        fsync_dir(target.parent)
        return Item(state, name, target)

    # -- placing items in states ----------------------------------------------------------------

    def place(self, source: Path, state: str, name: str, *, sync: bool = True) -> Item:
        """Rename an item into `<state>/<name>`; groups merge into a newer group of that name."""
        target = self.state_dir(state) / name
        while True:
            try:
                rename_noreplace(source, target)
                break
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if state not in GROUP_STATES:
                    raise SpoolError(f"refusing to overwrite an existing item ({target})") from exc
                if self._merge_into_group(source, target):
                    break
        if sync:
            fsync_dir(target.parent)
        return Item(state, name, target)

    def _merge_into_group(self, source: Path, target: Path) -> bool:
        """Move a released batch's files into a newer group of the same series.

        Where the newer group already has an instance of the same name, that copy arrived later and
        wins (as a resent instance would). False if the group vanished meanwhile (retry the rename).
        """
        with locked_dir(target, fcntl.LOCK_SH) as fd:
            if fd is None:
                return False
            stems: dict[str, list[str]] = {}
            for entry in os.listdir(source):
                instance = entry.endswith((INSTANCE_SUFFIX, SIDECAR_SUFFIX))
                stems.setdefault(entry.rsplit(".", 1)[0] if instance else entry, []).append(entry)
            for stem, names in sorted(stems.items()):
                if any(_exists_at(fd, n) for n in names):
                    self.log("duplicate_dropped", group=target.name, instance=stem)
                    for n in names:
                        remove_tree(source / n)
                    continue
                for n in sorted(names, key=lambda n: n.endswith(SIDECAR_SUFFIX)):  # .dcm first
                    os.rename(source / n, n, dst_dir_fd=fd)
            os.fsync(fd)
        remove_tree(source)
        return True

    def read_hint(self, series: str) -> dict[str, Any] | None:
        """The last hint written for a series, or None."""
        try:
            value = json.loads((self.hints / series).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


def _tighten(folder: Path) -> None:
    """Take others' access away from a layout folder an older mercli made 0755 (if ours)."""
    info = os.stat(folder, follow_symlinks=False)
    if info.st_mode & 0o007 and info.st_uid == os.geteuid():
        os.chmod(folder, stat.S_IMODE(info.st_mode) & ~0o007)


def _gid(group: str | int) -> int:
    """A group's id from its name (or a number); SpoolError for an unknown one."""
    if isinstance(group, int) or group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SpoolError(f"no such group {group!r}") from None


def _give_to_group(folder: Path, gid: int) -> None:
    """chgrp a layout folder and set its setgid bit, so what is made in it gets the group."""
    info = os.stat(folder, follow_symlinks=False)
    if info.st_gid != gid:
        os.chown(folder, -1, gid)
        info = os.stat(folder, follow_symlinks=False)
    if not info.st_mode & stat.S_ISGID:
        os.chmod(folder, stat.S_IMODE(info.st_mode) | stat.S_ISGID)


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
