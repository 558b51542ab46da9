"""`mercli watch DIR`: a drop folder, ingested file by file once each file is complete.

The loop: list DIR (the truth; sub-folders too, names starting with `.` skipped), ask
`Readiness` about each file, ingest those that are ready through an `Ingester` (one
"association" per pass: completion hints at its end), journal each step, then move the file
to `DIR/.done/<path>` or delete it (`after`), or move it to `DIR/.failed/<path>` with
`<path>.reason` beside it. watchdog events (inotify) wake the loop early and tell closes from
writes; a listing runs at least every `scan_every` seconds whatever the events say.

Symlinks in DIR are never followed: each is moved to `.failed/` (the link itself) with the
reason. A file the spool cannot take (disk full) stays in DIR and is tried again later.

Exactly once across `kill -9`: see `mercli.ingest.journal`. A file whose `done` step is
journaled is never read again, only moved; an instance journaled as published is skipped.
The one window left is between an instance's rename into incoming/ and its journal line
(one fsync): a watcher killed there publishes that one instance again after restart, which
replaces the first copy if route has not taken its series yet (receive's rule for a resent
instance), and is otherwise routed again as a follow-up batch. At most one instance per kill.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mercli.errors import SpoolError
from mercli.fsutil import fsync_dir, make_dir, rename_noreplace, unlink_quietly, write_new
from mercli.ingest.journal import Journal, file_key
from mercli.ingest.publish import FileResult, IngestConfig, Ingester
from mercli.ingest.ready import Readiness
from mercli.names import new_id, printable
from mercli.spool import Spool, Worker, recover

log = logging.getLogger(__name__)

DONE, FAILED = ".done", ".failed"
MIN_SCAN, MAX_SCAN = 0.5, 300.0  # bounds of the periodic listing's interval
RETRY_SPOOL = 30.0  # seconds before a file the spool could not take is tried again
FAULT_ENV = "MERCLI_INGEST_FAULT"  # tests: "<point>:<n>" kills us at the n-th <point>


@dataclass(frozen=True)
class WatchConfig:
    """Options of `mercli watch`; the one place their defaults live."""

    stable: float = 2.0
    after: str = "done"  # "done": move to DIR/.done/; "delete"
    scan_every: float = 10.0
    incomplete_after: float = 600.0


class _Faults:
    """Numbered failure points for crash tests (`MERCLI_INGEST_FAULT=recorded:3`)."""

    def __init__(self) -> None:
        point, _, count = os.environ.get(FAULT_ENV, "").partition(":")
        self.point, self.left = point, int(count or 1)

    def hit(self, point: str) -> None:
        if point == self.point:
            self.left -= 1
            if self.left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


class Watcher:
    """One drop folder feeding one spool."""

    def __init__(
        self, spool: Spool, worker: Worker, folder: Path, config: WatchConfig, ingest: IngestConfig
    ) -> None:
        self.spool = spool
        self.folder = folder.absolute()
        self.config = config
        self.ingester = Ingester(spool, worker, ingest)
        self.journal = Journal(self.folder / DONE)
        self.readiness = Readiness(config.stable, config.incomplete_after, events=_has_inotify())
        self.faults = _Faults()
        self._retry_at: dict[str, float] = {}
        self.ingested = self.failed = 0

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event, wake: threading.Event, *, once: bool = False) -> None:
        make_dir(self.folder / FAILED, exist_ok=True)
        self.journal.open(self._still_there)
        try:
            while not stop.is_set():
                pending = self.scan_once()
                if once and not pending:
                    return
                now = time.monotonic()
                wait = min(self.config.scan_every, self.readiness.next_check(now))
                wake.wait(wait)
                wake.clear()
        finally:
            self.ingester.close()
            self.journal.close()

    def scan_once(self) -> int:
        """One pass: ingest what is ready; how many files are still waiting."""
        pending = 0
        published = False
        for rel, info in self._listing():
            path = str(self.folder / rel)
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
                kind = "symlink" if stat.S_ISLNK(info.st_mode) else "not a regular file"
                self._dispose(rel, "failed", f"{kind}: not followed, not ingested")
                continue
            if self._retry_at.get(rel, 0.0) > time.monotonic():
                pending += 1
                continue
            verdict = self.readiness.check(path, info)
            if verdict is None:
                pending += 1
            elif verdict:
                self._decide(rel, info, "failed", verdict)
            else:
                published |= self._ingest(rel, info)
        if published:
            self.ingester.end()  # completion hints for the series of this pass
        self.journal.compact_if_long(self._still_there)
        return pending

    def _listing(self) -> list[tuple[str, os.stat_result]]:
        found: list[tuple[str, os.stat_result]] = []
        stack = [""]
        while stack:
            prefix = stack.pop()
            try:
                with os.scandir(self.folder / prefix) as entries:
                    listed = sorted(entries, key=lambda e: e.name)
            except OSError:
                continue
            for entry in listed:
                if entry.name.startswith("."):
                    continue  # .done, .failed, rsync's and editors' temporary files
                rel = f"{prefix}{entry.name}"
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    stack.append(rel + "/")
                else:
                    found.append((rel, info))
        return found

    # -- one file -------------------------------------------------------------------------------

    def _ingest(self, rel: str, info: os.stat_result) -> bool:
        """Ingest one ready file (or finish what a killed watcher decided); True if published."""
        key = file_key(rel, info)
        record = self.journal.get(key)
        if record.done is not None:
            self._dispose(rel, str(record.done["to"]), str(record.done.get("reason", "")))
            return False

        def published(ordinal: int, _series: str, _instance: str) -> None:
            self.faults.hit("published")
            self.journal.append({"pub": key, "n": ordinal})
            self.faults.hit("recorded")

        try:
            result = self.ingester.ingest_file(
                self.folder / rel, skip=frozenset(record.published), on_instance=published
            )
        except (SpoolError, OSError) as exc:
            log.error("cannot ingest %s now, will retry: %s", printable(rel, 200), exc)
            self._retry_at[rel] = time.monotonic() + RETRY_SPOOL
            return False
        to, reason = self._verdict(result)
        self._decide(rel, info, to, reason, key)
        return bool(result.published)

    def _verdict(self, result: FileResult) -> tuple[str, str]:
        if result.not_dicom:
            return "failed", "not DICOM"
        problems = result.quarantined + result.failed
        if result.skipped and (result.published or result.already):
            problems.append(f"{result.skipped} part(s) not DICOM, skipped")
        if result.quarantined or result.failed:
            return "failed", "\n".join(problems)
        if problems:
            log.info("%s", problems[-1])
        return self.config.after, ""

    def _decide(
        self, rel: str, info: os.stat_result, to: str, reason: str, key: str | None = None
    ) -> None:
        self.journal.append(
            {"done": key or file_key(rel, info), "to": to, "reason": reason, "at": new_id()}
        )
        self.faults.hit("decided")
        self._dispose(rel, to, reason)

    def _dispose(self, rel: str, to: str, reason: str) -> None:
        source = self.folder / rel
        if to == "delete":
            unlink_quietly(source)
            fsync_dir(source.parent)
            self.ingested += 1
        else:
            destination = self._destination(FAILED if to == "failed" else DONE, rel)
            if to == "failed":
                reason_path = destination.with_name(destination.name + ".reason")
                temporary = reason_path.with_name(f".{reason_path.name}.{new_id()}")
                write_new(temporary, (reason or "failed").encode() + b"\n")
                os.replace(temporary, reason_path)
                self.failed += 1
                log.warning("%s failed: %s", printable(rel, 200), printable(reason, 500))
            else:
                self.ingested += 1
            rename_noreplace(source, destination)
            fsync_dir(destination.parent)
            fsync_dir(source.parent)
        self.readiness.forget(str(source))
        self._retry_at.pop(rel, None)

    def _destination(self, where: str, rel: str) -> Path:
        """`DIR/<where>/<rel>`, its folders made; a name already there gets a suffix."""
        destination = self.folder / where / rel
        for parent in reversed(destination.relative_to(self.folder).parents[:-1]):
            make_dir(self.folder / parent, exist_ok=True)
        if os.path.lexists(destination) or os.path.lexists(f"{destination}.reason"):
            destination = destination.with_name(f"{destination.name}.{new_id()}")
        return destination

    def _still_there(self, key: str) -> bool:
        rel, ino, size, mtime = key.split("\x00")
        try:
            info = os.stat(self.folder / rel, follow_symlinks=False)
        except OSError:
            return False
        return (str(info.st_ino), str(info.st_size), str(info.st_mtime_ns)) == (ino, size, mtime)

    def event(self, path: str, kind: str) -> None:
        self.readiness.event(path, kind)


def _has_inotify() -> bool:
    from watchdog.observers import Observer

    return "Inotify" in getattr(Observer, "__name__", "")


def watch(
    spool_root: Path,
    folder: Path,
    config: WatchConfig,
    ingest: IngestConfig,
    *,
    stop: threading.Event | None = None,
    once: bool = False,
) -> tuple[int, int]:
    """Watch `folder` until `stop` (or, with `once`, until nothing in it is waiting);
    returns (files ingested, files failed)."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    if not folder.is_dir():
        raise SpoolError(f"drop folder is not a directory ({folder})")
    stop = stop or threading.Event()
    wake = threading.Event()
    spool = Spool.open(spool_root)
    recover(spool)
    with Worker(spool, "watch") as worker:
        watcher = Watcher(spool, worker, folder, config, ingest)

        class _Events(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory:
                    return
                kinds = {"created": "written", "modified": "written", "closed": "closed"}
                if event.event_type in kinds:
                    watcher.event(str(event.src_path), kinds[event.event_type])
                elif event.event_type == "moved":
                    watcher.event(str(event.dest_path), "moved_in")
                else:
                    return  # opened, closed_no_write (our own reads), deleted
                wake.set()

        observer = Observer()
        observer.schedule(_Events(), str(folder), recursive=True)
        observer.start()
        try:
            watcher.run(stop, wake, once=once)
        finally:
            observer.stop()
            observer.join()
    return watcher.ingested, watcher.failed
