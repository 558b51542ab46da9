"""Which files in `spool/staging/` storescp has finished, and who sent them.

storescp writes each dataset straight into its file and says nothing when it is done, so
`mercli.receive.dcmtk.engine` reads storescp's log (a log4cplus config, `log_config`, keeps the few
lines it needs, each prefixed with the child's pid) and feeds it line by line to a
`StagingTracker`:

- `Association Received: <address>` and the A-ASSOCIATE-RQ dump (`Calling/Called Application
  Name`) give the sender of everything that child receives;
- a child answers a C-STORE only after its file is closed, and reads the next request only
  after answering, so `Received Store Request` number n+1 proves that the first n stores of
  that child are finished, and `Association Release`/`Aborted` proves all of them are. A
  failed store (`Store SCP Failed`) has its file deleted by storescp and is not counted;
- `Receiving Association failed: <reason>` (an error, so always kept) ends a child before
  any association: over TLS, a failed handshake. `refused` then holds (address, reason);
- with `+uf` the file names carry the child's pid (`<MOD>.X.1.2.276.0.7230010.3.1.4.<host>.
  <pid>.<time>.<counter>`), and the counter orders the files of one child.

Finding a child's files means listing staging/, which holds every file not yet published: under
a backlog (a slow disk, a burst) a listing per log line made the tracker's cost grow with the
square of the backlog, and the engine fell further behind the busier it was. The engine feeds
all the lines of one read `with tracker.one_listing()`, so they share one listing, taken when
first needed, after the lines were read: every file a line proves finished existed then, and a
failed store's file is gone before its child logs anything else. Each name is parsed once.

Files whose completion the log cannot prove (left by a crash, or by a child that died) are
found by `StagingTracker.sweep` once their writer is gone, for the engine to check.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mercli.dicom.sender import Sender

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


def publish_line(path: Path, sender: Sender) -> str:
    """The `PATH<TAB>CALLING<TAB>CALLED<TAB>ADDRESS` line `getdcmtags --publish --stdin` reads."""
    fields = (str(path), sender.calling_aet, sender.called_aet, sender.address)
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
        self.refused: tuple[str, str] | None = None  # set by feed()
        self._orders: dict[str, tuple[int, int, int] | None] = {}  # staged_order, per name
        self._sharing = False  # inside one_listing()
        self._listing: dict[str, tuple[int, int, int] | None] | None = None

    @contextmanager
    def one_listing(self) -> Iterator[None]:
        """Feed the lines of one read against one listing of staging/ (module docstring)."""
        self._sharing, self._listing = True, None
        try:
            yield
        finally:
            self._sharing, self._listing = False, None

    def feed(self, line: str) -> list[tuple[Path, Sender]]:
        """One line of storescp's output; returns the files it proves complete.

        When the line ends an association, `ended` holds (pid, how, sender) until the next call;
        when it says a connection failed before its association (a TLS handshake),
        `refused` holds (peer address, reason).
        """
        self.ended = self.refused = None
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
        elif message.startswith("Receiving Association failed:") and not child.stores:
            reason = message.partition("failed: ")[2].strip()
            self.refused = (child.address or "an unknown address", reason)
            del self.children[pid]
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
        listing = self._listing if self._listing is not None else self._staged()
        if self._sharing:
            self._listing = listing
        files = sorted(
            (order, name)
            for name, order in listing.items()
            if order and order[0] == pid and name not in self.handed
        )
        chosen = [name for _, name in files]
        if count is not None:
            chosen = chosen[: count - child.given]
        child.given += len(chosen)
        return self._hand(chosen, child.sender(self.aet))

    def _staged(self) -> dict[str, tuple[int, int, int] | None]:
        """Every file in staging/ with its staged_order (the last listing, brought up to date:
        set operations rather than a dict built anew, as most names are the same each time)."""
        with os.scandir(self.staging) as entries:
            names = {entry.name for entry in entries if entry.is_file()}
        known = self._orders
        for name in known.keys() - names:  # published or quarantined since: forget them
            del known[name]
        for name in names - known.keys():
            known[name] = staged_order(name)
        self.handed &= names
        return known

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
            sender = child.sender(self.aet) if child else Sender(called_aet=self.aet)
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
