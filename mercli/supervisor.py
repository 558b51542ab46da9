"""`mercli run`: receive, route, dispatch and a periodic purge under one supervisor.

The parts are the ordinary commands, each in its own process (`python -m mercli <part>`), so
the single-box default behaves exactly like a systemd or cron setup of the same commands.
The supervisor prefixes every line a part writes with its name, restarts a part that dies
(after a pause that grows while it keeps dying), and stops everything when a part cannot
start at all (a port in use, a broken rules file): restarting would not help. SIGINT/SIGTERM
stop the parts in pipeline order — receive first (it lets open associations finish), then
route, then dispatch (then notify, which sends what the others wrote) — so nothing
accepted is left half way.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mercli.errors import ExitCode, MercliError
from mercli.service import stop_on_signals

log = logging.getLogger(__name__)

EARLY_EXIT = 3.0  # a part that exits within this many seconds of starting could not start
MAX_RESTART_DELAY = 30.0
STOP_TIMEOUT = 120.0


class PartFailed(MercliError):
    """A part could not start; its exit code becomes ours."""

    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"{name} could not start (exit {code}); see its messages above")
        known = {int(c) for c in ExitCode}
        self.exit_code = ExitCode(code) if code in known else ExitCode.SOME_FAILED


@dataclass
class Part:
    """One long-running command of the pipeline."""

    name: str
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    pumps: list[threading.Thread] = field(default_factory=list)


@dataclass(frozen=True)
class RunConfig:
    """What `mercli run` was asked for; each part gets its share of the options."""

    spool: Path
    rules: Path
    receive_args: tuple[str, ...] = ()
    workers: int = 4
    purge_every: float = 3600.0  # 0 = no purge
    process: bool = False  # the rules define modules: run `mercli process` too (SPEC §7)
    notify: bool = False  # the rules define [notify.*] channels: run `mercli notify` (§8)


def _mercli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mercli", *args]


def plan(config: RunConfig) -> list[Part]:
    """The parts, in pipeline order."""
    spool = ["--spool", str(config.spool)]
    parts = [
        Part("receive", _mercli("receive", *spool, *config.receive_args)),
        Part("route", _mercli("route", *spool, "--rules", str(config.rules))),
        Part("dispatch", _mercli("dispatch", *spool, "--workers", str(config.workers))),
    ]
    if config.process:
        parts.insert(2, Part("process", _mercli("process", *spool)))
    if config.notify:  # last: every other part writes notifications, so it stops after them
        parts.append(Part("notify", _mercli("notify", *spool)))
    return parts


class Supervisor:
    """Starts, watches, restarts and stops the parts."""

    def __init__(self, config: RunConfig, verbosity: Sequence[str] = ()) -> None:
        self.config = config
        self.verbosity = list(verbosity)
        self.parts = plan(config)
        self.stop = threading.Event()
        self.next_purge = time.monotonic() + config.purge_every

    def run(self) -> None:
        stop_on_signals(self.stop, "stopping " + ", ".join(part.name for part in self.parts))
        try:
            for part in self.parts:
                self._start(part)
            while not self.stop.wait(0.2):
                for part in self.parts:
                    self._watch(part)
                self._maybe_purge()
        finally:
            self._stop_all()

    def _start(self, part: Part) -> None:
        part.process = subprocess.Popen(
            [*part.args, *self.verbosity],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop the parts in order
        )
        part.started = time.monotonic()
        pump = threading.Thread(target=_prefix, args=(part.name, part.process), daemon=True)
        pump.start()
        part.pumps.append(pump)
        log.info("%s started (pid %d)", part.name, part.process.pid)

    def _watch(self, part: Part) -> None:
        assert part.process is not None
        code = part.process.poll()
        if code is None:
            if time.monotonic() - part.started > 60:
                part.restarts = 0  # it has been running fine: forget old trouble
            return
        if time.monotonic() - part.started < EARLY_EXIT and part.restarts == 0 and code != 0:
            raise PartFailed(part.name, code)
        delay = min(MAX_RESTART_DELAY, 2.0**part.restarts)
        part.restarts += 1
        log.error("%s exited (%s); restarting it in %.0f s", part.name, code, delay)
        if not self.stop.wait(delay):
            self._start(part)

    def _maybe_purge(self) -> None:
        if not self.config.purge_every or time.monotonic() < self.next_purge:
            return
        self.next_purge = time.monotonic() + self.config.purge_every
        command = _mercli(
            "purge", "--spool", str(self.config.spool), "--rules", str(self.config.rules)
        )
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_prefix, args=("purge", process), daemon=True).start()

    def _stop_all(self) -> None:
        for part in self.parts:  # pipeline order: nothing upstream keeps feeding a stopped part
            process = part.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop in %.0f s; killing it", part.name, STOP_TIMEOUT)
                process.kill()
                process.wait()
            for pump in part.pumps:
                pump.join(timeout=5)
        log.info("all parts stopped")


def _prefix(name: str, process: subprocess.Popen[bytes]) -> None:
    """Copy a part's output to our stderr, each line prefixed with the part's name."""
    assert process.stdout is not None
    label = f"{name:<8} | ".encode()
    out = sys.stderr.buffer
    for line in process.stdout:
        out.write(label + line)
        out.flush()
