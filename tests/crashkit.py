"""Kill a process at its N-th filesystem step, to prove the spool protocol crash-safe.

`run_until_done(scenario)` forks a child for N = 1, 2, 3, ...; the child counts its calls to
the system calls the spool is built from and SIGKILLs itself at call N, exactly as `kill -9`
or a power cut would stop it (no finally blocks, no atexit). The parent checks the invariants
after each death. It stops when a child finishes without reaching N: then every step of the
scenario has been a crash point once.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Callable
from typing import Any

from mercli import fsutil

PATCHED_OS = (
    "open",
    "write",
    "pwrite",
    "fsync",
    "fdatasync",
    "rename",
    "replace",
    "mkdir",
    "link",
    "unlink",
    "rmdir",
)


def _install_tripwire(limit: int) -> None:
    counter = {"n": 0}

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            counter["n"] += 1
            if counter["n"] == limit:
                os.kill(os.getpid(), signal.SIGKILL)
            return func(*args, **kwargs)

        return step

    for name in PATCHED_OS:
        setattr(os, name, wrap(getattr(os, name)))
    fcntl.flock = wrap(fcntl.flock)  # type: ignore[assignment]
    fsutil._renameat2 = wrap(fsutil._renameat2)


def run_killed_at(step: int, scenario: Callable[[], None]) -> bool:
    """Run scenario in a child killed at `step`; True if it was killed, False if it finished."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            _install_tripwire(step)
            scenario()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"scenario failed at step {step} without being killed"
    return False


def run_until_done(
    scenario: Callable[[], None],
    check: Callable[[int], None],
    setup: Callable[[], None] = lambda: None,
    max_steps: int = 2000,
) -> int:
    """Crash the scenario at every step in turn; `check(step)` after each. Returns step count."""
    for step in range(1, max_steps):
        setup()
        killed = run_killed_at(step, scenario)
        check(step)
        if not killed:
            return step
    raise AssertionError(f"scenario still running after {max_steps} steps")
