"""Safe names for hostile values, ids, durations and the event log."""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercli.durations import format_duration, parse_duration
from mercli.names import is_safe_uid, new_id, owner_id, safe_name
from mercli.spool.events import EventLog

SAFE = re.compile(r"[0-9]+(\.[0-9]+)*|x[0-9a-f]{40}")


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.3", True),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2\x003", False),
        ("1" * 65, False),
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("", False),
        ("..", False),
        ("1.2.3 ", False),
    ],
)
def test_safe_name_keeps_only_wellformed_uids(raw: str, kept: bool) -> None:
    name = safe_name(raw)
    assert (name == raw) is kept
    assert SAFE.fullmatch(name)


@given(st.one_of(st.text(), st.binary()))
def test_safe_name_is_always_a_harmless_file_name(raw: str | bytes) -> None:
    name = safe_name(raw)
    assert SAFE.fullmatch(name)
    assert "/" not in name and "\x00" not in name and name not in (".", "..")
    assert len(name) <= 64


def test_distinct_hostile_values_get_distinct_names() -> None:
    assert safe_name("../a") != safe_name("../b")
    assert safe_name("1.2.3") != safe_name("1.2.3/")
    assert not is_safe_uid(safe_name("x"))


def test_ids_are_unique_and_sortable() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"\d{8}T\d{6}\.\d{6}-[0-9a-f]{12}", i) for i in ids)
    assert re.fullmatch(r"route\.[A-Za-z0-9-]+\.\d+\.[0-9a-f]{8}", owner_id("route"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("3d", 259200), ("42", 42), ("1.5h", 5400), (7, 7)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "m", "10 weeks", "-5", "1h30m", "abc"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(bad)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 5, 192, 18120, 273600)] == [
        "-",
        "5s",
        "3m 12s",
        "5h 2m",
        "3d 4h",
    ]


def _append_many(directory: str, writer: int) -> None:
    log = EventLog(Path(directory))
    for n in range(500):
        log.append("received", writer=writer, n=n, padding="x" * 300)


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), w)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    lines = [line for path in tmp_path.glob("*.ndjson") for line in path.read_text().splitlines()]
    assert len(lines) == 2000
    records = [json.loads(line) for line in lines]
    assert sorted((r["writer"], r["n"]) for r in records) == [
        (w, n) for w in range(4) for n in range(500)
    ]
    assert next(iter(EventLog(tmp_path).read()))["event"] == "received"


def test_read_after_a_cursor_reads_only_new_whole_lines(tmp_path: Path) -> None:
    from mercli.spool.events import Cursor, EventLog

    log = EventLog(tmp_path)
    for n in range(3):
        log.append("x", n=n)
    read = list(log.read_after(Cursor()))
    assert [e["n"] for e, _ in read] == [0, 1, 2]
    cursor = read[-1][1]
    assert list(log.read_after(cursor)) == []
    (day,) = tmp_path.glob("*.ndjson")
    with day.open("ab") as stream:
        stream.write(b'{"event": "x", "n": 3')  # a writer mid-line
    assert list(log.read_after(cursor)) == []
    with day.open("ab") as stream:
        stream.write(b"}\nnot json\n")
    ((event, after),) = log.read_after(cursor)
    assert event["n"] == 3 and after.offset > cursor.offset
    (tmp_path / "2999-01-01.ndjson").write_text('{"n": 4}\n')
    assert [e["n"] for e, _ in log.read_after(after)] == [4]
    assert Cursor.from_json(after.to_json()) == after and Cursor.from_json("junk") == Cursor()
