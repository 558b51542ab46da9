"""Scenarios that run inside a private mount namespace with a small tmpfs (see
test_resource_faults.py): `python -m tests.reliability.fullfs SCENARIO ARGS-JSON`.

The tmpfs exists only inside the namespace, so each scenario does its own looking and prints
one JSON report on stdout for the test to judge.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from mercli.fsutil import write_new
from mercli.spool import INCOMING, Spool, Worker
from mercli.tags import read_tags
from tests.reliability.kit import mercli

PAGE = 4096


def fill(mount: Path, keep_pages: int = 0) -> Path:
    """Fill the filesystem completely, then free `keep_pages` pages again."""
    reserve = [mount / f"reserve.{n}" for n in range(keep_pages)]
    for path in reserve:
        path.write_bytes(b"r" * PAGE)
    filler = mount / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"f" * (64 * PAGE))
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    for path in reserve:
        path.unlink()
    return filler


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def snapshot(spool: Path) -> dict[str, Any]:
    """What each state holds: incoming series with file hashes, jobs with their files."""
    state: dict[str, Any] = {"incoming": {}, "outgoing": {}, "error": {}}
    for series in sorted((spool / "incoming").iterdir()):
        state["incoming"][series.name] = digest(series)
    for name in ("outgoing", "error"):
        for item in sorted((spool / name).iterdir()):
            state[name][item.name] = {
                "files": sorted(p.name for p in item.iterdir()),
                "job": _json(item / "job.json"),
                "error": _json(item / "error.json"),
            }
    state["tmp"] = sorted(str(p.relative_to(spool)) for p in (spool / "tmp").rglob("*"))
    state["claims"] = sorted(str(p.relative_to(spool)) for p in (spool / "claims").rglob("*"))
    return state


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return "TORN"


def run(*args: str | Path) -> dict[str, Any]:
    result = mercli(*args)
    return {"code": result.returncode, "stderr": result.stderr, "stdout": result.stdout}


def route_on_full_disk(args: dict[str, Any]) -> dict[str, Any]:
    """Series in incoming/ on a tmpfs that fills up while `route --once --all` runs."""
    mount = Path(args["mount"])
    spool = Spool.open(mount / "spool")
    with Worker(spool, "receive") as worker:
        for source in sorted(Path(args["source"]).iterdir()):
            sidecar = {**read_tags(source), "ReceivedAt": "2026-11-28T00:00:00+00:00"}
            dcm, tags = worker.tmp_path(".dcm"), worker.tmp_path(".tags")
            write_new(dcm, source.read_bytes())
            write_new(tags, json.dumps(sidecar).encode())
            group, name = sidecar["SeriesInstanceUID"], sidecar["SOPInstanceUID"]
            spool.publish_to_group(INCOMING, group, [(dcm, f"{name}.dcm"), (tags, f"{name}.tags")])
    report: dict[str, Any] = {"before": snapshot(spool.root)}
    filler = fill(mount, args["keep_pages"])
    report["full"] = run(
        "route", "--once", "--all", "--rules", args["rules"], "--spool", spool.root
    )
    report["after_full"] = snapshot(spool.root)
    filler.unlink()
    report["freed"] = run(
        "route", "--once", "--all", "--rules", args["rules"], "--spool", spool.root
    )
    report["after_freed"] = snapshot(spool.root)
    return report


def dispatch_to_full_folder(args: dict[str, Any]) -> dict[str, Any]:
    """Jobs for folder targets on a full tmpfs (the spool is elsewhere, so files are copied)."""
    mount, spool = Path(args["mount"]), Path(args["spool"])
    dest = mount / "dest"
    dest.mkdir()
    filler = fill(mount)
    report: dict[str, Any] = {"full": run("dispatch", "--once", "--spool", spool)}
    report["dest_full"] = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    report["after_full"] = snapshot(spool)
    filler.unlink()
    report["freed"] = run("dispatch", "--once", "--spool", spool)
    report["dest_freed"] = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    report["after_freed"] = snapshot(spool)
    return report


SCENARIOS = {"route": route_on_full_disk, "dispatch": dispatch_to_full_folder}

if __name__ == "__main__":
    report = SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
    sys.stdout.write(json.dumps(report))
    os._exit(0)
