"""Helpers shared by the reliability tests: mercli commands and services as real processes,
DCMTK and pynetdicom peers, and views of what a spool and a target hold."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from pynetdicom import AE, StoragePresentationContexts, evt

from mercli.tags import UnreadableDicom, read_tags
from tests.kit import EXPLICIT, IMPLICIT, ROOT
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until

MERCLI = [sys.executable, "-m", "mercli"]
ENV = {**DCMTK_ENV, "PYTHONPATH": str(ROOT)}


def soak_seed() -> int:
    """MERCLI_SOAK_SEED if set, else a fresh one; printed so a failure can be replayed."""
    raw = os.environ.get("MERCLI_SOAK_SEED")
    seed = int(raw) if raw else random.SystemRandom().randrange(1 << 31)
    print(f"MERCLI_SOAK_SEED={seed}")
    return seed


def fuzz_seed() -> int:
    """MERCLI_SOAK_SEED if set, else a fixed seed: `make test` replays one known corpus,
    `make soak` explores new ones. Printed either way."""
    raw = os.environ.get("MERCLI_SOAK_SEED")
    seed = int(raw) if raw else 20261128
    print(f"MERCLI_SOAK_SEED={seed}")
    return seed


def soak_seconds(default: float) -> float:
    """How long the chaos phase of a soak test runs (MERCLI_SOAK_SECONDS)."""
    return float(os.environ.get("MERCLI_SOAK_SECONDS") or default)


def mercli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one mercli command to completion, capturing stdout and stderr."""
    return subprocess.run(
        [*MERCLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
        check=False,
    )


class Service:
    """A long-running `mercli <command>` whose stdout and stderr go to one log file."""

    def __init__(self, log: Path, *args: str | Path) -> None:
        self.args = [str(a) for a in args]
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: TextIO | None = None
        self.starts = 0

    def start(self) -> Service:
        self._log_file = self.log.open("a")
        self.process = subprocess.Popen(
            [*MERCLI, *self.args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=ROOT,
        )
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as `kill -9` or the OOM killer would: no cleanup of any kind."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)
        self._close()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._close()
        return code

    def _close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def storescp(out: Path, *extra: str, port: int | None = None) -> Iterator[int]:
    """DCMTK storescp, bit-preserving, one unique file per received instance (+uf)."""
    out.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        ["storescp", "+B", "+uf", "-od", str(out), *extra, str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port) or process.poll() is not None, what="storescp")
        assert process.poll() is None, "storescp did not start"
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def target_toml(name: str, settings: Mapping[str, Any]) -> str:
    lines = [f"[targets.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    return "\n".join(lines) + "\n"


def dicom_target(port: int, **options: Any) -> dict[str, Any]:
    return {"type": "dicom", "host": "127.0.0.1", "port": port, "called_aet": "ANY", **options}


def write_rules(
    path: Path,
    targets: Mapping[str, Mapping[str, Any]],
    *,
    settle: str = "0.3s",
    series_timeout: str = "5s",
    rules: str | None = None,
) -> Path:
    """A rules file: the given targets, and by default one rule sending everything to all."""
    text = f'[route]\nsettle = "{settle}"\nseries_timeout = "{series_timeout}"\n\n'
    text += "".join(target_toml(name, settings) for name, settings in targets.items())
    names = ", ".join(json.dumps(name) for name in targets)
    text += rules if rules is not None else f'\n[[rules]]\nname = "all"\ntargets = [{names}]\n'
    path.write_text(text)
    return path


def sop_uids(folder: Path) -> Counter[str]:
    """SOP Instance UID of every DICOM file under folder (any depth), counted."""
    found: Counter[str] = Counter()
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith((".tags", ".json")):
            try:
                found[str(read_tags(path)["SOPInstanceUID"])] += 1
            except (UnreadableDicom, KeyError):
                continue
    return found


def items(spool: Path, state: str) -> list[Path]:
    folder = spool / state
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def events(spool: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted((spool / "events").glob("*.ndjson"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]


def claimed(spool: Path) -> list[Path]:
    return sorted(p for p in (spool / "claims").glob("*/*") if p.is_dir())


def drain(spool: Path, rules: Path, timeout: float = 90) -> None:
    """Flush: route every waiting series, then dispatch until outgoing/ is empty."""
    routed = mercli("route", "--once", "--all", "--rules", rules, "--spool", spool)
    assert routed.returncode == 0, routed.stderr
    deadline = time.monotonic() + timeout
    while items(spool, "outgoing") or claimed(spool):
        assert time.monotonic() < deadline, f"outgoing not empty after {timeout}s"
        result = mercli("dispatch", "--once", "--spool", spool)
        assert result.returncode in (0, 1), result.stderr
        if items(spool, "outgoing"):
            time.sleep(0.1)  # a retry is scheduled a little later (retry_delay); poll again


class Scp:
    """A pynetdicom C-STORE SCP that records what it stored and misbehaves on request.

    `status(ds)` answers each C-STORE; `abort_at` aborts the association when that many
    instances have been stored (once); `delay` stalls each answer (a slow or hung target);
    `refuse` rejects every association (the called AE title must be one nobody uses).
    """

    def __init__(
        self,
        status: Callable[[Any], int] = lambda ds: 0,
        *,
        delay: float = 0.0,
        abort_at: int | None = None,
        refuse: bool = False,
    ) -> None:
        self.received: list[str] = []  # SOP Instance UIDs stored, in order
        self.status, self.delay, self.abort_at = status, delay, abort_at
        ae = AE(ae_title="NOT_YOU" if refuse else "ANY")
        ae.require_called_aet = refuse
        ae.maximum_pdu_size = 0
        for context in StoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), [EXPLICIT, IMPLICIT])
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        self.server = server

    def _store(self, event: Any) -> int:
        if self.abort_at is not None and len(self.received) == self.abort_at:
            self.abort_at = None
            event.assoc.abort()
            return 0xA700
        time.sleep(self.delay)  # the misbehaviour itself, not synchronisation
        ds = event.dataset
        status = self.status(ds)
        if status in (0, 0xB000):
            self.received.append(str(ds.SOPInstanceUID))
        return status

    def close(self) -> None:
        self.server.shutdown()
