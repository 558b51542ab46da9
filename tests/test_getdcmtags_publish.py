"""`build/getdcmtags --publish` files instances into a spool as `mercli receive` does (SPEC §3).

Real spools (`Spool.open`), real files; the sidecars are compared with what mercli's receiver
would write (`read_tags` plus receive metadata), names with `mercli.names.safe_name`, and each
crash point (`--inject-error N`) is checked to leave nothing half-visible and nothing that
`mercli.spool.recover` does not clean up.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from mercli.names import safe_name
from mercli.spool import Spool, lease_is_held, recover
from mercli.tags import UnreadableDicom, read_tags
from tests.dicomfiles import CORPUS, make_instance
from tests.kit import GETDCMTAGS

META = {"SenderAET": "SENDER", "SenderAddress": "10.1.2.3", "ReceiverAET": "MERCLI"}
RECEIVED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
EVENT_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
ITEM_ID = re.compile(r"^\d{8}T\d{6}\.\d{6}-[0-9a-f]{12}$")
INJECT_POINTS = range(1, 8)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    folder = tmp_path / "staging"
    folder.mkdir()
    return folder


def command(spool: Spool, *args: str | Path) -> list[str]:
    return [
        str(GETDCMTAGS),
        "--publish",
        "--spool",
        str(spool.root),
        "--calling-aet",
        META["SenderAET"],
        "--called-aet",
        META["ReceiverAET"],
        "--address",
        META["SenderAddress"],
        *map(str, args),
    ]


def publish(spool: Spool, *args: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(spool, *args), input=stdin, capture_output=True, text=True, timeout=60
    )


def events(spool: Spool) -> list[dict[str, Any]]:
    return list(spool.events.read())


def expected_sidecar(path: Path) -> dict[str, Any]:
    """What mercli's receiver writes for this file, ReceivedAt aside."""
    return {**read_tags(path), **META}


def check_published(spool: Spool, path: Path, original: bytes, expected: dict[str, Any]) -> Path:
    """The instance is in incoming/<series>/ as mercli would file it; returns the .tags path."""
    series = safe_name(str(expected["SeriesInstanceUID"]))
    instance = safe_name(str(expected["SOPInstanceUID"]))
    folder = spool.root / "incoming" / series
    assert (folder / f"{instance}.dcm").read_bytes() == original
    tags_path = folder / f"{instance}.tags"
    raw = tags_path.read_bytes()
    sidecar = json.loads(raw)
    assert RECEIVED_AT.match(sidecar.pop("ReceivedAt"))
    assert list(sidecar) == list(expected)
    assert json.dumps(sidecar) == json.dumps(expected)
    # byte-compatible with the receiver's json.dumps(separators=(",", ":"), ensure_ascii=False)
    full = json.loads(raw)
    assert raw == json.dumps(full, ensure_ascii=False, separators=(",", ":")).encode()
    assert not path.exists(), "the staged file was moved, not copied"
    return tags_path


