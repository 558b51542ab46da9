"""Edit helpers: processes forked when `mercli dispatch` starts, that edit part of a series.

De-identifying a large series is CPU work (reading, de-identifying and encoding each header;
`mercli.dispatch.edits`), and one Python process uses one core. So a dispatcher forks
`count` helpers (by default one fewer than the cores it may use) **before** it starts any
thread, opens any lease or loads pydicom: a fork of a single-threaded process copies no lock
that another thread held (an import in progress, OpenSSL's, a logging handler's), and the
child inherits nothing but the pipes it talks on (every other descriptor is closed). A worker
with a series of `HELPER_MIN` instances or more takes an idle helper, sends it the second half
(`Request`), edits the first half itself, and reads the helper's one-line answer.

The helper rebuilds the target's plan from the job's own job.json (its secret read from the
target's `pseudonym_secret_file`: nothing secret goes through the pipe), imports pydicom on
its first request, and answers with the series it saw, or the error that stopped it
(`EditFailed`'s reason and permanence, or an OSError's errno, text and file): the same outcome
as if the worker had edited that half itself.

Lifetimes: a helper dies with the dispatcher (`PR_SET_PDEATHSIG`, `kill -9` included), ignores
SIGINT/SIGTERM (a stopping dispatcher finishes the jobs in hand, helpers included, then closes
their pipes, and they exit), and one that does not answer by its deadline is killed and not
replaced (forking again would be from a threaded process): the worker's attempt fails, to be
retried, and the dispatcher goes on with fewer helpers.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mercli.service import die_with_parent

log = logging.getLogger(__name__)

HELPER_MIN = 32  # instances in a series from which half of it goes to a helper
CLOSE_WAIT = 5.0  # seconds helpers get to exit once their pipes are closed


def default_count(workers: int) -> int:
    """One fewer than the cores this process may use (its affinity, and a cgroup's CPU
    quota), and no more than `workers`: each worker uses one helper at a time."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    return max(0, min(workers, cores - 1))


class HelperLost(Exception):
    """The helper died or did not answer in time: the attempt can be retried."""


@dataclass(frozen=True)
class Request:
    """What a helper edits: the instances of `source` (a folder of the job at `job`, its
    claim folder with job.json), sorted by name, from the `start`-th on, into `destination`,
    with the plan whose `fingerprint` the worker has. Short: always one atomic pipe write."""

    job: str
    source: str
    start: int
    destination: str
    fingerprint: str


WARM_UP = Request("", "", 0, "", "")  # import pydicom and the editing code; no answer


@dataclass(frozen=True)
class Answer:
    """A helper's answer: the series it saw, or why it stopped."""

    series: str = ""
    edited: int = 0  # instances written: the worker checks it is all it asked for
    error: str = ""
    permanent: bool = False
    errno: int | None = None
    filename: str | None = None


class Helper:
    """One forked helper, seen from the dispatcher: its pid and both ends of its pipes."""

    def __init__(self, pid: int, requests: int, answers: int) -> None:
        self.pid, self.requests, self.answers = pid, requests, answers
        self.warm = False
        self._buffer = b""
        self._killing = threading.Lock()

    def send(self, request: Request) -> None:
        """Hand it `request` (it is idle, so it reads at once); HelperLost if it is gone."""
        data = (json.dumps(asdict(request)) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.requests, data) :]
        except OSError as exc:  # EPIPE: it died
            raise HelperLost(f"the edit helper is gone ({exc.strerror})") from None

    def receive(self, deadline: float) -> Answer:
        """Its answer to the last request, within `deadline` seconds; HelperLost."""
        line = self._read_line(time.monotonic() + deadline)
        try:
            return Answer(**json.loads(line))
        except (ValueError, TypeError) as exc:
            raise HelperLost(f"the edit helper answered nonsense ({exc})") from None

    def _read_line(self, until: float) -> bytes:
        poller = select.poll()  # not select(): descriptors past 1024 are fine
        poller.register(self.answers, select.POLLIN | select.POLLHUP)
        while b"\n" not in self._buffer:
            left = until - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise HelperLost(f"the edit helper gave no answer in time (pid {self.pid})")
            chunk = os.read(self.answers, 65536)
            if not chunk:
                raise HelperLost("the edit helper died before it finished")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        """SIGKILL and reap it unless reaped already (pid 0), close its pipes (idempotent:
        one thread at a time, so a descriptor is never closed twice)."""
        with self._killing:
            self._kill()

    def _kill(self) -> None:
        pid, self.pid = self.pid, 0
        try:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        finally:
            for fd in (self.requests, self.answers):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.requests = self.answers = -1


