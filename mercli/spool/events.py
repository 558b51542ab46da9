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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mercli.fsutil import FILE_MODE, set_file_mode

EVENTS_DIR = "events"


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
