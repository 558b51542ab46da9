"""The getdcmtags publisher pool of `receive --engine dcmtk`, and the hints it leads to.

A few long-lived `getdcmtags --publish --stdin` processes move each completed staged file into
`incoming/` with its sidecar, one line in and one answer out, so no process is started per
image. A getdcmtags that dies is replaced and its unfinished files are tried again later
(`RetryQueue`). `HintBook` writes an association's completion hints only once every file it
sent has been published, as the default engine does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from mercli.dicom.sender import Sender
from mercli.errors import ConfigError
from mercli.receive.dcmtk.staging import publish_line
from mercli.spool import Spool, Worker, recover

log = logging.getLogger(__name__)

# Bytes of lines (about 150 each) that may wait for getdcmtags. While it is in a long syncfs
# (a slow disk), a full pipe would block mercli's loop, and with it the reading of storescp's
# log, and storescp's answers: 1 MiB (Linux's default fs.pipe-max-size) holds ~7000 files.
PIPE_ROOM = 1 << 20
RETRY_DELAY = 5.0  # seconds before a file getdcmtags could not publish is tried again


class HintBook:
    """Completion hints, as the default engine writes them when an association ends.

    An association's hints are written once it has ended and every file it sent has been
    published (getdcmtags names each file's series in its answer), so `route` never sees a
    hint before the instances it speaks of.
    """

    def __init__(self, spool: Spool, worker: Worker) -> None:
        self.spool, self.worker = spool, worker
        self.lock = threading.Lock()
        self.outstanding: dict[int, int] = {}
        self.series: dict[int, set[str]] = {}
        self.ended: dict[int, tuple[str, Sender]] = {}

    def submitted(self, key: int) -> None:
        with self.lock:
            self.outstanding[key] = self.outstanding.get(key, 0) + 1

    def done(self, key: int, series: str | None) -> None:
        with self.lock:
            self.outstanding[key] = self.outstanding.get(key, 1) - 1
            if series:
                self.series.setdefault(key, set()).add(series)
        self._flush(key)

    def end(self, key: int, how: str, sender: Sender) -> None:
        with self.lock:
            self.ended[key] = (how, sender)
        self._flush(key)

    def _flush(self, key: int) -> None:
        with self.lock:
            if key not in self.ended or self.outstanding.get(key, 0) > 0:
                return
            how, sender = self.ended.pop(key)
            self.outstanding.pop(key, None)
            series = self.series.pop(key, set())
        for name in sorted(series):
            record = {"ended": how, "sender": sender.calling_aet, "engine": "dcmtk"}
            self.worker.write_hint(name, record)


class Publisher:
    """Long-lived `getdcmtags --publish --stdin` processes: one line in, one result out."""

    def __init__(
        self, binary: Path, spool: Spool, count: int, on_retry: RetryQueue, hints: HintBook
    ) -> None:
        self.binary = binary
        self.spool = spool
        self.on_retry = on_retry
        self.hints = hints
        self.lock = threading.Lock()
        self.published = self.quarantined = self.failed = 0
        self.workers = [_PublishWorker(self, index) for index in range(max(1, count))]
        self._next = 0

    def submit(self, path: Path, sender: Sender, key: int | None = None) -> None:
        """Hand one file to a getdcmtags; `key` (the storescp child) ties it to a hint."""
        if key is not None:
            self.hints.submitted(key)
        worker = self.workers[self._next % len(self.workers)]
        self._next += 1
        worker.submit(path, sender, key)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class RetryQueue:
    """Files to hand out again later (write errors, a publisher that died)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: deque[tuple[float, Path, Sender]] = deque()

    def add(self, path: Path, sender: Sender) -> None:
        with self.lock:
            self.entries.append((time.monotonic() + RETRY_DELAY, path, sender))

    def due(self) -> Iterator[tuple[Path, Sender]]:
        with self.lock:
            while self.entries and self.entries[0][0] <= time.monotonic():
                _, path, sender = self.entries.popleft()
                yield path, sender


class _PublishWorker:
    def __init__(self, publisher: Publisher, index: int) -> None:
        self.publisher = publisher
        self.index = index
        self.pending: deque[tuple[Path, Sender, int | None]] = deque()
        self.process = self._start()

    def _start(self) -> subprocess.Popen[str]:
        command = [
            str(self.publisher.binary),
            "--publish",
            "--spool",
            str(self.publisher.spool.root),
            "--stdin",
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,  # a Ctrl-C at the terminal is ours to handle, not theirs
        )
        assert process.stdin is not None
        # Room for thousands of lines while getdcmtags waits in a syncfs (PIPE_ROOM); with a
        # lower fs.pipe-max-size the pipe keeps its 64 KiB and blocks sooner.
        with contextlib.suppress(OSError):
            fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_ROOM)
        threading.Thread(target=self._read, args=(process,), daemon=True).start()
        return process

    def submit(self, path: Path, sender: Sender, key: int | None) -> None:
        with self.publisher.lock:
            self.pending.append((path, sender, key))
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(publish_line(path, sender))
        except (BrokenPipeError, ValueError):
            self._restart()

    def _restart(self) -> None:
        """getdcmtags died: recover its lease, start another, hand its unfinished files on."""
        log.error(
            "getdcmtags (publisher %d) exited %s; restarting it", self.index, self.process.poll()
        )
        recover(self.publisher.spool)
        with self.publisher.lock:
            unfinished, self.pending = list(self.pending), deque()
        self.process = self._start()
        for path, sender, key in unfinished:
            if key is not None:
                self.publisher.hints.done(key, None)
            if path.exists():
                self.publisher.on_retry.add(path, sender)

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self.publisher.lock:
                entry = self.pending.popleft() if self.pending else (Path(), Sender(), None)
                series = self._count(line.rstrip("\n"), entry[0], entry[1])
            if entry[2] is not None:
                self.publisher.hints.done(entry[2], series)

    def _count(self, line: str, path: Path, sender: Sender) -> str | None:
        """Counts one answer of getdcmtags; the series it published into, if any."""
        publisher = self.publisher
        if line.startswith("ok "):
            publisher.published += 1
            return line.removeprefix("ok ").partition("/")[0]
        elif line.startswith("error "):
            publisher.quarantined += 1
            log.warning("quarantined %s", line.removeprefix("error "))
        else:
            publisher.failed += 1
            log.error("could not publish %s: %s", path.name, line.removeprefix("fail "))
            if path.exists():
                publisher.on_retry.add(path, sender)
        return None

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait()


def find_getdcmtags() -> Path:
    """$MERCLI_GETDCMTAGS, else build/getdcmtags of this checkout, else getdcmtags on PATH."""
    candidates = [os.environ.get("MERCLI_GETDCMTAGS", "")]
    candidates.append(str(Path(__file__).resolve().parents[3] / "build" / "getdcmtags"))
    candidates.append(shutil.which("getdcmtags") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ConfigError("getdcmtags not found: run `make build` (or set MERCLI_GETDCMTAGS)")
