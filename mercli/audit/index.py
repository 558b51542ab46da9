"""An SQLite index beside the event log: which lines of the log name an item, series or study.

`events/index.sqlite` holds no event text, only postings: for every key an event carries
(its item, series, study, accession and patient keys, and the items or series it links to)
a row `(key, day, start, size)` pointing at the event's line in `events/<day>.ndjson`. A key
is the first 8 bytes of BLAKE2b of `<kind>:<value>` as a signed integer, so a row is about
20 bytes whatever the UID's length; the rare collision is harmless, as every line read back
is checked to carry the key. So the index stays small (about a fifth of the log), holds no
more than the log does, and a lookup is one B-tree seek plus one pread per event.

**Incremental.** `meta.cursor` is where the index has read the log up to (a
`mercli.spool.events.Cursor`). An update reads only what came after it and commits the
new rows and the new cursor in one transaction, BATCH events at a time: a reader sees a
batch whole or not at all, and a killed update loses at most its last batch, read again
next time (rows are keyed by position, so reading twice never duplicates one).

**Concurrency.** WAL mode: readers never wait for the writer. Writers take the write lock
with BEGIN IMMEDIATE and a busy timeout, read the cursor under it, so two `mercli log`
processes index each batch once between them. A writer that cannot get the lock in time
answers from what is indexed, with a warning.

**Building from scratch** (no index, or one that is damaged or of another schema) happens in
`tmp/`, without a journal, the postings sorted before they go into the B-tree, then the file
is renamed into place whole (never replacing one); an exclusive flock on `events/` keeps two
processes from building at once. A damaged index is moved aside and rebuilt, with a warning.

**Retention.** Rows of a day file that is gone (deleted by hand or by a future event
retention) are skipped when read, as are rows whose line no longer carries their key (a day
file replaced by hand): the log is the record and the index only points into it, so
dropping a day from the log drops it from `mercli log`, and the index never needs a rebuild
for it. The stale rows cost a few bytes each until the next rebuild.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mercli.errors import SpoolError
from mercli.fsutil import fsync_dir, open_new, rename_noreplace, unlink_quietly
from mercli.names import new_id
from mercli.spool.events import Cursor, EventLog

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"
SCHEMA_VERSION = "1"
BATCH = 100_000  # events per incremental transaction
INSERT_CHUNK = 20_000  # postings per executemany
HASH_CACHE = 10_000  # posting keys remembered while indexing
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another one's batch
BUILD_WAIT = 900.0  # seconds a process waits for another one's build from scratch
BUILD_CACHE_KIB = 262_144  # page cache while building (SQLite's default is 2 MiB)

# event field -> key kind
FIELD_KINDS = {
    "item": "i",
    "series": "s",
    "study": "t",
    "accession_key": "a",
    "patient_key": "p",
}
_FIELD_KINDS = tuple(FIELD_KINDS.items())
LABEL_KINDS = {"incoming": "s", "studies": "t"}  # `state/name` labels; any other state: "i"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS days (id INTEGER PRIMARY KEY, day TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS postings (
    key INTEGER NOT NULL, day INTEGER NOT NULL, start INTEGER NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (key, day, start)
) WITHOUT ROWID;
"""

Key = tuple[str, str]  # (kind, value)
Position = tuple[str, int, int]  # (day, start, size) of a line in the log


class IndexUnusable(SpoolError):
    """The index file is damaged or of another schema: it must be rebuilt."""


class IndexBusy(SpoolError):
    """Another process held the index's write lock past the deadline."""


def posting_key(kind: str, value: str) -> int:
    """The integer a key is stored as (8 bytes of BLAKE2b, signed to fit SQLite's INTEGER)."""
    data = f"{kind}:{value}".encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)


def event_keys(record: Mapping[str, Any]) -> list[Key]:
    """Every key an event is found by: its own fields, and the items (or series, or study) its
    `to` (resent) and `outputs` (processed) labels name, so a trail crosses from an item to
    what became of it. (Runs once per event when indexing: kept to plain loops.)"""
    keys = []
    for field, kind in _FIELD_KINDS:
        value = record.get(field)
        if value and isinstance(value, str):
            keys.append((kind, value))
    if "to" in record or "outputs" in record:
        outputs = record.get("outputs")
        labels = [*outputs] if isinstance(outputs, list) else []
        labels.append(record.get("to"))
        for label in labels:
            if isinstance(label, str) and "/" in label:
                state, _, name = label.partition("/")
                keys.append((LABEL_KINDS.get(state, "i"), name.partition("/")[0]))
    return keys


