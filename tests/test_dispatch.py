"""`mercli dispatch` against real peers: DCMTK storescp, pynetdicom SCPs that misbehave, folders."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt

from mercli.dispatch.dispatcher import Dispatcher, retry_delay
from mercli.jobs import DISPATCH_FILE, Progress, Target
from mercli.route.router import Router, RouteSummary
from mercli.rules.config import load_rules
from mercli.spool import ERROR, JOB_FILE, OUTGOING, SUCCESS, Spool, Worker, recover
from tests.dicomfiles import dataset_bytes
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until
from tests.test_route import receive_file, series_files

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def rules_for(folder: Path, targets: str, names: str, *, extra: str = "") -> Path:
    path = folder / "rules.toml"
    path.write_text(f'{targets}\n[[rules]]\nname = "all"\ntargets = [{names}]\n{extra}')
    return path


def dicom_target(name: str, port: int, **options: Any) -> str:
    settings = {"type": "dicom", "host": "127.0.0.1", "port": port, "called_aet": "ANY"}
    settings |= {"retry_delay": "0s", "max_attempts": 3, **options}
    lines = [f"[targets.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    return "\n".join(lines) + "\n"


def routed(tmp_path: Path, spool: Spool, rules: Path, series: dict[str, int]) -> list[Path]:
    """Receive `count` instances per series (real sidecars), route them; the source files."""
    files: list[Path] = []
    with Worker(spool, "receive") as worker:
        for uid, count in series.items():
            made = series_files(tmp_path / "src" / uid, uid, count, StudyInstanceUID="1.2.9")
            for path in made:
                receive_file(worker, path, ReceivedAt=f"2026-11-28T00:00:{len(files):02d}+00:00")
            files += made
    with Worker(spool, "route") as worker:
        router = Router(spool, worker, load_rules(rules))
        for state in sorted(router.due(float("inf"))[0], key=lambda s: s.name):
            router.route(state, RouteSummary())
    return files


def dispatch_once(spool: Spool, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mercli", "dispatch", "--once", "--spool", str(spool.root)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=180)


class Scp:
    """A pynetdicom SCP that records (series, InstanceNumber, SOP UID) and can misbehave."""

    def __init__(self, status: Callable[[Any], int] = lambda ds: 0, delay: float = 0.0) -> None:
        self.received: list[tuple[str, int, str]] = []
        self.status = status
        self.delay = delay
        self.abort_at: int | None = None
        ae = AE(ae_title="ANY")
        ae.maximum_pdu_size = 0
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, [EXPLICIT, IMPLICIT])
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> int:
        ds = event.dataset
        if self.abort_at is not None and len(self.received) == self.abort_at:
            self.abort_at = None
            event.assoc.abort()
            return 0xA700
        time.sleep(self.delay)
        status = self.status(ds)
        if status in (0, 0xB000):
            self.received.append((ds.SeriesInstanceUID, int(ds.InstanceNumber), ds.SOPInstanceUID))
        return status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp() -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(*args: Any, **kwargs: Any) -> Scp:
        started.append(Scp(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


# -- delivery -------------------------------------------------------------------------------------


def test_series_reaches_storescp_byte_for_byte(tmp_path: Path, spool: Spool) -> None:
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    storescp = subprocess.Popen(
        ["storescp", "+B", "+xa", "-pm", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port))
        rules = rules_for(tmp_path, dicom_target("pacs", port), '"pacs"')
        files = routed(tmp_path, spool, rules, {"1.2.10": 12})
        result = dispatch_once(spool)
    finally:
        storescp.terminate()
        storescp.wait()
    assert result.returncode == 0, result.stderr
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(path)
    (done,) = spool.items(SUCCESS)
    progress = json.loads((done.path / DISPATCH_FILE).read_text())
    assert progress["attempts"] == 1 and len(progress["delivered"]) == 12
    assert [e["event"] for e in spool.events.read()].count("dispatched") == 1


def test_instances_go_in_instance_number_order(tmp_path: Path, spool: Spool, scp: Any) -> None:
    server = scp()
    rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
    routed(tmp_path, spool, rules, {"1.2.11": 15})
    assert dispatch_once(spool).returncode == 0
    assert [number for _, number, _ in server.received] == list(range(15))


def test_failure_statuses_retry_only_what_is_missing(
    tmp_path: Path, spool: Spool, scp: Any
) -> None:
    refuse = {3, 7}
    server = scp(status=lambda ds: 0xA700 if int(ds.InstanceNumber) in refuse else 0)
    rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
    routed(tmp_path, spool, rules, {"1.2.12": 10})
    first = dispatch_once(spool)
    assert first.returncode == 1 and "0xA700" in first.stderr
    (job,) = spool.items(OUTGOING)
    progress = Progress.load(job.path)
    assert (
        progress.attempts == 1
        and len(progress.delivered) == 8
        and "2 refused" in progress.last_error
    )
    refuse.clear()
    assert dispatch_once(spool).returncode == 0
    assert sorted(number for _, number, _ in server.received) == list(range(10))  # 3, 7 once more
    assert len(server.received) == 10


def test_warning_status_counts_as_delivered(tmp_path: Path, spool: Spool, scp: Any) -> None:
    server = scp(status=lambda ds: 0xB000)
    rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
    routed(tmp_path, spool, rules, {"1.2.13": 3})
    assert dispatch_once(spool).returncode == 0 and len(spool.items(SUCCESS)) == 1


def test_abort_mid_job_resends_from_where_it_stopped(
    tmp_path: Path, spool: Spool, scp: Any
) -> None:
    server = scp()
    server.abort_at = 4
    rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
    routed(tmp_path, spool, rules, {"1.2.14": 10})
    assert dispatch_once(spool).returncode == 1
    (job,) = spool.items(OUTGOING)
    assert Progress.load(job.path).delivered  # what got through before the abort
    assert dispatch_once(spool).returncode == 0
    assert sorted({number for _, number, _ in server.received}) == list(range(10))


def test_unreachable_target_does_not_hold_up_others_and_gives_up(
    tmp_path: Path, spool: Spool
) -> None:
    dead = free_port()
    targets = dicom_target("down", dead, max_attempts=2)
    targets += f'[targets.archive]\ntype = "folder"\npath = "{tmp_path / "archive"}"\n'
    rules = rules_for(tmp_path, targets, '"down", "archive"')
    routed(tmp_path, spool, rules, {"1.2.15": 3, "1.2.16": 2})
    first = dispatch_once(spool)
    assert first.returncode == 5 and "unreachable: down" in first.stderr
    assert len(list((tmp_path / "archive").iterdir())) == 2  # both archive jobs went through
    assert dispatch_once(spool).returncode == 5
    failed = spool.items(ERROR)
    assert len(failed) == 2 and spool.items(OUTGOING) == []
    reason = json.loads((failed[0].path / "error.json").read_text())
    assert "connection refused" in reason["reason"] and reason["target"] == "down"
    assert (failed[0].path / JOB_FILE).exists()  # resendable: the job is whole


def test_folder_target_gets_the_job_atomically(tmp_path: Path, spool: Spool) -> None:
    dest = tmp_path / "dest"
    rules = rules_for(tmp_path, f'[targets.ai]\ntype = "folder"\npath = "{dest}"\n', '"ai"')
    files = routed(tmp_path, spool, rules, {"1.2.17": 4})
    assert dispatch_once(spool).returncode == 0
    (job_dir,) = dest.iterdir()
    (done,) = spool.items(SUCCESS)
    assert job_dir.name == done.name
    assert sorted(p.name for p in job_dir.glob("*.dcm")) == sorted(p.name for p in files)
    assert len(list(job_dir.glob("*.tags"))) == 4


# -- order, concurrency, crashes ------------------------------------------------------------------


def test_ordered_target_keeps_series_order_with_four_workers(
    tmp_path: Path, spool: Spool, scp: Any
) -> None:
    server = scp(delay=0.01)
    rules = rules_for(tmp_path, dicom_target("pacs", server.port, ordered=True), '"pacs"')
    series = {f"1.2.20.{n}": 4 for n in range(6)}
    routed(tmp_path, spool, rules, series)  # first instances received in this order
    assert dispatch_once(spool, "--workers", "4").returncode == 0
    arrival = [uid for uid, _, _ in server.received]
    firsts = sorted(set(arrival), key=arrival.index)
    assert firsts == list(series)
    for uid in series:  # and each series whole before the next starts
        positions = [i for i, got in enumerate(arrival) if got == uid]
        assert positions == list(range(positions[0], positions[0] + 4))


def test_several_dispatchers_send_each_job_once(tmp_path: Path, spool: Spool) -> None:
    dest = tmp_path / "dest"
    rules = rules_for(tmp_path, f'[targets.ai]\ntype = "folder"\npath = "{dest}"\n', '"ai"')
    routed(tmp_path, spool, rules, {f"1.2.30.{n}": 2 for n in range(30)})
    command = [sys.executable, "-m", "mercli", "dispatch", "--once", "--spool", str(spool.root)]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE) for _ in range(3)]
    assert [run.wait(timeout=120) for run in runs] == [0, 0, 0]
    assert len(spool.items(SUCCESS)) == 30 and len(list(dest.iterdir())) == 30
    dispatched = [e for e in spool.events.read() if e["event"] == "dispatched"]
    assert len(dispatched) == 30 and len({e["item"] for e in dispatched}) == 30


def test_kill_9_mid_job_then_the_job_is_finished(tmp_path: Path, spool: Spool, scp: Any) -> None:
    server = scp(delay=0.02)
    rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
    routed(tmp_path, spool, rules, {"1.2.40": 40})
    command = [sys.executable, "-m", "mercli", "dispatch", "--spool", str(spool.root)]
    service = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    wait_until(lambda: len(server.received) >= 10, timeout=60, what="sending to start")
    service.kill()
    service.wait()
    assert spool.items(OUTGOING) == [] and len(spool.claimed(OUTGOING)) == 1
    recover(spool)
    assert len(spool.items(OUTGOING)) == 1
    assert dispatch_once(spool).returncode == 0
    assert {number for _, number, _ in server.received} == set(range(40))
    assert len(spool.items(SUCCESS)) == 1 and spool.claimed() == []


def test_service_sends_a_job_as_soon_as_it_appears(tmp_path: Path, spool: Spool, scp: Any) -> None:
    server = scp()
    rules = rules_for(tmp_path, dicom_target("pacs", server.port), '"pacs"')
    command = [sys.executable, "-m", "mercli", "dispatch", "--spool", str(spool.root)]
    service = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        routed(tmp_path, spool, rules, {"1.2.50": 3})
        wait_until(lambda: len(spool.items(SUCCESS)) == 1, timeout=30)
    finally:
        service.terminate()
        assert service.wait(timeout=30) == 0
    assert len(server.received) == 3


# -- the retry policy -----------------------------------------------------------------------------


def test_backoff_grows_and_is_capped() -> None:
    target = Target("t", "folder", retry_delay=10.0, retry_backoff=2.0, retry_max_delay=60.0)
    assert [retry_delay(target, n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_a_job_waiting_for_its_retry_is_not_picked(tmp_path: Path, spool: Spool) -> None:
    dest = tmp_path / "dest"
    rules = rules_for(tmp_path, f'[targets.ai]\ntype = "folder"\npath = "{dest}"\n', '"ai"')
    routed(tmp_path, spool, rules, {"1.2.60": 1})
    with Worker(spool, "dispatch") as worker:
        dispatcher = Dispatcher(spool, worker)
        picked = dispatcher.pick()
        assert picked is not None
        claim, _ = picked
        Progress(attempts=1, next_attempt=time.time() + 3600).save(worker, claim.path)
        claim.release()
        dispatcher.busy.clear()
        assert dispatcher.pick() is None
        assert dispatcher.next_due() is not None


# -- targets never share files, jobs never reach outside the spool ---------------------------------


def folder_targets(tmp_path: Path, *names: str, link: str = "") -> Path:
    blocks = "".join(
        f'[targets.{name}]\ntype = "folder"\npath = "{tmp_path / name}"\n{link}\n' for name in names
    )
    return rules_for(tmp_path, blocks, ", ".join(f'"{name}"' for name in names))


def test_fanned_out_folder_targets_get_their_own_copies(tmp_path: Path, spool: Spool) -> None:
    """A consumer editing a delivered file in place changes neither the other target's copy
    nor the spool's (success/): folder targets copy unless `link = true`."""
    routed(tmp_path, spool, folder_targets(tmp_path, "a", "b"), {"1.2.70": 2})
    assert dispatch_once(spool).returncode == 0
    edited = sorted((tmp_path / "a").glob("*/*.dcm"))[0]
    original = edited.read_bytes()
    with edited.open("r+b") as fh:  # in place, as a viewer that "fixes" a tag would
        fh.seek(200)
        fh.write(b"EDITED-IN-PLACE")
    assert edited.stat().st_nlink == 1
    others = list((tmp_path / "b").glob(f"*/{edited.name}"))
    others += [item.path / edited.name for item in spool.items(SUCCESS)]
    assert len(others) == 3  # b's copy, and both jobs' copies in success/
    for other in others:
        assert other.read_bytes() == original, other


