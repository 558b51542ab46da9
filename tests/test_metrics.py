"""`mercli metrics`: counters equal to what the spool did, counted incrementally; gauges as
`mercli status`; the HTTP listener (bounded against idle clients) and the atomic textfile;
the Grafana dashboard and alert rules use only metrics that exist."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from mercli.cli import cli
from mercli.metrics.collector import registry_for
from mercli.metrics.counters import MAX_NAMES, OTHER
from mercli.metrics.listen import CLIENT_DEADLINE, serve
from mercli.metrics.state import STATE_DIR, STATE_FILE, CounterStore
from mercli.metrics.textfile import TEXTFILE_MODE, write_textfile
from mercli.spool import OUTGOING, SUCCESS, Spool, Worker
from mercli.spool.events import Cursor
from tests.kit import ROOT
from tests.netkit import free_port, port_open, receiver, storescu, wait_until
from tests.spoolkit import receive_instance
from tests.test_route import series_files

GRAFANA = ROOT / "examples" / "grafana"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_cli(spool: Spool | Path, *args: str) -> str:
    root = spool.root if isinstance(spool, Spool) else spool
    result = CliRunner().invoke(cli, ["metrics", "--spool", str(root), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def mercli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mercli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def day_file(spool: Spool) -> Path:
    (path,) = spool.events.directory.glob("*.ndjson")
    return path


def log_dispatched(spool: Spool, count: int, target: str = "pacs", instances: int = 3) -> None:
    """Events exactly as the dispatcher writes them (`Dispatcher._settle`)."""
    for n in range(count):
        spool.log("dispatched", item=f"job-{n}", target=target, attempt=1, instances=instances)


# -- counters equal what the real commands did ----------------------------------------------------

RULES = """\
[route]
settle = "1s"
series_timeout = "1h"

[targets.archive]
type = "folder"
path = "archive"

[targets.ai]
type = "folder"
path = "ai"

[[rules]]
name = "ct-to-both"
when = 'Modality == "CT"'
targets = ["archive", "ai"]

