"""`mercli log`: building the event index, updating it, and answering one study.

A year of events is written straight as NDJSON day files (fast; the router would take days
to make them): studies of 1-6 series of 1-120 instances, each instance a `received`, each
series `routed` to one or two targets with study, accession and patient keys, then
`dispatched`, sometimes after a `retry`, sometimes `failed` and `resent`, and `purged` weeks
later; about 10 million events (`MERCLI_BENCH_LOG_EVENTS` to change it).

Rows:
- index build: the first `mercli log --study UID` on that log (a subprocess: it builds the
  index from scratch, then answers), events per second of wall time;
- incremental update: a day of new events (100,000) appended, indexed by `open_index`;
- query: `mercli log --study UID` on the up-to-date index, as a subprocess, median of five
  (Python start-up included; the start-up alone is in the note). Target: <= 1 s.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.report import Row
from mercli.audit.index import INDEX_FILE, open_index
from mercli.spool import Spool

EVENTS = int(os.environ.get("MERCLI_BENCH_LOG_EVENTS", "10000000"))
DAYS = 365
INCREMENT = 100_000
TARGETS = ("pacs", "archive", "ai", "research")
RULES = ("ct-to-pacs", "mr-to-pacs", "chest-to-ai", "archive-all", "research-copy")
SENDERS = ("CT01", "CT02", "MR01", "MR02", "XA01", "MODLINK")


class LogWriter:
    """Writes realistic events as day files, the way EventLog.append formats them."""

    def __init__(self, directory: Path, start: datetime, per_day: int) -> None:
        self.directory = directory
        self.now = start
        self.step = timedelta(seconds=86400 / max(per_day, 1))
        self.count = 0
        self.day = ""
        self.out: list[str] = []
        self.studies: list[str] = []

    def emit(self, event: str, **fields: object) -> None:
        self.now += self.step
        day = f"{self.now:%Y-%m-%d}"
        if day != self.day:
            self.flush()
            self.day = day
        record = {"at": self.now.isoformat(timespec="microseconds"), "event": event, **fields}
        self.out.append(json.dumps(record, separators=(",", ":")))
        self.count += 1

    def flush(self) -> None:
        if self.out:
            with (self.directory / f"{self.day}.ndjson").open("a") as fh:
                fh.write("\n".join(self.out) + "\n")
            self.out.clear()

    def study(self, rng: random.Random, number: int) -> None:
        """One study: its series received, routed, dispatched (or failed and resent), purged."""
        study = f"1.2.826.0.1.3680043.8.498.{number}.{rng.randrange(10**9)}"
        self.studies.append(study)
        keys = {"accession_key": f"{rng.getrandbits(128):032x}"}
        keys["patient_key"] = f"{rng.getrandbits(128):032x}"
        sender = rng.choice(SENDERS)
        for s in range(rng.randint(1, 6)):
            series = f"{study}.{s + 1}"
            count = rng.randint(1, 120)
            for i in range(count):
                fields = {"series": series, "instance": f"{series}.{i + 1}", "sender": sender}
                self.emit("received", **fields, replaced=False)
            for target in rng.sample(TARGETS, rng.randint(1, 2)):
                self._item(rng, series, study, count, target, keys)

    def _item(
        self,
        rng: random.Random,
        series: str,
        study: str,
        count: int,
        target: str,
        keys: dict[str, str],
    ) -> None:
        item = f"{self.now:%Y%m%dT%H%M%S.%f}-{rng.getrandbits(48):012x}"
        rules = rng.sample(RULES, rng.randint(1, 2))
        self.emit(
            "routed",
            item=item,
            series=series,
            instances=count,
            rules=rules,
            study=study,
            **keys,
            target=target,
        )
        if rng.random() < 0.05:
            self.emit("retry", item=item, target=target, attempt=1, error="timeout", delay=30.0)
        if rng.random() < 0.01:
            self.emit("failed", item=item, target=target, attempt=5, reason="association refused")
            again = f"{self.now:%Y%m%dT%H%M%S.%f}-{rng.getrandbits(48):012x}"
            self.emit("resent", **{"from": f"error/{item}"}, item=item, to=f"outgoing/{again}")
            item = again
        self.emit("dispatched", item=item, target=target, attempt=1, instances=count)
        if rng.random() < 0.5:
            self.emit("purged", state="success", item=item, bytes=count * 520_000, age=2.6e6)


def write_log(events: Path, total: int, seed: int = 7) -> LogWriter:
    """About `total` events over DAYS days ending today; the writer (studies, count)."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=DAYS)
    writer = LogWriter(events, start, total // DAYS)
    number = 0
    while writer.count < total:
        writer.study(rng, number)
        number += 1
    writer.flush()
    return writer


def _mercli_log(spool: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "mercli", "log", "-q", "--spool", str(spool), *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run() -> list[Row]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("MERCLI_BENCH_DIR")) as temp:
        spool = Spool.open(Path(temp) / "spool")
        started = time.perf_counter()
        writer = write_log(spool.events.directory, EVENTS)
        generated = time.perf_counter() - started
        log_bytes = _size(spool.events.directory)
        study = writer.studies[len(writer.studies) // 2]
        build = _mercli_log(spool.root, "--study", study)
        index_bytes = (spool.events.directory / INDEX_FILE).stat().st_size
        size = f"{writer.count / 1e6:.1f}M events, {len(writer.studies)} studies"
        machine = f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
        note = (
            f"{size}, log {log_bytes / 2**20:.0f} MiB (written in {generated:.0f} s), "
            f"index {index_bytes / 2**20:.0f} MiB; {machine}"
        )
        rows = [
            Row("log", "index build", "first mercli log", writer.count / build, "ev/s", note=note)
        ]
        rows.append(_increment(spool, writer))
        rows.append(_query(spool, study, size))
        return rows


def _increment(spool: Spool, writer: LogWriter) -> Row:
    """A day of new events appended, then indexed (what a daily `mercli log` does)."""
    rng = random.Random(11)
    writer.now = datetime.now(UTC)
    before = writer.count
    number = 10**7
    while writer.count - before < INCREMENT:
        writer.study(rng, number)
        number += 1
    writer.flush()
    started = time.perf_counter()
    index = open_index(spool.events, spool.tmp)
    index.close()
    added = writer.count - before
    seconds = time.perf_counter() - started
    note = f"{added} new events on an index of {before / 1e6:.1f}M in {seconds:.2f} s"
    return Row(
        "log", "incremental update", "open_index (update)", added / seconds, "ev/s", note=note
    )


def _query(spool: Spool, study: str, size: str) -> Row:
    times = [_mercli_log(spool.root, "--study", study) for _ in range(5)]
    startup = statistics.median(
        _timed([sys.executable, "-c", "import mercli.cli"]) for _ in range(3)
    )
    note = f"median of 5 at {size}; Python start-up + imports alone {startup:.2f} s"
    latency = statistics.median(times)
    return Row(
        "log", "--study UID", "mercli log (subprocess)", latency, "s", target="<= 1 s", note=note
    )


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


if __name__ == "__main__":
    from benchmarks.report import print_table

    print_table(run())