def test_link_true_hard_links_into_the_folder_target(tmp_path: Path, spool: Spool) -> None:
    routed(tmp_path, spool, folder_targets(tmp_path, "a", link="link = true"), {"1.2.71": 2})
    assert dispatch_once(spool).returncode == 0
    (done,) = spool.items(SUCCESS)
    for delivered in (tmp_path / "a").glob("*/*.dcm"):
        assert delivered.stat().st_ino == (done.path / delivered.name).stat().st_ino


@pytest.mark.parametrize("kind", ["folder", "dicom"])
def test_a_symlink_in_a_job_fails_it_with_the_reason(
    tmp_path: Path, spool: Spool, scp: Any, kind: str
) -> None:
    secret = tmp_path / "root-only.dcm"
    secret.write_bytes(b"SECRET-ROOT-ONLY-CONTENT")
    secret.chmod(0o600)
    server = scp()
    target = (
        folder_targets(tmp_path, "dest")
        if kind == "folder"
        else rules_for(tmp_path, dicom_target("dest", server.port), '"dest"')
    )
    routed(tmp_path, spool, target, {"1.2.72": 3})
    (job,) = spool.items(OUTGOING)
    victim = sorted(job.path.glob("*.dcm"))[1]
    victim.unlink()
    victim.symlink_to(secret)
    assert dispatch_once(spool).returncode == 1
    (failed,) = spool.items(ERROR)
    reason = json.loads((failed.path / "error.json").read_text())["reason"]
    assert reason == f"job file {victim.name}: not a regular file (a symlink), refused"
    assert (failed.path / victim.name).is_symlink()  # kept as it was, for a human to see
    assert server.received == []
    delivered = [p.read_bytes() for p in (tmp_path / "dest").rglob("*") if p.is_file()]
    assert all(b"SECRET" not in data for data in delivered) and delivered == []