def _is_unusable(exc: sqlite3.Error) -> bool:
    """A damaged file or a schema that is not ours, as opposed to a busy or full disk."""
    name = getattr(exc, "sqlite_errorname", "")
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or name.startswith("SQLITE_CORRUPT"):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "no such" in str(exc)


class EventIndex:
    """An open index of one event log (see the module docstring)."""

    def __init__(self, path: Path, events: EventLog) -> None:
        self.path = path
        self.events = events
        # mode=rw: never create it here (SQLite would, 0644): only a build makes an index
        uri = f"{path.as_uri()}?mode=rw"
        self.conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
        self._files: dict[str, int] = {}
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            version = self._meta("schema")
        except sqlite3.Error as exc:
            self.close()
            if _is_unusable(exc):
                raise IndexUnusable(str(exc)) from exc
            raise
        if version != SCHEMA_VERSION:
            self.close()
            raise IndexUnusable(f"schema {version!r}, expected {SCHEMA_VERSION!r}")
        self._days: dict[int, str] = {}

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self.conn.close()

    def _meta(self, name: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def cursor(self) -> Cursor:
        """Where the index has read the log up to (as committed)."""
        return Cursor.from_json(json.loads(self._meta("cursor") or "null"))

    def update(self, batch: int = BATCH) -> int:
        """Index what the log gained since the cursor; the number of events indexed.

        IndexBusy if another writer kept the lock past BUSY_TIMEOUT (what is committed stays
        valid: the caller answers from it)."""
        total = 0
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise IndexBusy(str(exc)) from exc
                raise
            try:
                count, cursor = index_events(self.conn, self.events, self.cursor, batch)
                _set_meta(self.conn, "cursor", json.dumps(cursor.to_json()))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            total += count
            if count < batch:
                return total

    def lookup(self, key: Key) -> list[Position]:
        """Where the log's lines that may carry `key` are (check them: see `read`)."""
        rows = self.conn.execute(
            "SELECT day, start, size FROM postings WHERE key = ?", (posting_key(*key),)
        ).fetchall()
        if any(day not in self._days for day, _, _ in rows):
            self._days = dict(self.conn.execute("SELECT id, day FROM days").fetchall())
        return [(self._days.get(day, ""), start, size) for day, start, size in rows]

    def read(self, position: Position) -> dict[str, Any] | None:
        """The event at `position`, or None if its day file is gone or the line is not one."""
        day, start, size = position
        fd = self._files.get(day)
        if fd is None:
            try:
                fd = os.open(self.events.directory / f"{day}.ndjson", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ValueError):
                return None
            self._files[day] = fd
        lines = os.pread(fd, size, start).rstrip(b"\n").rsplit(b"\n", 1)
        try:
            record = json.loads(lines[-1])
        except ValueError:
            return None
        return record if isinstance(record, dict) else None


def _set_meta(conn: sqlite3.Connection, name: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))


def index_events(
    conn: sqlite3.Connection,
    events: EventLog,
    cursor: Cursor,
    limit: int | None = None,
    table: str = "postings",
) -> tuple[int, Cursor]:
    """Add the postings of the events after `cursor` (at most `limit`) to `table`, inside the
    caller's transaction; (events read, cursor after them).

    A line starts where the previous one ended (lines read_after skips, such as a torn one
    completed since, lie between: `read` takes the last line of its span)."""
    days = {day: number for number, day in conn.execute("SELECT id, day FROM days")}
    insert = f"INSERT OR IGNORE INTO {table} (key, day, start, size) VALUES (?, ?, ?, ?)"
    rows: list[tuple[int, int, int, int]] = []
    hashed: dict[Key, int] = {}  # a series' key repeats once per instance received
    count = 0
    previous = cursor
    for record, after in events.read_after(cursor):
        day = days.get(after.day)
        if day is None:
            day = conn.execute("INSERT INTO days (day) VALUES (?)", (after.day,)).lastrowid
            assert day is not None
            days[after.day] = day
        start = previous.offset if previous.day == after.day else 0
        for key in event_keys(record):
            number = hashed.get(key)
            if number is None:
                if len(hashed) > HASH_CACHE:
                    hashed.clear()
                number = hashed[key] = posting_key(*key)
            rows.append((number, day, start, after.offset - start))
        previous = after
        count += 1
        if len(rows) >= INSERT_CHUNK:
            conn.executemany(insert, rows)
            rows.clear()
        if limit is not None and count >= limit:
            break
    conn.executemany(insert, rows)
    return count, previous


