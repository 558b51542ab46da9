"""`mercli receive --engine dcmtk`: DCMTK's storescp on the wire, getdcmtags into the spool.

mercure's proven path, made faster: `storescp --fork` receives (one child process per
association, every storage SOP class with `-pm`, every transfer syntax with `+xa`, written
bit for bit with `+B`) into `spool/staging/`, and a few long-lived `getdcmtags --publish
--stdin` processes move each completed file into `incoming/` with its sidecar, exactly as the
default engine does. No process is started per image.

When is a staged file complete, and who sent it? storescp writes each dataset straight into
its file and says nothing when it is done, so this module reads storescp's log (a log4cplus
config keeps the few lines it needs, each prefixed with the child's pid):

- `Association Received: <address>` and the A-ASSOCIATE-RQ dump (`Calling/Called Application
  Name`) give the sender of everything that child receives;
- a child answers a C-STORE only after its file is closed, and reads the next request only
  after answering, so `Received Store Request` number n+1 proves that the first n stores of
  that child are finished, and `Association Release`/`Aborted` proves all of them are. A
  failed store (`Store SCP Failed`) has its file deleted by storescp and is not counted;
- with `+uf` the file names carry the child's pid (`<MOD>.X.1.2.276.0.7230010.3.1.4.<host>.
  <pid>.<time>.<counter>`), and the counter orders the files of one child.

Files whose completion the log cannot prove (left by a crash, or by a child that died) are
picked up when their writer is gone, checked element by element (`mercli.completeness`), and
published if whole, quarantined in `error/` with the reason if not.

The one difference to the default engine: storescp acknowledges an instance when its file is
written, before getdcmtags has made it durable and written its sidecar (a few milliseconds
later). A power cut in that window can lose an acknowledged instance; `kill -9` cannot (the
staged file survives and is published on the next start).
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mercli.completeness import check_complete
from mercli.errors import ConfigError, ExitCode, MercliError, UsageError
from mercli.receiver import ReceiveConfig
from mercli.spool import Spool, Worker, recover

log = logging.getLogger(__name__)

STAGING = "staging"
SWEEP_INTERVAL = 1.0  # seconds between looks for files of children that are gone
RETRY_DELAY = 5.0  # seconds before a file getdcmtags could not publish is tried again
UNKNOWN_GRACE = 10.0  # age before a staged file with a foreign name is picked up
_STAGED_NAME = re.compile(r"\.X\.1\.2\.276\.0\.7230010\.3\.1\.4\.\d+\.(\d+)\.(\d+)(?:\.(\d+))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# log4cplus: keep only what the tracker reads, each line as "<pid> <LEVEL> <message>".
_LOG_LINES = (
    "Association Received",
    "Application Name:",
    "Received Store Request",
    "Store SCP Failed",
    "Association Release",
    "Association Aborted",
)


def log_config() -> str:
    """The log4cplus configuration storescp runs with (`-lc`)."""
    lines = [
        "log4cplus.rootLogger = DEBUG, out",
        "log4cplus.logger.dcmtk.dcmdata = WARN",
        "log4cplus.appender.out = log4cplus::ConsoleAppender",
        "log4cplus.appender.out.ImmediateFlush = true",
        "log4cplus.appender.out.layout = log4cplus::PatternLayout",
        "log4cplus.appender.out.layout.ConversionPattern = %i %p %m%n",
    ]
    for number, text in enumerate(_LOG_LINES, 1):
        prefix = f"log4cplus.appender.out.filters.{number}"
        lines += [
            f"{prefix} = log4cplus::spi::StringMatchFilter",
            f"{prefix}.StringToMatch = {text}",
            f"{prefix}.AcceptOnMatch = true",
        ]
    last = f"log4cplus.appender.out.filters.{len(_LOG_LINES) + 1}"
    lines += [  # and every warning or error, whatever it says
        f"{last} = log4cplus::spi::LogLevelRangeFilter",
        f"{last}.LogLevelMin = WARN",
        f"{last}.AcceptOnMatch = true",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Sender:
    """Who sent a staged file: what getdcmtags writes as SenderAET, ReceiverAET, SenderAddress."""

    calling: str = ""
    called: str = ""
    address: str = ""

    def line(self, path: Path) -> str:
        fields = (str(path), self.calling, self.called, self.address)
        return "\t".join(_CONTROL.sub("?", value) for value in fields) + "\n"


@dataclass
class _Child:
    """One storescp child process: one association."""

    address: str = ""
    calling: str = ""
    called: str = ""
    stores: int = 0  # C-STORE requests seen
    failed: int = 0  # of which storescp reported failed (and deleted the file)
    given: int = 0  # files handed out so far

    def sender(self, default_called: str) -> Sender:
        return Sender(self.calling, self.called or default_called, self.address)


def staged_order(name: str) -> tuple[int, int, int] | None:
    """(pid, time, counter) from a storescp `+uf` file name; None for a foreign name."""
    match = _STAGED_NAME.search(name)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


class StagingTracker:
    """Turns storescp's log into (file, sender) pairs that are complete and ready to publish."""

    def __init__(self, staging: Path, aet: str) -> None:
        self.staging = staging
        self.aet = aet
        self.children: dict[int, _Child] = {}
        self.handed: set[str] = set()  # names given to a publisher and not yet gone
        self.ended: tuple[int, str, Sender] | None = None  # set by feed()

    def feed(self, line: str) -> list[tuple[Path, Sender]]:
        """One line of storescp's output; returns the files it proves complete.

        When the line ends an association, `ended` holds (pid, how, sender) until the next call.
        """
        self.ended = None
        pid_text, _, message = line.rstrip("\n").partition(" ")
        if not pid_text.isdigit():
            return []
        pid = int(pid_text)
        child = self.children.setdefault(pid, _Child())
        if message.startswith("Association Received: "):
            child.address = message.removeprefix("Association Received: ").strip()
        elif message.startswith("Calling Application Name:") and not child.calling:
            child.calling = message.partition(":")[2].strip()
        elif message.startswith("Called Application Name:") and not child.called:
            child.called = message.partition(":")[2].strip()
        elif message.startswith("Received Store Request"):
            ready = self._complete(pid, child, child.stores - child.failed)
            child.stores += 1
            return ready
        elif message.startswith("Store SCP Failed"):
            child.failed += 1
        elif message.startswith(("Association Release", "Association Aborted")):
            ready = self._complete(pid, child, None)
            how = "released" if message.startswith("Association Release") else "aborted"
            self.ended = (pid, how, child.sender(self.aet))
            del self.children[pid]
            return ready
        return []

    def _complete(self, pid: int, child: _Child, count: int | None) -> list[tuple[Path, Sender]]:
        """Hand out the child's files up to its `count`-th successful store (None: all)."""
        if count is not None and count <= child.given:
            return []
        files = sorted(
            (order, name)
            for name, order in self._staged().items()
            if order and order[0] == pid and name not in self.handed
        )
        chosen = [name for _, name in files]
        if count is not None:
            chosen = chosen[: count - child.given]
        child.given += len(chosen)
        return self._hand(chosen, child.sender(self.aet))

    def _staged(self) -> dict[str, tuple[int, int, int] | None]:
        with os.scandir(self.staging) as entries:
            names = {entry.name: staged_order(entry.name) for entry in entries if entry.is_file()}
        self.handed &= names.keys()  # published or quarantined since: forget them
        return names

    def _hand(self, names: list[str], sender: Sender) -> list[tuple[Path, Sender]]:
        fresh = [name for name in names if name not in self.handed]
        self.handed.update(fresh)
        return [(self.staging / name, sender) for name in fresh]

    def forget(self, path: Path) -> None:
        """A publisher gave up on `path` for now: it may be handed out again."""
        self.handed.discard(path.name)

    def sweep(self, *, everything: bool = False) -> list[tuple[Path, Sender, bool]]:
        """Files whose writer is gone; the bool says completeness must still be checked."""
        found: list[tuple[Path, Sender, bool]] = []
        now = time.time()
        for name, order in sorted(self._staged().items(), key=lambda item: item[1] or (0, 0, 0)):
            if name in self.handed:
                continue
            pid = order[0] if order else None
            if not everything:
                if pid is not None and _storescp_alive(pid):
                    continue
                if pid is None and now - _mtime(self.staging / name) < UNKNOWN_GRACE:
                    continue
            child = self.children.get(pid) if pid is not None else None
            sender = child.sender(self.aet) if child else Sender(called=self.aet)
            self.handed.add(name)
            found.append((self.staging / name, sender, True))
        for pid in [pid for pid in self.children if everything or not _storescp_alive(pid)]:
            del self.children[pid]
        return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _storescp_alive(pid: int) -> bool:
    """A running (not zombie) storescp with this pid: its files may still be growing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, _, rest = stat.partition(") ")
    return name.endswith("(storescp") and not rest.startswith(("Z", "X"))


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
            record = {"ended": how, "sender": sender.calling, "engine": "dcmtk"}
            self.spool.write_hint(self.worker, name, record)


class Publisher:
    """Long-lived `getdcmtags --publish --stdin` processes: one line in, one result out."""

    def __init__(
        self, binary: Path, spool: Spool, count: int, on_retry: _RetryQueue, hints: HintBook
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


class _RetryQueue:
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
        threading.Thread(target=self._read, args=(process,), daemon=True).start()
        return process

    def submit(self, path: Path, sender: Sender, key: int | None) -> None:
        with self.publisher.lock:
            self.pending.append((path, sender, key))
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(sender.line(path))
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
    candidates.append(str(Path(__file__).resolve().parent.parent / "build" / "getdcmtags"))
    candidates.append(shutil.which("getdcmtags") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise ConfigError("getdcmtags not found: run `make build` (or set MERCLI_GETDCMTAGS)")


def check_config(config: ReceiveConfig) -> None:
    """Refuse what storescp 3.6.7 cannot do, rather than silently not doing it."""
    if config.allow_aets:
        raise UsageError(
            "--allow-aet: storescp cannot restrict calling AE titles; "
            "use --engine pynetdicom or a firewall"
        )
    if config.host not in ("0.0.0.0", "::", ""):
        raise UsageError("--host: storescp always listens on all addresses; leave --host out")
    if config.extra_tags:
        raise UsageError(
            "--extra-tag: getdcmtags writes the standard sidecar only; use --engine pynetdicom"
        )
    if shutil.which("storescp") is None:
        raise ConfigError("storescp not found: install DCMTK (Debian package dcmtk)")


class ListenFailed(MercliError):
    """storescp could not start listening (port in use, not permitted): a config problem."""

    exit_code = ExitCode.CONFIG


def serve_dcmtk(spool_root: Path, config: ReceiveConfig) -> None:
    """Receive with storescp until SIGINT/SIGTERM, then let open associations finish."""
    check_config(config)
    binary = find_getdcmtags()
    spool = Spool.open(spool_root)
    recover(spool)
    staging = spool.root / STAGING
    staging.mkdir(exist_ok=True)
    with Worker(spool, "receive-dcmtk") as worker:
        _Engine(spool, worker, staging, binary, config).run()


class _Engine:
    """The supervisor: storescp's output in, files out to the publishers, until stopped."""

    def __init__(
        self, spool: Spool, worker: Worker, staging: Path, binary: Path, config: ReceiveConfig
    ) -> None:
        self.spool, self.worker, self.staging, self.config = spool, worker, staging, config
        self.tracker = StagingTracker(staging, config.aet)
        self.retries = _RetryQueue()
        self.stop = threading.Event()
        self.storescp: subprocess.Popen[bytes] | None = None
        self.hints = HintBook(spool, worker)
        self.publisher = Publisher(binary, spool, config.processes, self.retries, self.hints)
        self.seen_association = False
        self.last_problem = ""

    def run(self) -> None:
        self._on_signals()
        self.storescp = self._start_storescp()
        started = time.monotonic()
        try:
            self._pump(started)
        finally:
            if self.storescp.poll() is None:
                self.storescp.terminate()
            self._publish_unproven(self.tracker.sweep(everything=True))
            self.publisher.close()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info(
            "receiver stopped: %d published, %d quarantined, %d publish failures",
            self.publisher.published,
            self.publisher.quarantined,
            self.publisher.failed,
        )

    def _on_signals(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.info("%s received: finishing open associations", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _start_storescp(self) -> subprocess.Popen[bytes]:
        config_file = self.worker.tmp_path(".log4cplus")
        config_file.write_text(log_config())
        command = [
            "storescp", "--fork", "-lc", str(config_file), "-dhl", "+B", "+xa", "-pm", "+uf",
            "-od", str(self.staging), "-aet", self.config.aet,
            "-ts", str(int(self.config.network_timeout)), "-pdu", "131072",
            str(self.config.port),
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
            start_new_session=True,  # Ctrl-C must not cut the children's associations
            preexec_fn=_die_with_parent,
        )
        log.info("receiving with storescp on port %d as %s", self.config.port, self.config.aet)
        return process

    def _pump(self, started: float) -> None:
        assert self.storescp is not None and self.storescp.stdout is not None
        fd = self.storescp.stdout.fileno()
        pending = b""
        next_sweep = 0.0
        while True:
            ready, _, _ = select.select([fd], [], [], SWEEP_INTERVAL / 4)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:  # storescp and every child of it are gone
                    self.storescp.wait()
                    if self.stop.is_set():
                        return
                    started = self._check_listener(started)
                    assert self.storescp.stdout is not None
                    fd, pending = self.storescp.stdout.fileno(), b""
                    continue
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    self._line(line.decode("utf-8", "replace"))
            if self.stop.is_set() and self.storescp.poll() is None:
                self.storescp.terminate()  # no new associations; open ones go on
            started = self._check_listener(started)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                self._publish_unproven(self.tracker.sweep())
                for path, sender in self.retries.due():
                    if path.exists():
                        self.publisher.submit(path, sender)

    def _line(self, line: str) -> None:
        pid, _, rest = line.partition(" ")
        level, _, message = rest.partition(" ")
        if level in ("WARN", "ERROR", "FATAL") and not message.startswith("Store SCP Failed"):
            log.warning("storescp[%s]: %s", pid, message)
            self.last_problem = message
        if message.startswith("Association Received in child"):
            self.seen_association = True
        for path, sender in self.tracker.feed(f"{pid} {message}"):
            self.publisher.submit(path, sender, int(pid))
        if self.tracker.ended is not None:
            self.hints.end(*self.tracker.ended)

    def _check_listener(self, started: float) -> float:
        """Raise if storescp could not start; restart it if it died later. Its start time."""
        assert self.storescp is not None
        code = self.storescp.poll()
        if code is None or self.stop.is_set():
            return started
        if time.monotonic() - started < 3.0 and not self.seen_association:
            raise ListenFailed(
                f"storescp could not listen on port {self.config.port} "
                f"(exit {code}: {self.last_problem or 'no message'})"
            )
        log.error("storescp exited (%s); restarting it", code)
        self.stop.wait(1.0)
        self.storescp = self._start_storescp()
        return time.monotonic()

    def _publish_unproven(self, files: list[tuple[Path, Sender, bool]]) -> None:
        """Files nobody saw finish: publish the whole ones, quarantine the rest."""
        for path, sender, _ in files:
            problem = check_complete(path)
            if problem is None:
                self.publisher.submit(path, sender)
                continue
            log.warning("staged file %s is %s; quarantined", path.name, problem)
            try:
                self.spool.quarantine_files(
                    self.worker, {"instance.dcm": path}, problem, "receive",
                    SenderAET=sender.calling, SenderAddress=sender.address,
                )  # fmt: skip
            except FileNotFoundError:
                pass  # gone meanwhile: nothing to keep
            except OSError as exc:
                log.error("cannot quarantine %s (%s); trying again later", path.name, exc)
            self.tracker.forget(path)


def _die_with_parent() -> None:
    """In storescp's parent before exec: SIGTERM it when mercli dies, however mercli dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
