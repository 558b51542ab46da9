"""Helpers that build spool content the way receive and route do, for tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mercli.fsutil import write_new
from mercli.spool import INCOMING, Worker


def payload(name: str, size: int = 4096) -> bytes:
    """Deterministic content for a fake instance, so tests can tell whole from torn."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def receive_instance(worker: Worker, series: str, sop: str, size: int = 4096) -> None:
    """Publish NAME.dcm + NAME.tags into incoming/<series> exactly as receive does."""
    dcm, tags = worker.tmp_path(".dcm"), worker.tmp_path(".tags")
    write_new(dcm, payload(sop, size))
    write_new(tags, payload(sop + ".tags", 200))
    worker.spool.publish_to_group(INCOMING, series, [(dcm, f"{sop}.dcm"), (tags, f"{sop}.tags")])


def assert_whole_instances(folder: Path, size: int = 4096) -> set[str]:
    """Every .dcm/.tags under folder has its full content; returns the instance names."""
    names = set()
    for path in folder.iterdir():
        if path.suffix == ".dcm":
            assert path.read_bytes() == payload(path.stem, size), f"torn instance {path}"
            names.add(path.stem)
        elif path.suffix == ".tags":
            assert path.read_bytes() == payload(path.stem + ".tags", 200), f"torn sidecar {path}"
    return names
