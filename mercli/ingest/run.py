"""`mercli ingest`: publish files, folders, DICOMDIRs and zip archives into incoming/."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mercli.errors import UsageError
from mercli.fsutil import fsync_dir
from mercli.ingest.publish import FileResult, IngestConfig, Ingester
from mercli.ingest.sources import Candidate, Refused, Skipped, walk
from mercli.names import printable
from mercli.spool import Spool, Worker, recover

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """Counts and names for the summary; `series` in the order first published."""

    files: int = 0
    instances: int = 0
    series: dict[str, int] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_dicom: int = 0
    not_followed: int = 0  # symlinks and special files met in folders
    moved: int = 0

    @property
    def ok(self) -> bool:
        return not (self.quarantined or self.failed)

    def add(self, result: FileResult) -> None:
        self.files += 1
        self.instances += len(result.published)
        for series, _instance in result.published:
            self.series[series] = self.series.get(series, 0) + 1
        self.quarantined += result.quarantined
        self.failed += result.failed
        self.not_dicom += result.skipped

    def as_json(self) -> dict[str, object]:
        return {
            "files": self.files,
            "instances": self.instances,
            "series": list(self.series),
            "quarantined": self.quarantined,
            "failed": self.failed,
            "skipped": {"not_dicom": self.not_dicom, "not_followed": self.not_followed},
            "moved": self.moved,
        }


def ingest(
    spool_root: Path,
    paths: Iterable[Path],
    config: IngestConfig,
    *,
    recursive: bool = False,
    move: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> IngestReport:
    """Publish everything under `paths` as receive would; the report says what happened.

    `move`: a source file is deleted once everything in it is durable in the spool (nothing
    skipped, quarantined or refused in it). `progress(done, total, label)` after each file.
    SpoolError if the spool cannot be used or written.
    """
    if move and config.dry_run:
        raise UsageError("--move and --dry-run exclude each other")
    report = IngestReport()
    entries = list(walk(paths, recursive=recursive, max_dicomdir=config.max_size))
    candidates = []
    for entry in entries:
        if isinstance(entry, Candidate):
            candidates.append(entry)
        elif isinstance(entry, Skipped):
            report.not_followed += 1
            log.info("%s: %s, skipped", printable(entry.path, 200), entry.reason)
        elif isinstance(entry, Refused):
            report.failed.append(f"{printable(entry.path, 200)}: {entry.reason}")
            log.warning("%s", report.failed[-1])
    if config.dry_run:
        with Ingester(None, None, config) as ingester:
            _run(ingester, candidates, report, move=False, progress=progress)
        return report
    spool = Spool.open(spool_root)
    recover(spool)  # scratch of ingests and receivers that died before us
    with Worker(spool, "ingest") as worker, Ingester(spool, worker, config) as ingester:
        _run(ingester, candidates, report, move=move, progress=progress)
    return report


def _run(
    ingester: Ingester,
    candidates: list[Candidate],
    report: IngestReport,
    *,
    move: bool,
    progress: Callable[[int, int, str], None] | None,
) -> None:
    seen: set[tuple[int, int]] = set()
    for done, candidate in enumerate(candidates, 1):
        label = printable(candidate.path, 200)
        try:
            info = os.stat(candidate.path, follow_symlinks=candidate.follow)
        except OSError as exc:
            report.failed.append(f"{label}: cannot read: {exc.strerror or exc}")
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue  # named twice, or found in a folder and in its DICOMDIR
        seen.add((info.st_dev, info.st_ino))
        result = ingester.ingest_file(candidate.path, follow=candidate.follow)
        report.add(result)
        for problem in result.quarantined + result.failed:
            log.warning("%s", problem)
        if move and result.whole and result.published:
            os.unlink(candidate.path)  # the copies were fsync'ed and renamed in before
            fsync_dir(candidate.path.parent)
            report.moved += 1
        if progress is not None:
            progress(done, len(candidates), label)