def assert_spool_clean(spool: Spool) -> None:
    for folder in ("tmp", "claims", "leases"):
        assert list((spool.root / folder).iterdir()) == [], folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_publish_corpus_files(getdcmtags: Path, spool: Spool, staging: Path) -> None:
    readable = []
    for source in CORPUS:
        try:
            tags = read_tags(source)
        except UnreadableDicom:
            continue
        if all(tags.get(k) for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")):
            readable.append(source)
    chosen = readable[:: max(1, len(readable) // 12)]
    staged, originals, expected = [], {}, {}
    seen_instances: set[tuple[str, str]] = set()
    for i, source in enumerate(chosen):
        exp = expected_sidecar(source)
        key = (safe_name(str(exp["SeriesInstanceUID"])), safe_name(str(exp["SOPInstanceUID"])))
        if key in seen_instances:
            continue
        seen_instances.add(key)
        path = staging / f"{i}.dcm"
        path.write_bytes(source.read_bytes())
        staged.append(path)
        originals[path] = source.read_bytes()
        expected[path] = exp
    assert len(staged) >= 5
    result = publish(spool, *staged)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(staged)
    for path, line in zip(staged, lines, strict=True):
        exp = expected[path]
        series = safe_name(str(exp["SeriesInstanceUID"]))
        instance = safe_name(str(exp["SOPInstanceUID"]))
        assert line == f"ok {series}/{instance}"
        check_published(spool, path, originals[path], exp)
    received = [e for e in events(spool) if e["event"] == "received"]
    assert len(received) == len(staged)
    for event, path in zip(received, staged, strict=True):
        exp = expected[path]
        assert EVENT_AT.match(event.pop("at"))
        assert event == {
            "event": "received",
            "series": safe_name(str(exp["SeriesInstanceUID"])),
            "instance": safe_name(str(exp["SOPInstanceUID"])),
            "sender": "SENDER",
            "replaced": False,
        }
    assert_spool_clean(spool)


def test_same_instance_twice_is_replaced(getdcmtags: Path, spool: Spool, staging: Path) -> None:
    first = make_instance(staging, filename="a.dcm", sop="1.2.3.4", series="1.2.3")
    data = first.read_bytes()
    assert publish(spool, first).returncode == 0
    second = staging / "b.dcm"
    second.write_bytes(data)
    result = publish(spool, second)
    assert result.returncode == 0
    assert result.stdout == "ok 1.2.3/1.2.3.4\n"
    assert [e["replaced"] for e in events(spool)] == [False, True]
    assert sorted(p.name for p in (spool.root / "incoming" / "1.2.3").iterdir()) == [
        "1.2.3.4.dcm",
        "1.2.3.4.tags",
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hostile_uids_stay_inside_the_spool(
    getdcmtags: Path, spool: Spool, staging: Path, tmp_path: Path
) -> None:
    hostile = [
        ("../../x", "../../../etc/passwd"),
        ("1.2.3/..", "1." + "2" * 70),
        (".", "1..2"),
    ]
    staged = []
    for i, (series, sop) in enumerate(hostile):
        staged.append(make_instance(staging, series=series, sop=sop, filename=f"{i}.dcm"))
    originals = {p: p.read_bytes() for p in staged}
    expected = {p: expected_sidecar(p) for p in staged}
    before = sorted(str(p) for p in tmp_path.rglob("*") if p.parent != staging)
    result = publish(spool, *staged)
    assert result.returncode == 0, result.stdout + result.stderr
    for path, (series, sop) in zip(staged, hostile, strict=True):
        assert expected[path]["SeriesInstanceUID"] == series
        assert re.fullmatch(r"x[0-9a-f]{40}", safe_name(series))
        tags = check_published(spool, path, originals[path], expected[path])
        assert tags.parent.name == safe_name(series)
        assert tags.name == f"{safe_name(sop)}.tags"
    after = {str(p) for p in tmp_path.rglob("*") if p.parent != staging}
    assert {p for p in after if not p.startswith(str(spool.root))} == {
        p for p in before if not p.startswith(str(spool.root))
    }


def without(path: Path, keyword: str, folder: Path) -> Path:
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    out = folder / f"no-{keyword}.dcm"
    ds.save_as(out)
    path.unlink()
    return out


def quarantined(spool: Spool) -> dict[str, dict[str, Any]]:
    found = {}
    for item in (spool.root / "error").iterdir():
        assert sorted(p.name for p in item.iterdir()) == ["error.json", "instance.dcm"]
        found[item.name] = json.loads((item / "error.json").read_bytes())
    return found


def test_missing_uids_and_garbage_are_quarantined(
    getdcmtags: Path, spool: Spool, staging: Path
) -> None:
    no_series = without(make_instance(staging, filename="s.dcm"), "SeriesInstanceUID", staging)
    no_sop = without(make_instance(staging, filename="p.dcm"), "StudyInstanceUID", staging)
    garbage = staging / "garbage.dcm"
    garbage.write_bytes(b"this is not DICOM at all\n" * 10)
    good = make_instance(staging, filename="good.dcm")
    files = [no_series, no_sop, garbage, good]
    data = {p: p.read_bytes() for p in files}
    result = publish(spool, *files)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[3].startswith("ok ")
    records = quarantined(spool)
    assert len(records) == 3
    expect = [
        ("missing SeriesInstanceUID", "0xC212"),
        ("missing StudyInstanceUID", "0xC212"),
        (None, "0xC210"),
    ]
    for line, path, (reason, status) in zip(lines, files, expect, strict=False):
        word, item, text = line.split(" ", 2)
        assert word == "error" and ITEM_ID.match(item)
        record = records[item]
        assert (spool.root / "error" / item / "instance.dcm").read_bytes() == data[path]
        assert not path.exists()
        if reason is not None:
            assert text == reason == record["reason"]
        assert text == record["reason"]
        assert record["status"] == status
        assert record["from"] == "receive"
        assert RECEIVED_AT.match(record.pop("ReceivedAt"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record.pop("at"))
        assert {k: record[k] for k in META} == META
        # byte-compatible with the receiver's json.dumps(record, indent=1)
        raw = (spool.root / "error" / item / "error.json").read_bytes()
        assert raw == json.dumps(json.loads(raw), indent=1).encode()
    logged = [e for e in events(spool) if e["event"] == "quarantined"]
    assert [(e["item"], e["reason"], e["sender"]) for e in logged] == [
        (item, records[item]["reason"], "SENDER") for item in (ln.split()[1] for ln in lines[:3])
    ]
    assert_spool_clean(spool)


def test_missing_file_fails_without_quarantine(
    getdcmtags: Path, spool: Spool, staging: Path
) -> None:
    result = publish(spool, staging / "nope.dcm")
    assert result.returncode == 1
    assert result.stdout.startswith("fail ")
    assert list((spool.root / "error").iterdir()) == []
    assert_spool_clean(spool)


def test_unusable_spool_exits_4(getdcmtags: Path, tmp_path: Path, staging: Path) -> None:
    path = make_instance(staging, filename="a.dcm")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = subprocess.run(
        command(Spool(not_a_dir), path), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 4
    assert path.exists()


def test_usage_and_help(getdcmtags: Path, spool: Spool) -> None:
    result = subprocess.run(
        [str(GETDCMTAGS), "--publish", "--spool", str(spool.root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    helped = subprocess.run([str(GETDCMTAGS), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for point in INJECT_POINTS:
        assert re.search(rf"^  {point}  ", helped.stdout, re.M), point


def test_batch_over_stdin(getdcmtags: Path, spool: Spool, staging: Path) -> None:
    files = [make_instance(staging, filename=f"{i}.dcm", number=i) for i in range(5)]
    expected = {p: expected_sidecar(p) for p in files}
    originals = {p: p.read_bytes() for p in files}
    process = subprocess.Popen(
        command(spool, "--stdin"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin and process.stdout
    try:
        # one path at a time: each answer comes before the next path is sent
        for path in files[:2]:
            process.stdin.write(f"{path}\n")
            process.stdin.flush()
            assert process.stdout.readline().startswith("ok ")
        leases = list((spool.root / "leases").iterdir())
        assert len(leases) == 1 and lease_is_held(leases[0])
        assert recover(spool, tmp_grace=0).owners == []  # a live owner is left alone
        assert (spool.root / "tmp" / leases[0].name).is_dir()
        process.stdin.write("".join(f"{p}\n" for p in files[2:]) + "\n")
        process.stdin.close()
        rest = process.stdout.read().splitlines()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert len(rest) == 3 and all(line.startswith("ok ") for line in rest)
    for path in files:
        check_published(spool, path, originals[path], expected[path])
    assert len(events(spool)) == 5
    assert_spool_clean(spool)


def test_one_batch_of_interleaved_series_lands_in_order(
    getdcmtags: Path, spool: Spool, staging: Path
) -> None:
    """A batch's runs of one series share their group's lock: series A, A, B, A, a missing
    file in A's run, and a resent instance all get their own answer, in input order, with
    their events in that order and every file 0640 whatever the umask it was staged with."""
    first = make_instance(staging, series="1.2.3.10", number=1, filename="a1.dcm")
    resent = staging / "again.dcm"
    resent.write_bytes(first.read_bytes())
    old = os.umask(0o002)
    try:
        files = [
            first,
            make_instance(staging, series="1.2.3.10", number=2, filename="a2.dcm"),
            staging / "gone.dcm",
            make_instance(staging, series="1.2.3.20", number=1, filename="b1.dcm"),
            make_instance(staging, series="1.2.3.10", number=3, filename="a3.dcm"),
            resent,
        ]
    finally:
        os.umask(old)
    expected = {p: expected_sidecar(p) for p in files if p.exists()}
    originals = {p: p.read_bytes() for p in files if p.exists()}
    result = publish(spool, *files)
    assert result.returncode == 1  # the missing file
    answers = result.stdout.splitlines()
    assert [line.split(" ")[0] for line in answers] == ["ok", "ok", "fail", "ok", "ok", "ok"]
    series = [line.split(" ")[1].partition("/")[0] for line in answers if line.startswith("ok")]
    assert series == ["1.2.3.10", "1.2.3.10", "1.2.3.20", "1.2.3.10", "1.2.3.10"]
    for path in files[:2] + files[3:5]:
        tags = check_published(spool, path, originals[path], expected[path])
        for published in (tags, tags.with_suffix(".dcm")):
            assert published.stat().st_mode & 0o777 == 0o640
    got = [(e["series"], e["replaced"]) for e in events(spool)]
    assert got == [("1.2.3.10", False)] * 2 + [("1.2.3.20", False), ("1.2.3.10", False)] + [
        ("1.2.3.10", True)
    ]
    assert_spool_clean(spool)


def visible_state_is_whole(spool: Spool) -> None:
    """No sidecar without its instance, no stray file in incoming/; error items complete."""
    for series in (spool.root / "incoming").iterdir():
        names = {p.name for p in series.iterdir()}
        for name in names:
            assert name.endswith((".dcm", ".tags")), name
            if name.endswith(".tags"):
                assert name[: -len(".tags")] + ".dcm" in names
    for item in (spool.root / "error").iterdir():
        assert sorted(p.name for p in item.iterdir()) == ["error.json", "instance.dcm"]


@pytest.mark.parametrize("point", INJECT_POINTS)
def test_crash_points(getdcmtags: Path, spool: Spool, staging: Path, point: int) -> None:
    if point == 6:
        path = staging / "garbage.dcm"
        path.write_bytes(b"not DICOM " * 50)
    else:
        path = make_instance(staging, filename="a.dcm", series="1.2.3", sop="1.2.3.4")
    original = path.read_bytes()
    expected = None if point == 6 else expected_sidecar(path)
    result = publish(spool, "--inject-error", str(point), path)
    assert result.returncode == 70, result.stdout + result.stderr
    assert result.stdout == ""
    visible_state_is_whole(spool)
    dcm = spool.root / "incoming" / "1.2.3" / "1.2.3.4.dcm"
    tags = dcm.with_suffix(".tags")
    if point in (1, 2, 6, 7):
        assert not list((spool.root / "incoming").iterdir())
    if point == 3:
        assert dcm.read_bytes() == original and not tags.exists()  # allowed: see spool.py
    if point in (4, 5):
        assert dcm.read_bytes() == original and tags.exists()
    assert list((spool.root / "leases").iterdir()) or point == 7
    recover(spool, tmp_grace=0)
    assert_spool_clean(spool)
    visible_state_is_whole(spool)
    if path.exists():  # not yet taken into the spool: a retry publishes it
        assert point in (1, 2, 7)
        again = publish(spool, path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert expected is not None
        check_published(spool, path, original, expected)
        assert_spool_clean(spool)


def test_stdin_lines_carry_their_own_sender(getdcmtags: Path, spool: Spool, staging: Path) -> None:
    """`PATH<TAB>CALLING<TAB>CALLED<TAB>ADDRESS`: one process serves many associations."""
    files = [make_instance(staging, filename=f"{i}.dcm", number=i) for i in range(3)]
    lines = [
        f"{files[0]}\tCT_ONE\tROUTER\t10.0.0.1",
        f"{files[1]}\tMR_TWO\tMERCLI\t10.0.0.2",
        f"{files[2]}\ttoo\tfew",
    ]
    result = subprocess.run(
        [str(GETDCMTAGS), "--publish", "--spool", str(spool.root), "--stdin"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    answers = result.stdout.splitlines()
    assert result.returncode == 1 and [a.split()[0] for a in answers] == ["ok", "ok", "fail"]
    assert str(files[2]) in answers[2] and files[2].exists()  # left for the caller
    senders = {}
    for tags in spool.root.glob("incoming/*/*.tags"):
        sidecar = json.loads(tags.read_text())
        senders[sidecar["SenderAET"]] = (sidecar["ReceiverAET"], sidecar["SenderAddress"])
    assert senders == {"CT_ONE": ("ROUTER", "10.0.0.1"), "MR_TWO": ("MERCLI", "10.0.0.2")}
    # Files on the command line still need the sender options.
    bare = [str(GETDCMTAGS), "--publish", "--spool", str(spool.root), str(files[2])]
    assert subprocess.run(bare, capture_output=True, timeout=60).returncode == 2


def test_a_series_locked_past_the_deadline_fails_in_time_and_keeps_the_file(
    getdcmtags: Path, spool: Spool, staging: Path
) -> None:
    """A group lock held forever (a hung or hostile process) must not stall the dcmtk
    engine's publisher: the file fails after the deadline and stays where it was, whole."""
    path = make_instance(staging)
    original = path.read_bytes()
    series = spool.root / "incoming" / safe_name(str(read_tags(path)["SeriesInstanceUID"]))
    series.mkdir()
    fd = os.open(series, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = publish(spool, path)  # a hang would hit publish()'s 60 s timeout
    finally:
        os.close(fd)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("fail ") and "timed out" in result.stdout + result.stderr
    assert path.read_bytes() == original
    assert list(series.iterdir()) == []
    assert_spool_clean(spool)
    assert publish(spool, path).returncode == 0  # once the lock is gone, it publishes