class EditHelpers:
    """The dispatcher's helpers: `take` an idle one, `give_back` it after a good answer,
    `lose` one that failed; `close` at the end."""

    def __init__(self, helpers: list[Helper]) -> None:
        self._idle = list(helpers)
        self._all = list(helpers)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, count: int) -> EditHelpers:
        """Fork `count` helpers now: only from a single-threaded process (else none, and the
        workers edit alone)."""
        if count <= 0:
            return cls([])
        if threading.active_count() > 1:
            log.warning("edit helpers not started: threads run already")
            return cls([])
        helpers: list[Helper] = []
        gc.collect()
        gc.freeze()  # the children share the parent's heap pages instead of touching them
        try:
            for _ in range(count):
                helper = _fork()
                if helper is None:
                    break
                helpers.append(helper)
        finally:
            gc.unfreeze()
        return cls(helpers)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._all)

    def warm_up(self) -> None:
        """Have one idle helper that has not edited yet import pydicom now (no answer), so
        it is ready when this worker, which is about to import it too, sends half a series.
        One per call: helpers no worker needs yet stay small."""
        with self._lock:  # held while sending: nobody else writes to an idle helper's pipe
            cold = [helper for helper in self._idle if not helper.warm]
            if cold:
                cold[-1].warm = True  # the one `take` hands out next
                with contextlib.suppress(HelperLost):  # found dead at its first request
                    cold[-1].send(WARM_UP)  # a short line: never blocks on an idle helper

    def take(self) -> Helper | None:
        with self._lock:
            helper = self._idle.pop() if self._idle else None
        if helper is not None:
            helper.warm = True  # it imports pydicom for this request if not before
        return helper

    def give_back(self, helper: Helper) -> None:
        """Idle again; killed instead if the pool was closed meanwhile."""
        with self._lock:
            if helper in self._all and not self._closed:
                self._idle.append(helper)
                return
            if helper in self._all:
                self._all.remove(helper)
        helper.kill()

    def lose(self, helper: Helper, why: str) -> None:
        """Kill a helper that died, hung or answered nonsense; it is not replaced."""
        with self._lock:
            if helper in self._all:
                self._all.remove(helper)
        log.error("edit helper %d dropped (%s); %d left", helper.pid, why, self.count)
        helper.kill()

    def close(self) -> None:
        """Close every idle helper's request pipe (it exits), wait a little, kill what is
        left; a helper a worker still holds is killed when the worker gives it back (or
        with this process)."""
        with self._lock:
            self._closed = True
            helpers, self._idle = self._idle, []
            self._all = [helper for helper in self._all if helper not in helpers]
        for helper in helpers:
            with contextlib.suppress(OSError):
                os.close(helper.requests)
            helper.requests = -1
        until = time.monotonic() + CLOSE_WAIT
        for helper in helpers:
            while helper.pid and time.monotonic() < until:
                try:
                    if os.waitpid(helper.pid, os.WNOHANG)[0]:
                        helper.pid = 0  # reaped: its pid may be another process's now
                except ChildProcessError:
                    helper.pid = 0
                if helper.pid:
                    time.sleep(0.01)
            helper.kill()  # the ones still there after CLOSE_WAIT; the pipes of all


def _fork() -> Helper | None:
    """One helper, or None (logged) when there are no descriptors or processes for it."""
    fds: list[int] = []
    parent = os.getpid()
    try:
        fds += os.pipe()
        fds += os.pipe()
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        log.warning("edit helper not started: %s", exc)
        return None
    requests_read, requests_write, answers_read, answers_write = fds
    if pid == 0:  # pragma: no cover (the child: tested by what it does)
        _child(parent, requests_read, answers_write)
    os.close(requests_read)
    os.close(answers_write)
    return Helper(pid, requests_write, answers_read)


def _child(parent: int, requests: int, answers: int) -> None:
    """A helper's whole life: serve requests until the pipe closes, then `os._exit`."""
    code = 1
    try:
        if not die_with_parent(signal.SIGKILL) or os.getppid() != parent:
            return  # it could outlive the dispatcher, or the dispatcher is gone already
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the dispatcher stops us: see above
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        keep = sorted((requests, answers))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
        logging.disable(logging.CRITICAL)  # stderr is the dispatcher's: it says what failed
        with os.fdopen(requests, "rb") as incoming:
            for line in incoming:
                answer = _serve(line)
                if answer is None:
                    continue
                data = (json.dumps(asdict(answer)) + "\n").encode()
                while data:
                    data = data[os.write(answers, data) :]
        code = 0
    finally:
        os._exit(code)


def _serve(line: bytes) -> Answer | None:
    """The answer to one request line (None to a warm-up: it gets none). The editing code
    is `mercli.dispatch.edits.serve_request`, loaded by name on the first line: this module
    stays free of pydicom, which the dispatcher has not loaded when it forks."""
    editing = importlib.import_module("mercli.dispatch.edits")
    try:
        request = Request(**json.loads(line))
    except (ValueError, TypeError) as exc:
        return Answer(error=f"the edit helper got a bad request: {exc}")
    if request == WARM_UP:
        return None
    try:
        answer: Answer = editing.serve_request(request)
        return answer
    except Exception as exc:  # a bug, or MemoryError: retried, not the instance's fault
        return Answer(error=f"the edit helper failed: {exc!r}")


_current: EditHelpers | None = None


def use(helpers: EditHelpers | None) -> None:
    """Make `helpers` the ones this process's workers take from (None: none)."""
    global _current
    _current = helpers


def current() -> EditHelpers | None:
    return _current


def warm_up() -> None:
    """`EditHelpers.warm_up` of this process's helpers, if it has any."""
    if _current is not None:
        _current.warm_up()
