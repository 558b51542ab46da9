"""The notification log (`mercli.spool.notices`) and its collection into notify/
(`mercli.notify.collect`), on real files: a transaction's notifications count iff it
committed, a collector never takes a line whose fate is open while its writer lives, torn
lines and zeros end a segment, segments roll over and are deleted once passed, a collector
killed at every step loses and doubles nothing, and a routed series' notification reaches a
real webhook through a running `mercli notify`."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from mercli.names import new_id
from mercli.notify.collect import Collector, collect
from mercli.spool import NOTIFICATION_FILE, NOTIFY, NOTIFY_SENT, Spool, Worker, recover
from mercli.spool import notices as notices_module
from mercli.spool.notices import (
    ABORT,
    COMMIT,
    CURSOR_FILE,
    NOTICES_DIR,
    pending,
    read_cursor,
    segment_numbers,
    segment_path,
)
from tests.crashkit import run_until_done
from tests.netkit import wait_until
from tests.test_dispatch import routed
from tests.test_notify_outbox import rules_file
from tests.test_notify_send import Hook, names, service


def note(body: str) -> dict[str, Any]:
    return {"id": new_id(), "event": "routed", "body": body, "channel": {"name": "x"}}


def bodies(spool: Spool) -> list[str]:
    return sorted(
        json.loads((item.path / NOTIFICATION_FILE).read_text())["body"]
        for item in spool.items(NOTIFY)
    )


def collected(spool: Spool) -> int:
    with Worker(spool, "notify") as worker:
        return collect(spool, worker)


def test_a_live_writers_open_transaction_waits_for_its_fate(spool: Spool) -> None:
    with Worker(spool, "route") as writer:
        writer.notices.open_transaction("t1", "k", [note("a")])
        writer.notices.open_transaction("t2", "k", [note("b")])
        writer.notices.mark("t2", "k", ABORT)  # t2 failed; t1 is still mid-commit
        assert collected(spool) == 0 and bodies(spool) == []
        writer.notices.mark("t1", "k", COMMIT)
        assert collected(spool) == 1 and bodies(spool) == ["a"]
        assert collected(spool) == 0  # the cursor moved past both: nothing twice
        folder = spool.root / NOTICES_DIR / writer.id
        assert json.loads((folder / CURSOR_FILE).read_text())[0] == 1
    assert collected(spool) == 0 and bodies(spool) == ["a"]
    assert not folder.exists()  # the writer stopped and everything was collected


def test_zeros_and_torn_lines_end_a_segment(spool: Spool) -> None:
    with Worker(spool, "route") as writer:
        writer.notices.open_transaction("t", "k", [note("a")])
        writer.notices.mark("t", "k", COMMIT)
        folder = spool.root / NOTICES_DIR / writer.id
        path = segment_path(folder, 1)
        end = len(path.read_bytes().rstrip(b"\0"))
        fd = os.open(path, os.O_WRONLY)
        try:  # a line cut short (its writer died in it), then a whole line after it
            os.pwrite(fd, b'{"txn":"u","key":"k","notifications":[{"body":', end)
            os.pwrite(fd, b'\n{"txn":"v","key":"k","notifications":[]}\n', end + 60)
        finally:
            os.close(fd)
        found = pending(folder, read_cursor(folder), owner_exists=True)
        assert [n["body"] for _, _, _, n in found.notifications] == ["a"] and found.waiting == 0


def test_segments_roll_over_and_passed_ones_are_deleted(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notices_module, "FIRST_SEGMENT_SIZE", 2048)
    monkeypatch.setattr(notices_module, "MAX_SEGMENT_SIZE", 4096)
    with Worker(spool, "route") as writer:
        folder = spool.root / NOTICES_DIR / writer.id
        for n in range(60):
            txn = f"t{n}"
            writer.notices.open_transaction(txn, "k", [note(f"{n:02d}")])
            writer.notices.mark(txn, "k", COMMIT)
            if n == 30:
                assert collected(spool) == 31
        made = segment_numbers(folder)
        assert made[-1] >= 3 and (segment_path(folder, made[-1]).stat().st_size == 4096)
        assert collected(spool) == 29
        assert segment_numbers(folder)[0] > 1  # the passed segments are gone
    assert bodies(spool) == [f"{n:02d}" for n in range(60)]


def test_a_line_longer_than_a_segment_gets_a_segment_of_its_own(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notices_module, "FIRST_SEGMENT_SIZE", 1024)
    with Worker(spool, "route") as writer:
        long = note("x" * 5000)
        writer.notices.open_transaction("t", "k", [long])
        writer.notices.mark("t", "k", COMMIT)
    assert collected(spool) == 1 and bodies(spool) == ["x" * 5000]


def test_hostile_ids_and_keys_stay_inside_the_spool(spool: Spool) -> None:
    with Worker(spool, "route") as writer:
        evil = {**note("a"), "id": "../../escape"}
        writer.notices.open_transaction("t", "../..", [evil])
        writer.notices.mark("t", "k", COMMIT)
    assert collected(spool) == 1
    (item,) = spool.items(NOTIFY)
    assert item.path.parent == spool.state_dir(NOTIFY) and ".." not in item.name
    assert not (spool.root.parent / "escape").exists()


def test_two_collectors_at_once_make_each_item_once(spool: Spool) -> None:
    with Worker(spool, "route") as writer:
        for n in range(200):
            writer.notices.open_transaction(f"t{n}", "k", [note(str(n))])
            writer.notices.mark(f"t{n}", "k", COMMIT)
    counts: list[int] = []
    with Worker(spool, "notify") as one, Worker(spool, "notify") as two:
        collectors = [Collector(spool, one), Collector(spool, two)]
        threads = [
            threading.Thread(target=lambda c=c: counts.append(c.collect())) for c in collectors
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counts += [c.collect() for c in collectors]
    assert sum(counts) == 200 and len(spool.items(NOTIFY)) == 200


def test_kill_9_at_every_step_of_collecting_loses_and_doubles_nothing(tmp_path: Path) -> None:
    template, root = tmp_path / "template", tmp_path / "spool"
    spool = Spool.open(template)
    with Worker(spool, "route") as writer:
        for n in range(3):
            writer.notices.open_transaction(f"t{n}", "k", [note(str(n))])
            writer.notices.mark(f"t{n}", "k", COMMIT)

    def setup() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root, symlinks=True)

    def scenario() -> None:
        collected(Spool(root))

    def check(step: int) -> None:
        spool = Spool(root)
        recover(spool, tmp_grace=0)
        assert len(bodies(spool)) <= 3, step
        collected(spool)  # the next collector finishes the job
        assert bodies(spool) == ["0", "1", "2"], step
        assert not (root / NOTICES_DIR).exists() or os.listdir(root / NOTICES_DIR) == [], step

    assert run_until_done(scenario, check, setup=setup) > 10


def test_recovery_decides_a_dead_writers_open_transactions_from_its_claims(
    tmp_path: Path, spool: Spool
) -> None:
    """A writer that died after its line, before its marker: `out/` in the claim (committed),
    the item still claimed (not), the claim gone (rolled forward)."""
    pid = os.fork()
    if pid == 0:
        try:
            writer = Worker(spool, "route")
            writer.start()
            claims = spool.claims / writer.id
            keys = (("incoming~a", ["item", "out"]), ("incoming~b", ["item"]), ("incoming~c", []))
            for key, made in keys:
                for name in made:
                    (claims / key / name).mkdir(parents=True)
                writer.notices.open_transaction(key, key, [note(key)])
        finally:
            os._exit(0)  # dies holding everything: no stop, no markers
    os.waitpid(pid, 0)
    assert collected(spool) == 0  # its lease is still there: recovery decides first
    recover(spool, tmp_grace=0)
    assert collected(spool) == 2 and bodies(spool) == ["incoming~a", "incoming~c"]
    assert not (spool.root / NOTICES_DIR).exists() or os.listdir(spool.root / NOTICES_DIR) == []


def test_routed_notification_reaches_a_webhook_through_mercli_notify(
    tmp_path: Path, spool: Spool
) -> None:
    hook = Hook()
    try:
        rules = rules_file(tmp_path, events='["routed"]')
        rules.write_text(rules.read_text().replace("http://127.0.0.1:9/hook", hook.url()))
        running = service(spool)
        try:
            routed(tmp_path, spool, rules, {"1.2.30": 2})
            wait_until(lambda: len(names(spool, NOTIFY_SENT)) == 1, timeout=30, what="delivery")
        finally:
            running.terminate()
            assert running.wait(timeout=30) == 0
        (request,) = hook.requests
        assert request["body"].startswith(b"routed|ct|out|")
        assert not (spool.root / NOTICES_DIR).exists() or os.listdir(spool.root / NOTICES_DIR) == []
    finally:
        hook.close()


def test_status_counts_what_waits_in_the_logs_then_notify_once_sends_it(
    tmp_path: Path, spool: Spool
) -> None:
    from mercli.status import collect_status
    from tests.test_notify_send import notify_once

    hook = Hook()
    try:
        rules = rules_file(tmp_path, events='["received", "routed"]')
        rules.write_text(rules.read_text().replace("http://127.0.0.1:9/hook", hook.url()))
        routed(tmp_path, spool, rules, {"1.2.31": 1, "1.2.32": 1})
        assert spool.items(NOTIFY) == []  # still lines of the router's log
        waiting = collect_status(spool)["notify"]["channels"]["hook"]["waiting"]
        assert waiting == 4  # received and routed, for two series
        result = notify_once(spool)
        assert result.returncode == 0, result.stderr
        assert len(names(spool, NOTIFY_SENT)) == 4 and len(hook.requests) == 4
        assert "hook" not in collect_status(spool)["notify"]["channels"]
    finally:
        hook.close()


def test_a_cursor_that_cannot_be_written_collects_nothing_twice(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch is published but the cursor stays: the next pass finds the items (one
    already sent, one with an id that had to be replaced) and makes none of them again."""
    with Worker(spool, "route") as writer, Worker(spool, "notify") as worker:
        writer.notices.open_transaction("t", "k", [note("a"), {**note("b"), "id": "../x"}])
        writer.notices.mark("t", "k", COMMIT)
        collector = Collector(spool, worker)
        with monkeypatch.context() as patch:

            def refuse(path: Path, data: bytes) -> None:
                raise OSError(28, "No space left on device")

            patch.setattr(worker, "replace_file", refuse)
            collector.collect()  # the error is logged, not raised
        first, second = spool.items(NOTIFY)  # published before the cursor failed
        os.rename(first.path, spool.state_dir(NOTIFY_SENT) / first.name)  # sent meanwhile
        assert collector.collect() == 0
        assert read_cursor(spool.root / NOTICES_DIR / writer.id).segment == 1  # moved now
    assert [i.name for i in spool.items(NOTIFY)] == [second.name]
    assert [i.name for i in spool.items(NOTIFY_SENT)] == [first.name]
    assert collected(spool) == 0
    assert not (spool.root / NOTICES_DIR).exists() or os.listdir(spool.root / NOTICES_DIR) == []