def open_index(events: EventLog, scratch: Path) -> EventIndex:
    """The log's index, built first if missing and rebuilt (with a warning) if unusable, then
    brought up to date (a warning, and what is indexed, if another writer is too slow).

    `scratch` is the spool's tmp/: a build happens there (same filesystem, reaped if we die).
    """
    path = events.directory / INDEX_FILE
    for attempt in (1, 2):
        if not path.exists():
            build(events, path, scratch)
        try:
            index = EventIndex(path, events)
        except IndexUnusable as exc:
            if attempt == 2:
                raise
            log.warning("event index %s is unusable (%s): rebuilding it from the log", path, exc)
            _move_aside(path, scratch)
            continue
        try:
            index.update()
        except IndexBusy:
            log.warning("event index busy (another mercli log is indexing): showing what it has")
        except sqlite3.DatabaseError as exc:
            index.close()
            if attempt == 2 or not _is_unusable(exc):
                raise
            log.warning("event index %s is damaged (%s): rebuilding it from the log", path, exc)
            _move_aside(path, scratch)
            continue
        return index
    raise AssertionError("unreachable")  # pragma: no cover


def _move_aside(path: Path, scratch: Path) -> None:
    """Take a damaged index (and its WAL) out of the way: renamed into tmp/, then deleted."""
    for suffix in ("", "-wal", "-shm"):
        aside = scratch / f"index-damaged.{new_id()}"
        try:
            os.rename(f"{path}{suffix}", aside)
        except FileNotFoundError:
            continue  # another process moved it already
        unlink_quietly(aside)


def build(events: EventLog, path: Path, scratch: Path) -> None:
    """Index the whole log into a new file and rename it to `path`, unless another process
    does so first (then theirs is used)."""
    with _build_lock(events.directory):
        if path.exists():
            return  # built by the process we waited for
        started = time.monotonic()
        fresh = scratch / f"index-build.{new_id()}.sqlite"
        stage = scratch / f"index-stage.{new_id()}.sqlite"
        try:
            count = _build_into(fresh, stage, events)
            rename_noreplace(fresh, path)
            fsync_dir(path.parent)
        finally:
            unlink_quietly(fresh)
            unlink_quietly(stage)
        log.info("event index built: %d event(s) in %.1f s", count, time.monotonic() - started)


def _build_into(fresh: Path, stage: Path, events: EventLog) -> int:
    """The build itself: postings into an unindexed staging table first, then into the
    B-tree in key order (appends only), which is many times faster than inserting them in
    log order (a random place in the tree each)."""
    for file in (fresh, stage):
        os.close(open_new(file))  # FILE_MODE from the start; SQLite gives its WAL the same
    conn = sqlite3.connect(fresh, isolation_level=None)
    try:
        conn.executescript(
            f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
            f"PRAGMA cache_size=-{BUILD_CACHE_KIB}; {SCHEMA}"
        )
        conn.execute("ATTACH DATABASE ? AS stage", (str(stage),))
        conn.executescript(
            "PRAGMA stage.journal_mode=OFF; PRAGMA stage.synchronous=OFF;"
            "CREATE TABLE stage.postings (key INTEGER, day INTEGER, start INTEGER, size INTEGER);"
        )
        conn.execute("BEGIN")
        count, cursor = index_events(conn, events, Cursor(), table="stage.postings")
        conn.execute(
            "INSERT OR IGNORE INTO main.postings SELECT key, day, start, size "
            "FROM stage.postings ORDER BY key, day, start"
        )
        _set_meta(conn, "cursor", json.dumps(cursor.to_json()))
        _set_meta(conn, "schema", SCHEMA_VERSION)
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE stage")
        conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: every opener uses WAL
    finally:
        conn.close()
    with open(fresh, "rb+") as fh:
        os.fsync(fh.fileno())
    return count


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on `events/` for the length of a build, waited for BUILD_WAIT at
    most (a build of a year of events takes minutes: a second process waits for it rather
    than building the same index again)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + BUILD_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise IndexBusy("another process is still building the event index") from None
                time.sleep(0.2)
        yield
    finally:
        with suppress(OSError):
            os.close(fd)  # drops the lock