[[rules]]
name = "no-mr"
when = 'Modality == "MR"'
action = "discard"
"""


def test_counters_and_gauges_equal_what_receive_route_and_dispatch_did(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    files = series_files(tmp_path / "ct1", "1.2.801", 3, StudyInstanceUID="1.2.8")
    files += series_files(tmp_path / "ct2", "1.2.802", 2, StudyInstanceUID="1.2.8")
    files += series_files(tmp_path / "mr", "1.2.803", 4, StudyInstanceUID="1.2.8", modality="MR")
    with receiver(root, "--processes", "1") as running:
        assert storescu(running.port, files).returncode == 0
    routed = mercli("route", "--spool", str(root), "--rules", str(rules), "--once", "--all")
    assert routed.returncode == 0, routed.stderr
    spool = Spool.open(root)
    assert len(spool.items(OUTGOING)) == 4  # 2 CT series x 2 targets

    before = parse(metrics_cli(spool))
    assert value(before, "mercli_received_instances_total") == 9
    assert value(before, "mercli_routed_total", kind="dispatch", target="archive") == 2
    assert value(before, "mercli_routed_total", kind="dispatch", target="ai") == 2
    assert value(before, "mercli_routed_rule_total", rule="ct-to-both") == 4
    assert value(before, "mercli_discarded_total") == 1
    assert value(before, "mercli_backlog_jobs", target="ai", priority="normal") == 2
    assert value(before, "mercli_spool_items", state="outgoing") == 4
    assert value(before, "mercli_spool_instances", state="outgoing") == 10
    assert value(before, "mercli_spool_oldest_item_age_seconds", state="outgoing") > 0

    dispatched = mercli("dispatch", "--spool", str(root), "--once")
    assert dispatched.returncode == 0, dispatched.stderr
    after = parse(metrics_cli(spool))
    assert value(after, "mercli_received_instances_total") == 9  # nothing counted twice
    for target in ("archive", "ai"):
        assert value(after, "mercli_dispatched_total", target=target) == 2
        assert value(after, "mercli_dispatched_instances_total", target=target) == 5
        assert value(after, "mercli_backlog_jobs", target=target, priority="normal") == 0
    assert value(after, "mercli_spool_items", state="outgoing") == 0
    assert value(after, "mercli_spool_items", state=SUCCESS) == 4
    assert value(after, "mercli_events_total", event="dispatched") == 4
    assert value(after, "mercli_failed_total") == 0


def test_gauges_are_what_mercli_status_reports(spool: Spool) -> None:
    with Worker(spool, "receive") as worker:
        for n in range(3):
            receive_instance(worker, "1.2.44", f"1.2.44.{n}")
        samples = parse(metrics_cli(spool))
        status = json.loads(metrics_status(spool))
    incoming = status["states"]["incoming"]
    assert value(samples, "mercli_spool_items", state="incoming") == incoming["items"] == 1
    assert value(samples, "mercli_spool_instances", state="incoming") == incoming["instances"]
    assert value(samples, "mercli_spool_bytes", state="incoming") == incoming["bytes"]
    assert value(samples, "mercli_workers", state="live") == status["workers"]["live"] == 1


def metrics_status(spool: Spool) -> str:
    result = CliRunner().invoke(cli, ["status", "--spool", str(spool.root), "--json"])
    assert result.exit_code == 0
    return result.stdout


def test_every_event_kind_is_counted_with_its_labels(spool: Spool) -> None:
    spool.log("received", series="s", instance="i", sender="CT1", replaced=True)
    spool.log("routed", item="j", series="s", instances=2, rules=["r"], process=True)
    spool.log("held", item="h", series="s", instances=1, rules=[], study="st", held_for=["r"])
    spool.log("processed", item="p", rule="r", modules=["m"], status=[0], instances=2)
    spool.log("failed", item="j", target="pacs", attempt=20, reason="refused")
    spool.log("failed", item="p", rule="r", module="seg", reason="exit 1", status=1)
    spool.log("retry", item="j", target="pacs", attempt=1, error="refused", delay=10.0)
    spool.log("resent", **{"from": "error/j"}, item="j", to="outgoing/k")
    spool.log("purged", state="success", item="x", bytes=1000, age=9.0)
    spool.log("quarantined", item="q", reason="no SOP Instance UID", sender="CT1")
    spool.log("duplicate_dropped", group="s", instance="i")
    spool.log("recovered", owner="o", released=["outgoing/a"], rolled_forward=["success/b"])
    spool.log("teleported", item="n")  # a kind this exporter does not know
    samples = parse(metrics_cli(spool))
    assert value(samples, "mercli_received_replaced_total") == 1
    assert value(samples, "mercli_routed_total", kind="process", target="") == 1
    assert value(samples, "mercli_held_total") == 1
    assert value(samples, "mercli_processed_total", rule="r") == 1
    assert value(samples, "mercli_failed_total", stage="dispatch", target="pacs", module="") == 1
    assert value(samples, "mercli_failed_total", stage="process", target="", module="seg") == 1
    assert value(samples, "mercli_retries_total", stage="dispatch", target="pacs", module="") == 1
    assert value(samples, "mercli_resent_total", from_state="error", to_state="outgoing") == 1
    assert value(samples, "mercli_purged_total", state="success") == 1
    assert value(samples, "mercli_purged_bytes_total", state="success") == 1000
    assert value(samples, "mercli_quarantined_total") == 1
    assert value(samples, "mercli_duplicates_dropped_total") == 1
    assert value(samples, "mercli_recovered_claims_total") == 2
    assert value(samples, "mercli_events_total", event=OTHER) == 1


def test_labels_stay_bounded_and_never_carry_free_text(spool: Spool) -> None:
    for n in range(MAX_NAMES + 20):
        spool.log("dispatched", item=f"j{n}", target=f"t{n}", attempt=1, instances=1)
    for hostile in ("../../etc", 'a"b\nc', "1.2.840.99999.1" * 10, "", None, ["x"]):
        spool.log("dispatched", item="j", target=hostile, attempt=1, instances=1)
    text = metrics_cli(spool)
    targets = {labels for (name, labels) in parse(text) if name == "mercli_dispatched_total"}
    assert len(targets) == MAX_NAMES + 1
    assert value(parse(text), "mercli_dispatched_total", target=OTHER) == 20 + 6
    assert "etc" not in text and "99999" not in text


# -- incremental: only new lines are read ---------------------------------------------------------


def test_a_second_run_counts_only_new_events_and_never_rereads_history(spool: Spool) -> None:
    log_dispatched(spool, 5)
    assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 5
    state = json.loads((spool.root / STATE_DIR / STATE_FILE).read_text())
    size = day_file(spool).stat().st_size
    assert Cursor.from_json(state["cursor"]) == Cursor(day_file(spool).stem, size)

    # blank out the history in place (same length): a run that read it again would lose it
    day_file(spool).write_bytes(b" " * (size - 1) + b"\n")
    log_dispatched(spool, 2)
    samples = parse(metrics_cli(spool))
    assert value(samples, "mercli_dispatched_total", target="pacs") == 7
    assert value(samples, "mercli_dispatched_instances_total", target="pacs") == 21


def test_the_listener_reads_only_new_lines_per_scrape(spool: Spool) -> None:
    log_dispatched(spool, 4)
    store = CounterStore(spool, persist=False)
    assert store.advance() == 4
    assert store.advance() == 0  # nothing new: nothing read
    log_dispatched(spool, 3)
    assert store.advance() == 3
    assert store.cursor == Cursor(day_file(spool).stem, day_file(spool).stat().st_size)


def test_past_days_are_not_reopened_once_counted(spool: Spool) -> None:
    old = spool.events.directory / "2026-01-01.ndjson"
    line = {"at": "2026-01-01T00:00:00+00:00", "event": "received", "series": "s", "instance": "i"}
    old.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    log_dispatched(spool, 1)
    assert value(parse(metrics_cli(spool)), "mercli_received_instances_total") == 2
    old.unlink()  # retention dropped the day: the counts stay
    log_dispatched(spool, 1)
    samples = parse(metrics_cli(spool))
    assert value(samples, "mercli_received_instances_total") == 2
    assert value(samples, "mercli_dispatched_total", target="pacs") == 2


def test_a_torn_last_line_is_counted_once_it_is_whole(spool: Spool) -> None:
    log_dispatched(spool, 1)
    line = json.dumps({"at": "2026-11-30T00:00:00+00:00", "event": "dispatched", "target": "pacs"})
    with day_file(spool).open("ab") as fh:
        fh.write(line[:25].encode())  # a writer mid-write
    assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 1
    with day_file(spool).open("ab") as fh:
        fh.write(line[25:].encode() + b"\n")
    assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 2
    assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 2


def test_concurrent_runs_never_corrupt_the_state_or_count_twice(spool: Spool) -> None:
    log_dispatched(spool, 50)

    def run_and_log(n: int) -> None:
        log_dispatched(spool, 10)
        assert mercli("metrics", "--spool", str(spool.root)).returncode == 0

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(run_and_log, range(6)))
    state = json.loads((spool.root / STATE_DIR / STATE_FILE).read_text())
    assert state["version"] == 1
    samples = parse(metrics_cli(spool))
    assert value(samples, "mercli_dispatched_total", target="pacs") == 110
    assert value(samples, "mercli_events_total", event="dispatched") == 110


def test_a_run_that_cannot_have_the_lock_counts_but_does_not_save(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_dispatched(spool, 4)
    metrics_cli(spool)
    saved = (spool.root / STATE_DIR / STATE_FILE).read_bytes()
    log_dispatched(spool, 1)
    monkeypatch.setattr("mercli.metrics.state.LOCK_DEADLINE", 0.2)
    fd = os.open(spool.root / STATE_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a hung run holding it
        started = time.monotonic()
        store = CounterStore(spool)
        assert store.advance() == 1 and time.monotonic() - started < 2
        assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 5
        assert (spool.root / STATE_DIR / STATE_FILE).read_bytes() == saved
    finally:
        os.close(fd)
    assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 5
    assert (spool.root / STATE_DIR / STATE_FILE).read_bytes() != saved


def test_an_unreadable_state_file_means_counting_again(spool: Spool) -> None:
    log_dispatched(spool, 3)
    metrics_cli(spool)
    (spool.root / STATE_DIR / STATE_FILE).write_text("{torn")
    assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 3


def test_a_spool_where_no_state_can_be_saved_is_still_counted(spool: Spool) -> None:
    """As on a read-only spool (and whatever our uid): count from scratch, save nothing."""
    log_dispatched(spool, 2)
    (spool.root / STATE_DIR).write_text("not a folder")
    for _ in range(2):
        assert value(parse(metrics_cli(spool)), "mercli_dispatched_total", target="pacs") == 2
    assert (spool.root / STATE_DIR).read_text() == "not a folder"


# -- --listen ------------------------------------------------------------------------------------


@pytest.fixture
def listener(spool: Spool) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    command = [sys.executable, "-m", "mercli", "metrics", "--spool", str(spool.root)]
    process = subprocess.Popen(
        [*command, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: port_open(port) or process.poll() is not None, what="listener")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def stopped(process: subprocess.Popen[str], signum: int) -> int:
    """Signal the listener; its exit code (its stderr in the failure message if it hangs)."""
    process.send_signal(signum)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(process.communicate()[1]) from None


def scrape(port: int, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        assert reply.status == 200
        return parse(reply.read().decode())


def test_listen_serves_counts_that_grow_with_new_events_and_stops_on_sigterm(
    spool: Spool, listener: tuple[subprocess.Popen[str], int]
) -> None:
    process, port = listener
    log_dispatched(spool, 2)
    assert value(scrape(port), "mercli_dispatched_total", target="pacs") == 2
    log_dispatched(spool, 3, target="archive")
    samples = scrape(port)
    assert value(samples, "mercli_dispatched_total", target="pacs") == 2
    assert value(samples, "mercli_dispatched_total", target="archive") == 3
    assert stopped(process, signal.SIGTERM) == 0


def test_an_idle_client_does_not_block_the_next_scrape(
    spool: Spool, listener: tuple[subprocess.Popen[str], int]
) -> None:
    process, port = listener
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    try:
        started = time.monotonic()
        assert value(scrape(port), "mercli_received_instances_total") == 0
        assert time.monotonic() - started < CLIENT_DEADLINE / 2  # not after the idle ones' end
    finally:
        for sock in idle:
            sock.close()
    assert stopped(process, signal.SIGINT) == 0


def closed_after(sock: socket.socket, started: float) -> float:
    """Send a byte every 0.2 s until the server closes the connection; seconds since `started`."""
    sock.settimeout(0.2)
    while time.monotonic() - started < 10:
        try:
            sock.sendall(b"G")
            if sock.recv(4096) is not None:  # EOF (b"") or the server's last words
                break
        except TimeoutError:
            continue
        except OSError:
            break
    return time.monotonic() - started


def test_slow_clients_are_cut_at_the_deadline_and_capped(spool: Spool) -> None:
    server = serve(registry_for(CounterStore(spool)), "127.0.0.1", 0, max_clients=2, deadline=1.0)
    port = server.server_address[1]
    try:
        started = time.monotonic()
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        wait_until(lambda: server.clients == 2, what="both slots taken")
        with socket.create_connection(("127.0.0.1", port)) as refused:
            refused.settimeout(5)
            assert refused.recv(1) == b""  # closed at once: no thread made for it
        for sock in slow:  # trickling bytes does not extend the deadline
            assert 0.9 < closed_after(sock, started) < 4
            sock.close()
        wait_until(lambda: server.clients == 0, what="slots freed")
        assert value(scrape(port), "mercli_held_total") == 0
    finally:
        server.shutdown()
        server.server_close()


def test_listen_arguments_are_checked(spool: Spool) -> None:
    runner = CliRunner()
    base = ["metrics", "--spool", str(spool.root)]
    bad = runner.invoke(cli, [*base, "--listen", "localhost"])
    assert bad.exit_code == 2 and "HOST:PORT" in bad.output
    both = runner.invoke(cli, [*base, "--listen", ":9400", "--textfile", "x.prom"])
    assert both.exit_code == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = mercli(
            "metrics", "--spool", str(spool.root), "--listen", f"127.0.0.1:{busy.getsockname()[1]}"
        )
    assert taken.returncode == 3 and "cannot listen" in taken.stderr


# -- --textfile ----------------------------------------------------------------------------------


def test_textfile_is_replaced_whole_and_readable_by_node_exporter(
    spool: Spool, tmp_path: Path
) -> None:
    folder = tmp_path / "textfile"
    folder.mkdir()
    path = folder / "mercli.prom"
    log_dispatched(spool, 1)
    stop = threading.Event()
    seen: list[str] = []

    def read_all_the_time() -> None:
        while not stop.is_set():
            with suppress(FileNotFoundError):  # before the first write
                seen.append(path.read_text())
            time.sleep(0.001)  # let the writer have the GIL too

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for _ in range(30):
            log_dispatched(spool, 1)
            metrics_cli(spool, "--textfile", str(path))
    finally:
        stop.set()
        reader.join()
    assert seen
    for text in seen:  # never a partial file: each one parses and ends with the last family
        assert text.rstrip().endswith("mercli_running_modules 0.0"), text[-200:]
        parse(text)
    assert value(parse(path.read_text()), "mercli_dispatched_total", target="pacs") == 31
    assert stat.S_IMODE(path.stat().st_mode) == TEXTFILE_MODE
    assert [p.name for p in folder.iterdir()] == ["mercli.prom"]  # no temp left behind


def test_a_failed_textfile_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mercli.prom"
    write_textfile(path, b"old 1\n")
    made: list[str] = []

    def failing_replace(src: Any, dst: Any) -> None:
        made.append(Path(src).name)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_textfile(path, b"new 2\n")
    (temp,) = made
    assert re.fullmatch(r"\.mercli\.prom\.\d+\.[0-9a-f]+\.tmp", temp)  # node_exporter skips it
    assert path.read_bytes() == b"old 1\n" and sorted(tmp_path.iterdir()) == [path]


def test_textfile_in_a_missing_folder_exits_3(spool: Spool, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["metrics", "--spool", str(spool.root), "--textfile", str(tmp_path / "no" / "x.prom")]
    )
    assert result.exit_code == 3 and "cannot write the textfile" in result.output


# -- examples/grafana ----------------------------------------------------------------------------

METRIC = re.compile(r"\bmercli_[a-z_]+\b")


def exposed_names(spool: Spool) -> set[str]:
    """Every series name the exposition can carry (counters with `_total`)."""
    names = set()
    for family in text_string_to_metric_families(metrics_cli(spool)):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("expr", "query") and isinstance(item, str):
                yield item
            else:
                yield from expressions(item)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def test_grafana_dashboard_is_valid_and_uses_only_exposed_metrics(spool: Spool) -> None:
    dashboard = json.loads((GRAFANA / "mercli-dashboard.json").read_text())
    variables = dashboard["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    assert dashboard["title"] and dashboard["panels"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = {name for expr in expressions(dashboard) for name in METRIC.findall(expr)}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for needed in (
        "mercli_received_instances_total",
        "mercli_dispatched_total",
        "mercli_backlog_jobs",
        "mercli_spool_oldest_item_age_seconds",
        "mercli_failed_total",
    ):
        assert needed in used
    assert used <= exposed_names(spool), used - exposed_names(spool)


def test_alert_rules_are_valid_and_use_only_exposed_metrics(spool: Spool) -> None:
    document = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"MercliBacklogOld", "MercliTargetFailing", "MercliWorkersDead"} <= names
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used and used <= exposed_names(spool), used - exposed_names(spool)
