"""The spool's audit trail: an append-only log of every state change of every item.

One NDJSON file per UTC day under `spool/events/`, so retention can drop whole days. Each
event is one line written with a single write(2) on an O_APPEND descriptor: lines from
concurrent processes never interleave on a local filesystem. The log is an audit trail, not
the source of truth (the state folders are): it is not fsync'ed per line, so a power cut may
lose its last lines but never a DICOM instance.

Events carry UIDs, ids, counts, rule and target names — never patient names or IDs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.fsutil import FILE_MODE, set_file_mode

EVENTS_DIR = "events"


READ_BLOCK = 1 << 20


@dataclass(frozen=True, order=True)
class Cursor:
    """A place in the event log: just after the last whole line read of day file `day`
    (`YYYY-MM-DD`; "" is the very beginning). Readers that follow the log (metrics, the
    `mercli log` index, notifications) keep one and read only what came after it, never
    the history again. JSON-ready as `[day, offset]`."""

    day: str = ""
    offset: int = 0

    def to_json(self) -> list[object]:
        return [self.day, self.offset]

    @classmethod
    def from_json(cls, value: object) -> Cursor:
        if isinstance(value, list) and len(value) == 2:
            day, offset = value
            if isinstance(day, str) and isinstance(offset, int) and offset >= 0:
                return cls(day, offset)
        return cls()


def _day_file(directory: Path, when: datetime) -> Path:
    return directory / f"{when:%Y-%m-%d}.ndjson"


class EventLog:
    """Appends events to, and reads them back from, `spool/events/`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def append(self, event: str, **fields: Any) -> None:
        """Record one event; `fields` must be JSON-serialisable (ids, UIDs, counts, reasons)."""
        now = datetime.now(UTC)
        record = {"at": now.isoformat(timespec="microseconds"), "event": event, **fields}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(_day_file(self.directory, now), flags, FILE_MODE)
        try:
            set_file_mode(fd)  # whatever the umask (or an older mercli) made of it
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self, since: datetime | None = None) -> Iterator[dict[str, Any]]:
        """All events, oldest first (optionally from `since`); torn last lines are skipped."""
        for path in sorted(self.directory.glob("*.ndjson")):
            if since is not None and path.stem < f"{since:%Y-%m-%d}":
                continue
            with path.open("rb") as fh:
                for raw in fh:
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if since is None or record.get("at", "") >= since.isoformat():
                        yield record

    def read_after(self, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
        """Every whole event line after `cursor`, each with the cursor just past it.

        A torn last line (a writer mid-write, or a power cut) is not read and the cursor stays
        before it, so the next call reads it once complete. A day file shorter than the
        cursor says (replaced by hand) is read again from its start; day files purged since
        are skipped. Lines that are not JSON objects are skipped (their cursor still moves).
        Reads in blocks: memory is flat however long the log.
        """
        for path in sorted(self.directory.glob("*.ndjson")):
            day = path.stem
            if day < cursor.day:
                continue
            offset = cursor.offset if day == cursor.day else 0
            try:
                stream = path.open("rb")
            except FileNotFoundError:  # purged meanwhile
                continue
            with stream:
                if os.fstat(stream.fileno()).st_size < offset:
                    offset = 0
                stream.seek(offset)
                pending = b""
                while block := stream.read(READ_BLOCK):
                    lines = (pending + block).split(b"\n")
                    pending = lines.pop()
                    for raw in lines:
                        offset += len(raw) + 1
                        try:
                            record = json.loads(raw)
                        except ValueError:
                            continue
                        if isinstance(record, dict):
                            yield record, Cursor(day, offset)
