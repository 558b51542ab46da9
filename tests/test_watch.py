"""`mercli watch DIR`: complete files only, exactly once across kill -9, symlinks refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.dicomfiles import dataset_bytes, make_instance
from tests.netkit import wait_until


def start(
    spool: Path, folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "mercli", "watch", "--spool", str(spool), "--stable", "0.5s"]
    command += ["--scan-every", "0.5s", *args, str(folder)]
    return subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def received(spool: Path) -> list[str]:
    events = [
        json.loads(line)
        for f in (spool / "events").glob("*.ndjson")
        for line in f.read_text().splitlines()
    ]
    return [e["instance"] for e in events if e["event"] == "received"]


def instances(spool: Path) -> list[Path]:
    return sorted((spool / "incoming").glob("*/*.dcm"))


def test_symlinks_and_junk_go_to_failed_with_a_reason(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    make_instance(drop, filename="a.dcm")
    outside = make_instance(tmp_path, filename="outside.dcm")
    (drop / "link.dcm").symlink_to(outside)
    (drop / "notes.txt").write_text("hello")
    watcher = start(tmp_path / "spool", drop, "--once")
    assert watcher.wait(30) == 0, watcher.stderr.read() if watcher.stderr else ""
    assert sorted(os.listdir(drop)) == [".done", ".failed"]
    assert (drop / ".done" / "a.dcm").is_file()
    assert "symlink" in (drop / ".failed" / "link.dcm.reason").read_text()
    assert (drop / ".failed" / "link.dcm").is_symlink() and outside.is_file()
    assert "not DICOM" in (drop / ".failed" / "notes.txt.reason").read_text()
    assert len(instances(tmp_path / "spool")) == 1


def _big_instance_parts(tmp_path: Path, size: int) -> tuple[bytes, int]:
    """A Part 10 header + a Pixel Data element header for `size` bytes of pixels."""
    small = make_instance(tmp_path, rows=1, columns=1, filename="template.dcm").read_bytes()
    cut = small.rindex(b"\xe0\x7f\x10\x00")
    return small[:cut] + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"), size


WRITER = """
import sys, time
head = open(sys.argv[1], 'rb').read()
size, path = int(sys.argv[2]), sys.argv[3]
chunk = bytes(range(256)) * 4096
with open(path, 'wb') as out:
    out.write(head)
    written = 0
    while written < size:
        piece = chunk[: min(len(chunk), size - written)]
        out.write(piece)
        written += len(piece)
        if written >= size // 2 and written - len(piece) < size // 2:
            out.flush()
            time.sleep(3)   # a writer that pauses mid-file, longer than --stable
"""


def test_a_slow_200mb_copy_is_ingested_once_whole_after_it_completes(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    head, size = _big_instance_parts(tmp_path, 200 << 20)
    (tmp_path / "head").write_bytes(head)
    watcher = start(tmp_path / "spool", drop)
    try:
        writer = subprocess.run(
            [
                sys.executable,
                "-c",
                WRITER,
                str(tmp_path / "head"),
                str(size),
                str(drop / "big.dcm"),
            ],
            check=True,
            timeout=60,
        )
        assert writer.returncode == 0
        wait_until(lambda: (drop / ".done" / "big.dcm").exists(), timeout=60, what="ingest")
    finally:
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(30) == 0
    (stored,) = instances(tmp_path / "spool")
    assert stored.stat().st_size > size
    assert dataset_bytes(stored) == dataset_bytes(drop / ".done" / "big.dcm")
    assert len(received(tmp_path / "spool")) == 1


def test_rsync_into_the_folder(tmp_path: Path) -> None:
    assert shutil.which("rsync"), "rsync is not installed: `make setup` installs it (DEB_PACKAGES)"
    source, drop = tmp_path / "source", tmp_path / "drop"
    source.mkdir()
    drop.mkdir()
    for index in range(3):
        make_instance(source, number=index, filename=f"im{index}.dcm")
    watcher = start(tmp_path / "spool", drop)
    try:
        subprocess.run(["rsync", "-a", f"{source}/", f"{drop}/"], check=True)
        subprocess.run(
            ["rsync", "-a", "--inplace", f"{source}/im0.dcm", f"{drop}/again.dcm"], check=True
        )
        wait_until(
            lambda: (drop / ".done").is_dir() and len(os.listdir(drop / ".done")) >= 5,
            timeout=30,
            what="ingest",
        )
    finally:
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(30) == 0
    assert len(instances(tmp_path / "spool")) == 3
    assert len(received(tmp_path / "spool")) == 4  # again.dcm: a resend, replaced


@pytest.mark.parametrize(
    ("point", "republished"), [("published:3", 1), ("recorded:3", 0), ("decided:1", 0)]
)
def test_kill_9_mid_ingest_publishes_each_instance_once(
    tmp_path: Path, point: str, republished: int
) -> None:
    drop, spool = tmp_path / "drop", tmp_path / "spool"
    drop.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    archive = drop / "study.zip"
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as out:
        for index in range(6):
            out.write(
                make_instance(source, number=index, filename=f"im{index}.dcm"), f"im{index}.dcm"
            )
    os.rename(tmp_path / "study.zip", archive)
    killed = start(spool, drop, "--once", env={"MERCLI_INGEST_FAULT": point})
    assert killed.wait(30) == -signal.SIGKILL
    routed = tmp_path / "routed"  # as if route had taken the series meanwhile
    os.rename(spool / "incoming", routed)
    (spool / "incoming").mkdir()
    again = start(spool, drop, "--once")
    assert again.wait(30) == 0, again.stderr.read() if again.stderr else ""
    assert (drop / ".done" / "study.zip").is_file() and not archive.exists()
    names = [p.name for p in instances(spool)] + [p.name for p in routed.glob("*/*.dcm")]
    assert sorted(set(names)) == sorted(names) or republished
    assert len(names) == 6 + republished
    assert len(set(names)) == 6
