"""`mercli receive --engine dcmtk`: DCMTK's storescp on the wire, getdcmtags into the spool.

mercure's proven path, made faster: `storescp --fork` receives (one child process per
association, every storage SOP class with `-pm`, every transfer syntax with `+xa`, written
bit for bit with `+B`) into `spool/staging/`, and a few long-lived `getdcmtags --publish
--stdin` processes move each completed file into `incoming/` with its sidecar, exactly as the
default engine does. No process is started per image.

When is a staged file complete, and who sent it? storescp says nothing when a file is done, so this
module reads storescp's log and `mercli.receive.dcmtk.staging` works it out from there;
`mercli.receive.dcmtk.publisher` runs the getdcmtags processes. Files whose completion the log
cannot prove (left by a crash, or by a child that died) are picked up when their writer is gone,
checked element by element (`mercli.receive.dcmtk.completeness`), and published if whole,
quarantined in `error/` with the reason if not.

storescp is DCMTK's (`find_storescp`: $MERCLI_STORESCP, else the first on PATH whose
`--version` says DCMTK, else /usr/bin/storescp), never pynetdicom's app of the same name that a
venv puts first on PATH. It serves every association it is offered, one process each; mercli
could only cut those over a limit after they were answered, so `--max-associations` (other
than its default) is refused like `--allow-aet`.

TLS (SPEC §6.1): storescp listens on one port with one transport, so with TLS on --tls-port
and plain DICOM on --port two storescp run side by side, their logs read by the same tracker
(each line carries its child's pid). `storescp +tls KEY CERT -pw` (keys unencrypted, never a
password prompt), `+cf CA`, and `--require-peer-cert` with --tls-require-client-cert, else
`--verify-peer-cert` with a CA and `--ignore-peer-cert` without: what the default engine does.
storescp forks before the handshake, so a silent or failing peer holds only its own child; a
failed handshake is logged with the peer's address from the child's log.

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
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mercli.dicom.sender import Sender
from mercli.errors import ConfigError, ListenError, UsageError
from mercli.fsutil import make_dir
from mercli.names import printable
from mercli.receive.dcmtk.completeness import check_complete
from mercli.receive.dcmtk.publisher import HintBook, Publisher, RetryQueue, find_getdcmtags
from mercli.receive.dcmtk.staging import StagingTracker, log_config, staged_order
from mercli.receive.handler import ReceiveConfig, tls_context
from mercli.service import die_with_parent, ignore_signals, stop_on_signals
from mercli.spool import Spool, Worker, recover

__all__ = [
    "StagingTracker",
    "check_config",
    "find_getdcmtags",
    "find_storescp",
    "log_config",
    "serve_dcmtk",
    "staged_order",
]

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0  # seconds between looks for files of children that are gone
# Seconds storescp's log is left to gather once it has something to say. Read line by line,
# mercli woke once an instance and took a core from the storescu/storescp exchange on a
# 2-core machine: 12 KB instances reached 0.67x of `storescp -od`; gathering 2, 3 or 5 ms
# of lines made it 0.86x, 0.91x and 0.91x (6 interleaved runs each). Files reach getdcmtags
# at most this much later; storescp's answers do not wait for mercli at all.
LOG_GATHER = 0.005
# storescp's files are born with the spool's mode (0640, FILE_MODE): no one else reads a
# staged instance, and getdcmtags has no chmod to make when it publishes one.
STAGED_UMASK = 0o027


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
    if config.max_associations != ReceiveConfig.max_associations:
        # storescp --fork negotiates in a child forked per connection, before mercli hears of
        # it: nothing can answer A-ASSOCIATE-RJ; killing the child races its first C-STORE
        # response, and stopping the accept loop only queues peers and lets them in at once.
        raise UsageError(
            "--max-associations: storescp serves every association it is offered (one process "
            "each) and cannot limit them; use --engine pynetdicom or a firewall's connection limit"
        )


STORESCP_ENV = "MERCLI_STORESCP"  # the path of DCMTK's storescp, if PATH finds another
DEBIAN_STORESCP = Path("/usr/bin/storescp")  # tried after PATH
_DCMTK_VERSION = re.compile(r"\$dcmtk: storescp v(\S+)")


def find_storescp() -> tuple[Path, str]:
    """DCMTK's storescp and its version: $MERCLI_STORESCP, else the first `storescp` on PATH
    that is DCMTK's, else /usr/bin/storescp. Another `storescp` (pynetdicom installs one, and
    a venv's bin/ usually comes first on PATH) takes other options and would fail at start
    with a misleading message: it is passed over, and named in the error if nothing is left."""
    override = os.environ.get(STORESCP_ENV)
    if override:
        version, problem = _dcmtk_version(override)
        if version is None:
            raise ConfigError(f"${STORESCP_ENV}={override} is not DCMTK's storescp ({problem})")
        return Path(override), version
    rejected: list[str] = []
    seen: set[str] = set()
    on_path = [os.path.join(folder or ".", "storescp") for folder in _path_folders()]
    for candidate in [*on_path, str(DEBIAN_STORESCP)]:
        real = os.path.realpath(candidate)
        if real in seen or not os.path.isfile(candidate):
            continue
        seen.add(real)
        version, problem = _dcmtk_version(candidate)
        if version is not None:
            for passed in rejected:
                log.info("passed over %s", passed)
            return Path(candidate), version
        rejected.append(f"{candidate} ({problem})")
    if not rejected:
        raise ConfigError(
            f"storescp not found: install DCMTK (Debian package dcmtk) or set {STORESCP_ENV}"
        )
    raise ConfigError(
        f"no DCMTK storescp found, only {'; '.join(rejected)}: install DCMTK "
        f"(Debian package dcmtk) or set {STORESCP_ENV} to its path"
    )


def _path_folders() -> list[str]:
    return os.environ.get("PATH", os.defpath).split(os.pathsep)


def _dcmtk_version(path: str) -> tuple[str | None, str]:
    """(DCMTK version, "") if `path --version` says it is DCMTK's storescp, else (None, why)."""
    if not os.access(path, os.X_OK) or not os.path.isfile(path):
        return None, "not an executable file"
    try:
        result = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
            env={**os.environ, "TCP_NODELAY": "1"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`--version` failed: {exc}"
    output = result.stdout + result.stderr
    match = _DCMTK_VERSION.search(output)
    if result.returncode == 0 and match:
        return match[1], ""
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    said = f"printed {first[:80]!r}" if first else "printed nothing"
    return None, f"`--version` exited {result.returncode} and {said}"


def serve_dcmtk(spool_root: Path, config: ReceiveConfig) -> None:
    """Receive with storescp until SIGINT/SIGTERM, then let open associations finish."""
    check_config(config)
    tls_context(config)  # unusable files are named by us, not by a storescp that exits
    storescp = find_storescp()
    binary = find_getdcmtags()
    spool = Spool.open(spool_root)
    recover(spool)
    staging = spool.staging
    make_dir(staging, exist_ok=True)
    with Worker(spool, "receive-dcmtk") as worker:
        _Engine(spool, worker, staging, binary, config, storescp).run()


class _Engine:
    """The supervisor: storescp's output in, files out to the publishers, until stopped."""

    def __init__(
        self,
        spool: Spool,
        worker: Worker,
        staging: Path,
        binary: Path,
        config: ReceiveConfig,
        storescp: tuple[Path, str],
    ) -> None:
        self.spool, self.worker, self.staging, self.config = spool, worker, staging, config
        self.storescp_path, self.storescp_version = storescp
        self.tracker = StagingTracker(staging, config.aet)
        self.retries = RetryQueue()
        self.stop = threading.Event()
        self.ports = _ports(config)  # port -> TLS on it
        self.storescps: dict[int, _Storescp] = {}  # port -> the storescp listening there
        self.pipes: dict[int, bytes] = {}  # fd of a storescp output still open -> unended line
        self.hints = HintBook(spool, worker)
        self.publisher = Publisher(binary, spool, config.publishers, self.retries, self.hints)
        self.seen_association = False
        self.last_problem = ""

    def run(self) -> None:
        stop_on_signals(self.stop, "finishing open associations")
        for port in self.ports:
            self._start_storescp(port)
        try:
            self._pump()
        finally:
            for running in self.storescps.values():
                if running.process.poll() is None:
                    running.process.terminate()
            self._publish_unproven(self.tracker.sweep(everything=True))
            self.publisher.close()
            ignore_signals()
        log.info(
            "receiver stopped: %d published, %d quarantined, %d publish failures",
            self.publisher.published,
            self.publisher.quarantined,
            self.publisher.failed,
        )

    def _start_storescp(self, port: int) -> None:
        config_file = self.worker.tmp_path(".log4cplus")
        config_file.write_text(log_config())
        command = [
            str(self.storescp_path),
            "--fork",
            "-lc",
            str(config_file),
            "-dhl",
            "+B",
            "+xa",
            "-pm",
            "+uf",
            "-od",
            str(self.staging),
            "-aet",
            self.config.aet,
            "-ts",
            str(int(self.config.network_timeout)),
            "-pdu",
            "131072",
            *(tls_arguments(self.config) if self.ports[port] else []),
            str(port),
        ]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,  # never a password prompt
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
            start_new_session=True,  # Ctrl-C must not cut the children's associations
            preexec_fn=_die_with_parent,
            umask=STAGED_UMASK,
        )
        assert process.stdout is not None
        self.storescps[port] = _Storescp(process, time.monotonic())
        self.pipes[process.stdout.fileno()] = b""
        log.info(
            "receiving with %s (DCMTK %s) on port %d%s as %s; it serves every association it is "
            "offered, one process each",
            self.storescp_path,
            self.storescp_version,
            port,
            " (TLS)" if self.ports[port] else "",
            self.config.aet,
        )

    def _pump(self) -> None:
        """Read every storescp's output until stopped and all of them (children too) are gone."""
        next_sweep = 0.0
        while self.pipes:
            ready, _, _ = select.select(list(self.pipes), [], [], SWEEP_INTERVAL / 4)
            if ready:
                time.sleep(LOG_GATHER)  # let storescp's lines gather: see LOG_GATHER
            for fd in ready:
                self._read_output(fd)
            if self.stop.is_set():
                for running in self.storescps.values():
                    if running.process.poll() is None:
                        running.process.terminate()  # no new associations; open ones go on
            else:
                self._check_listeners()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_INTERVAL
                self._publish_unproven(self.tracker.sweep())
                for path, sender in self.retries.due():
                    if path.exists():
                        self.publisher.submit(path, sender)

    def _read_output(self, fd: int) -> None:
        """Feed whole lines to the tracker; at end of output (a storescp and all its children
        gone) close the pipe, which the next loop no longer reads."""
        data = os.read(fd, 1 << 16)
        if not data:
            del self.pipes[fd]
            for running in self.storescps.values():
                stdout = running.process.stdout
                if stdout is not None and not stdout.closed and stdout.fileno() == fd:
                    running.process.wait()
                    stdout.close()
            return
        *lines, self.pipes[fd] = (self.pipes[fd] + data).split(b"\n")
        with self.tracker.one_listing():
            for line in lines:
                self._line(line.decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        pid, _, rest = line.partition(" ")
        level, _, message = rest.partition(" ")
        if message.startswith("Association Received in child"):
            self.seen_association = True
        for path, sender in self.tracker.feed(f"{pid} {message}"):
            self.publisher.submit(path, sender, int(pid))
        if self.tracker.refused is not None:
            address, reason = self.tracker.refused
            log.warning("connection from %s refused: %s", printable(address), printable(reason))
        elif level in ("WARN", "ERROR", "FATAL") and not message.startswith("Store SCP Failed"):
            log.warning("storescp[%s]: %s", pid, message)
            self.last_problem = message
        if self.tracker.ended is not None:
            self.hints.end(*self.tracker.ended)

    def _check_listeners(self) -> None:
        """Raise if a storescp could not start; restart one that died later."""
        for port, running in list(self.storescps.items()):
            code = running.process.poll()
            if code is None:
                continue
            if time.monotonic() - running.started < 3.0 and not self.seen_association:
                raise ListenError(
                    f"storescp ({self.storescp_path}) could not listen on port {port} "
                    f"(exit {code}: {self.last_problem or 'no message'})"
                )
            log.error("storescp on port %d exited (%s); restarting it", port, code)
            self.stop.wait(1.0)
            if not self.stop.is_set():
                self._start_storescp(port)

    def _publish_unproven(self, files: list[tuple[Path, Sender, bool]]) -> None:
        """Files nobody saw finish: publish the whole ones, quarantine the rest."""
        for path, sender, _ in files:
            problem = check_complete(path)
            if problem is None:
                self.publisher.submit(path, sender)
                continue
            log.warning("staged file %s is %s; quarantined", path.name, problem)
            try:
                self.worker.quarantine_files(
                    {"instance.dcm": path},
                    problem,
                    "receive",
                    SenderAET=sender.calling_aet,
                    SenderAddress=sender.address,
                )
            except FileNotFoundError:
                pass  # gone meanwhile: nothing to keep
            except OSError as exc:
                log.error("cannot quarantine %s (%s); trying again later", path.name, exc)
            self.tracker.forget(path)


@dataclass
class _Storescp:
    """A storescp listening on one port, and when it was started."""

    process: subprocess.Popen[bytes]
    started: float


def _ports(config: ReceiveConfig) -> dict[int, bool]:
    """The ports to listen on, each with whether it speaks TLS (see ReceiveConfig)."""
    ports = {} if config.plain_port is None else {config.plain_port: False}
    if config.tls_listen_port is not None:
        ports[config.tls_listen_port] = True
    return ports


def tls_arguments(config: ReceiveConfig) -> list[str]:
    """storescp's TLS options for `config` (the same policy as the default engine's)."""
    assert config.tls_cert is not None
    arguments = ["+tls", config.tls_key or config.tls_cert, config.tls_cert, "-pw"]
    if config.tls_ca:
        arguments += ["+cf", config.tls_ca]
    if config.tls_require_client_cert:
        arguments.append("--require-peer-cert")
    elif config.tls_ca:
        arguments.append("--verify-peer-cert")
    else:
        arguments.append("--ignore-peer-cert")
    return arguments


def _die_with_parent() -> None:
    """In storescp's parent before exec: SIGTERM it when mercli dies, however mercli dies."""
    die_with_parent(signal.SIGTERM)