def test_a_marker_needs_no_new_segment_on_a_full_disk(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notices_module, "FIRST_SEGMENT_SIZE", 1024)
    with Worker(spool, "route") as writer:
        writer.notices.open_transaction("t", "k", [note("x" * 700)])  # the room left: a marker

        def full(*args: object) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(notices_module, "_create_segment", full)
        writer.notices.mark("t", "k", COMMIT)
        with pytest.raises(OSError, match="No space"):
            writer.notices.open_transaction("u", "k", [note("y")])
    assert collected(spool) == 1 and bodies(spool) == ["x" * 700]


def test_a_key_claimed_again_gets_its_commit_marker_synced_first(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    with Worker(spool, "route") as writer:
        writer.notices.open_transaction("t", "incoming~s", [note("a")])
        writer.notices.mark("t", "incoming~s", COMMIT)
        assert len(syncs) == 1  # the line; the commit marker is not synced
        writer.notices.before_claim("incoming~other")
        assert len(syncs) == 1
        assert writer.claim("incoming", "s") is None  # nothing there, but the key was synced
        assert len(syncs) == 2
        writer.notices.before_claim("incoming~s")
        assert len(syncs) == 2  # durable already


def test_an_error_after_the_commit_rename_finishes_the_transaction(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename committed: the caller's release rolls it forward (as recovery would), so
    the outputs and their notification stay, and the series is not routed again."""
    from mercli.spool import INCOMING, OUTGOING
    from mercli.spool import claims as claims_module

    real = claims_module.roll_forward
    failures = [OSError(5, "Input/output error")]

    def once(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args)

    monkeypatch.setattr(claims_module, "roll_forward", once)
    rules = rules_file(tmp_path, events='["routed"]')
    with pytest.raises(OSError, match="Input/output"):
        routed(tmp_path, spool, rules, {"1.2.33": 2})
    assert spool.items(INCOMING) == [] and len(spool.items(OUTGOING)) == 1
    assert spool.claimed(INCOMING) == []
    assert collected(spool) == 1


def test_the_log_holds_no_patient_data_for_a_channel_without_phi(
    tmp_path: Path, spool: Spool
) -> None:
    from mercli.route.router import Router, RouteSummary
    from mercli.rules.config import load_rules
    from tests.test_route import receive_file, series_files

    files = series_files(
        tmp_path / "src", "1.2.34", 1, PatientName="Doe^Secret", PatientID="PID-SECRET-9"
    )
    with Worker(spool, "receive") as worker:
        receive_file(worker, files[0])
    rules = load_rules(rules_file(tmp_path, events='["routed"]'))
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, rules)
        for state in router.due(float("inf"))[0]:
            router.route(state, RouteSummary())
        logged = b"".join(p.read_bytes() for p in (spool.root / NOTICES_DIR).rglob("*.log"))
        assert b'"routed"' in logged and b"SECRET" not in logged.upper()
    assert collected(spool) == 1
    (item,) = spool.items(NOTIFY)
    record = json.loads((item.path / NOTIFICATION_FILE).read_text())
    assert "variables" not in record and record["body"].startswith("routed|ct|out|")
    assert "SECRET" not in json.dumps(record).upper()


def test_an_abort_for_a_line_never_written_takes_no_room(spool: Spool) -> None:
    with Worker(spool, "route") as writer:
        writer.notices.open_transaction("t", "k", [note("a")])
        path = segment_path(spool.root / NOTICES_DIR / writer.id, 1)
        before = path.read_bytes()
        for n in range(500):  # commits whose lines could not be written (a full disk)
            writer.notices.mark(f"lost{n}", "k", ABORT)
        assert path.read_bytes() == before
        writer.notices.mark("t", "k", COMMIT)
    assert collected(spool) == 1


def test_a_long_log_is_collected_in_windows_and_batches_once_each(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marker further away than the window (a transaction that took long among many
    short ones) is still found; every notification is made once; the cursor ends at the end."""
    from mercli.notify import collect as collect_module

    monkeypatch.setattr(collect_module, "WINDOW", 50)
    monkeypatch.setattr(collect_module, "BATCH", 7)
    with Worker(spool, "route") as writer:
        writer.notices.open_transaction("slow", "k", [note("slow")])
        for n in range(300):
            writer.notices.open_transaction(f"t{n}", "k", [note(f"{n:03d}"), note(f"{n:03d}b")])
            writer.notices.mark(f"t{n}", "k", COMMIT)
        writer.notices.mark("slow", "k", COMMIT)
        assert collected(spool) == 601
        assert collected(spool) == 0
        for n in range(100):  # 200 lines: four windows of 50, each taken in turn
            writer.notices.open_transaction(f"u{n}", "k", [note(f"u{n:03d}")])
            writer.notices.mark(f"u{n}", "k", COMMIT)
        assert collected(spool) == 100
        folder = spool.root / NOTICES_DIR / writer.id
        assert pending(folder, read_cursor(folder), owner_exists=True).notifications == []
    made = bodies(spool)
    assert len(made) == 701 and len(set(made)) == 701 and "slow" in made


def test_large_variables_are_rendered_at_the_event(spool: Spool) -> None:
    from mercli.notify.channels import Channel, Subscription
    from mercli.notify.enqueue import add_notifications

    class Recorder:
        def __init__(self) -> None:
            self.made: list[dict[str, Any]] = []

        def notify(self, record: dict[str, Any]) -> None:
            self.made.append(record)

    channel = Channel(name="hook", type="webhook", url="http://x", body="{{ event }} {{ result }}")
    transaction = Recorder()
    small, large = {"event": "processed", "result": {"a": 1}}, {"result": {"a": "y" * 20000}}
    for values in (small, {"event": "processed", **large}):
        add_notifications(
            transaction,  # type: ignore[arg-type]
            [Subscription(channel, ("processed",))],
            "processed",
            values,
            {"item": "job"},
        )
    kept, rendered_now = transaction.made
    assert kept["variables"] == small and "body" not in kept
    assert "variables" not in rendered_now and rendered_now["body"].startswith("processed {")


def test_notifications_made_at_commit_count_only_if_it_commits(
    tmp_path: Path, spool: Spool
) -> None:
    """`Transaction.notify_later`: the notifications are made in the thread that writes
    their line, while the commit's fsyncs run. A maker that fails commits nothing and writes
    no line; makers that make nothing write none; the rest get `<txn>.<n>` as their id when
    collected, the same id when collected again."""
    from mercli.spool import INCOMING, OUTGOING, Claim
    from tests.test_route import receive_file, series_files

    with Worker(spool, "receive") as receiver:
        for uid in ("1.2.35", "1.2.36"):
            for path in series_files(tmp_path / "src" / uid, uid, 2):
                receive_file(receiver, path)
    first, second = (batch.name for batch in spool.items(INCOMING))
    logs = spool.root / NOTICES_DIR

    def broken() -> list[dict[str, Any]]:
        raise RuntimeError("a bug while taking the variables")

    def claimed(worker: Worker, name: str) -> Claim:
        claim = worker.claim(INCOMING, name)
        assert claim is not None
        return claim

    unnamed = {key: value for key, value in note("made").items() if key != "id"}
    with Worker(spool, "route") as worker:
        claim = claimed(worker, first)
        transaction = claim.transaction()
        transaction.new_item(OUTGOING, "job-a")
        transaction.notify_later(broken)
        with pytest.raises(RuntimeError, match="a bug"):
            transaction.commit()
        claim.release()
        assert spool.items(OUTGOING) == [] and len(spool.items(INCOMING)) == 2
        assert not logs.exists()  # no line, no marker, no segment

        transaction = claimed(worker, first).transaction()
        transaction.new_item(OUTGOING, "job-a")
        transaction.notify_later(list)  # nothing to tell after all
        transaction.commit()
        assert [item.name for item in spool.items(OUTGOING)] == ["job-a"]
        assert not logs.exists()

        transaction = claimed(worker, second).transaction()
        transaction.new_item(OUTGOING, "job-b")
        transaction.notify_later(list)
        transaction.notify_later(lambda: [unnamed])
        transaction.commit()
        assert collected(spool) == 1
    (item,) = spool.items(NOTIFY)
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}-[0-9a-f]{12}\.0000", item.name), item.name
    assert json.loads((item.path / NOTIFICATION_FILE).read_text())["id"] == item.name
    assert bodies(spool) == ["made"]
    (owner,) = logs.iterdir()
    (owner / CURSOR_FILE).unlink()  # the cursor lost: the line is read again
    assert collected(spool) == 0 and [i.name for i in spool.items(NOTIFY)] == [item.name]


@pytest.mark.parametrize(
    "value",
    [
        "a" * 1300,
        "a" * 17000,
        "\U0001f600" * 1300,  # 12 bytes each: 15,600
        "\U0001f600" * 1400,  # 16,800
        "\x01" * 2800,  # 6 bytes each: 16,800
        ["a" * 9000, "b" * 9000],
        [10**4000] * 5,  # 20,005 digits
        float("nan"),
        {1: "a" * 9000, 2: "b" * 9000},  # keys JSON makes strings
        {f"n{n}": 10**4000 for n in range(5)},
    ],
)
def test_variables_are_kept_for_collection_exactly_when_they_fit(value: Any) -> None:
    """The count that spares encoding the variables at every event says "small" only when
    the exact JSON length would, for a channel with and one without patient data: a large
    patient name makes only the `phi = true` channel's notification large."""
    from mercli.notify.channels import Channel, Subscription
    from mercli.notify.enqueue import VARIABLES_LIMIT, notifications

    plain = Channel(name="hook", type="webhook", url="http://x", body="{{ event }}")
    phi = Channel(name="phi", type="webhook", url="http://y", body="{{ event }}", phi=True)
    if isinstance(value, list) and isinstance(value[0], int):
        items: list[Any] = [*value]
        variables: dict[Any, Any] = {"event": "routed", "item": "x", "counts": items}
    elif isinstance(value, dict):
        variables = {"event": "routed", **value}
    else:
        variables = {"event": "routed", "item": value, "instances": 3, "rules": ["r"]}
    variables["patient_name"] = "P" * 17000
    subscriptions = [Subscription(plain, ("routed",)), Subscription(phi, ("routed",))]
    for_plain, for_phi = notifications(subscriptions, "routed", variables, {})
    without_phi = {k: v for k, v in variables.items() if k != "patient_name"}
    fits = len(json.dumps(without_phi, default=str)) <= VARIABLES_LIMIT
    assert ("variables" in for_plain) == fits
    assert "variables" not in for_phi  # 17,000 bytes of name alone
    assert "PPPP" not in json.dumps(for_plain, default=str)
