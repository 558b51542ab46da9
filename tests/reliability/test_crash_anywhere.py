"""Crash anywhere: `kill -9` route and dispatch services at random moments while a sender
streams series into `mercli receive`; then prove nothing acknowledged was lost.

Seeded and replayable: the seed is printed (`MERCLI_SOAK_SEED=...`; set it to replay the same
decisions), and MERCLI_SOAK_SECONDS makes the chaos phase as long as asked (`make soak`).
The seed fixes what is sent and when each kill comes; the scheduler still interleaves the
processes differently from run to run, which is the point of a soak.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from mercli.jobs import Progress
from mercli.spool import Spool, Worker, recover
from tests.dicomfiles import dataset_bytes, make_instance
from tests.kit import CT, EXPLICIT
from tests.netkit import Receiver, receiver, storescu, wait_until
from tests.reliability.kit import (
    Service,
    claimed,
    dicom_target,
    drain,
    items,
    mercli,
    soak_seconds,
    soak_seed,
    sop_uids,
    storescp,
    write_rules,
)

WORKERS = 2  # dispatch threads: in-flight jobs per dispatcher, for the duplicate bound
MAX_SERIES = 12  # instances per series at most: one job is one series batch


class Sender(threading.Thread):
    """A modality: sends series with storescu until told to stop; some in two associations,
    so part of a series arrives while the first part is being routed (a follow-up batch)."""

    def __init__(self, port: int, source: Path, rng: random.Random) -> None:
        super().__init__(name="sender", daemon=True)
        self.port, self.source, self.rng = port, source, rng
        self.stopping = threading.Event()
        self.acknowledged: dict[str, Path] = {}  # SOP Instance UID -> source file
        self.failures: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            study = f"1.2.826.0.1.3680043.9.7.{n % 3}"
            series = f"1.2.826.0.1.3680043.9.8.{n}"
            count = self.rng.randint(1, MAX_SERIES)
            files = [
                make_instance(
                    self.source, series=series, study=study, number=i, sop=f"{series}.{i}"
                )
                for i in range(count)
            ]
            cut = self.rng.randint(1, count) if self.rng.random() < 0.3 else count
            for part in (files[:cut], files[cut:]):
                if not part:
                    continue
                result = storescu(self.port, part)
                if result.returncode != 0:
                    self.failures.append(result.stderr[-2000:])
                    return
                self.acknowledged.update((p.stem, p) for p in part)  # stem: the SOP UID
                self.stopping.wait(self.rng.uniform(0.0, 0.6))


def test_kill_9_route_and_dispatch_at_random_moments(tmp_path: Path) -> None:
    seed = soak_seed()
    seconds = soak_seconds(12.0)
    chaos, sending = random.Random(seed), random.Random(seed + 1)
    spool, source, pacs_dir, archive = (tmp_path / n for n in ("spool", "src", "pacs", "archive"))
    source.mkdir()
    with storescp(pacs_dir) as pacs_port:
        rules = write_rules(
            tmp_path / "rules.toml",
            {
                "pacs": dicom_target(
                    pacs_port, retry_delay="0.2s", retry_max_delay="1s", max_attempts=0
                ),
                "archive": {
                    "type": "folder",
                    "path": str(archive),
                    "retry_delay": "0.2s",
                    "max_attempts": 0,
                },
            },
            settle="0.3s",
            series_timeout="3s",
        )
        receiver = Receiver(spool, "--processes", "1").start()
        route = Service(tmp_path / "route.log", "route", "--rules", rules, "--spool", spool)
        dispatch = Service(
            tmp_path / "dispatch.log", "dispatch", "--workers", str(WORKERS), "--spool", spool
        )
        services = [route.start(), dispatch.start()]
        sender = Sender(receiver.port, source, sending)
        sender.start()
        kills: Counter[str] = Counter()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and sender.is_alive():
                victim = chaos.choice(services)
                # a random moment: often mid-startup (during recovery), often mid-work
                sender.stopping.wait(chaos.uniform(0.05, 1.5))
                victim.kill()
                kills[victim.args[0]] += 1
                victim.start()
        finally:
            sender.stopping.set()
            sender.join(timeout=120)
            for service in services:
                service.kill()
            assert receiver.stop() == 0, receiver.output()
        assert not sender.failures, sender.failures
        drain(spool, rules, timeout=max(90.0, seconds))
    acknowledged = sender.acknowledged
    at_pacs, at_archive = sop_uids(pacs_dir), sop_uids(archive)
    duplicates = sum(at_pacs.values()) - len(at_pacs)
    print(
        f"soak: seed={seed} seconds={seconds:g} kills={dict(kills)} "
        f"acknowledged={len(acknowledged)} at_storescp={sum(at_pacs.values())} "
        f"at_folder={sum(at_archive.values())} duplicates={duplicates} "
        f"error={len(items(spool, 'error'))}"
    )
    assert len(acknowledged) > 10 and sum(kills.values()) >= 5

    # Every acknowledged instance is at both targets, bit for bit; nothing is invented.
    assert set(at_pacs) == set(acknowledged), "lost or invented at the DICOM target"
    for path in pacs_dir.iterdir():
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(path) == dataset_bytes(acknowledged[uid]), f"torn: {path.name}"
    assert set(at_archive) == set(acknowledged), "lost or invented at the folder target"
    assert [p for p in archive.iterdir() if p.name.startswith(".")] == [], "half-written job"

    # Duplicates: a dispatcher killed mid-job resends what it had not recorded yet, so at
    # most (its jobs in flight) x (one job's size) per kill; a folder job is never doubled.
    assert duplicates <= kills["dispatch"] * WORKERS * MAX_SERIES
    assert sum(at_archive.values()) == len(at_archive), "a folder job was delivered twice"

    # And the spool is settled: nothing in flight, nothing failed, no debris of the dead.
    for state in ("incoming", "outgoing", "error", "discard"):
        assert items(spool, state) == [], f"{state}/ not empty"
    assert claimed(spool) == [] and list((spool / "leases").iterdir()) == []
    # Killed inside Spool.open or Worker.start, a process leaves a loose write probe or an
    # unborn lease in tmp/; recovery reaps those after a grace period (a day, a minute).
    # Without the grace, everything left in tmp/ must be such debris, and reaped.
    leftovers = [p.name for p in (spool / "tmp").iterdir()]
    assert all(name.startswith(("probe.", "lease.")) for name in leftovers), leftovers
    recover(Spool(spool), tmp_grace=0)
    assert list((spool / "tmp").iterdir()) == []


def test_kill_9_receive_mid_association_then_everything_acknowledged_arrives(
    tmp_path: Path,
) -> None:
    """A modality sends with pynetdicom; receive is SIGKILLed mid-association; the modality
    reconnects to a new receiver and resends what was not acknowledged, as modalities do."""
    rng = random.Random(soak_seed())
    spool, source, archive = tmp_path / "spool", tmp_path / "src", tmp_path / "archive"
    source.mkdir()
    files = [
        make_instance(source, series="1.2.826.0.1.3680043.9.9", number=n, rows=128, columns=128)
        for n in range(80)
    ]
    rules = write_rules(
        tmp_path / "rules.toml", {"archive": {"type": "folder", "path": str(archive)}}
    )
    kill_at = rng.randint(5, 70)
    acknowledged: set[str] = set()
    pending = list(files)
    receiver = Receiver(spool, "--processes", "1").start()
    assert receiver.process is not None
    killed = False
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, EXPLICIT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    while pending:
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="MERCLI")
        assert assoc.is_established
        while pending:
            if len(acknowledged) == kill_at and not killed:
                receiver.process.kill()  # SIGKILL mid-association: no cleanup at all
                killed = True
            try:
                status = assoc.send_c_store(dcmread(pending[0]))
            except RuntimeError:  # the kill was noticed before this send: not established
                break
            if status.get("Status") != 0x0000:
                break  # aborted: no answer, so not acknowledged
            acknowledged.add(str(dcmread(pending[0], stop_before_pixels=True).SOPInstanceUID))
            pending.pop(0)
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
        if pending:  # the receiver is gone: a new one takes over the same spool
            receiver.process.wait(timeout=30)
            receiver.log_file.close()
            receiver = Receiver(spool, "--processes", "1").start()
            assert receiver.process is not None
    assert killed and receiver.stop() == 0
    drain(spool, rules)
    delivered = sop_uids(archive)
    assert set(delivered) == acknowledged == {str(f.stem) for f in files}
    # The one in flight at the kill may have been stored before the answer was lost: it can
    # arrive twice (once per batch), never more, and nothing else twice.
    assert sum(delivered.values()) - len(delivered) <= 1
    assert items(spool, "error") == [] and items(spool, "incoming") == []
    wait_until(lambda: claimed(spool) == [], what="no claims left")


def test_a_job_killed_after_recording_its_delivery_is_finished_without_a_hang(
    tmp_path: Path,
) -> None:
    """The state `kill -9` leaves between dispatch.json "all delivered" and the rename into
    success/ (found by the soak above): the next attempt must settle the job, not open an
    association with nothing to send (which storescp answers with silence until timeout)."""
    spool, source = tmp_path / "spool", tmp_path / "src"
    source.mkdir()
    with storescp(tmp_path / "pacs") as port:
        rules = write_rules(tmp_path / "rules.toml", {"pacs": dicom_target(port, timeout="20s")})
        with receiver(spool, "--processes", "1") as running:
            files = [
                make_instance(source, series="1.2.826.0.1.3680043.9.10", number=n) for n in range(3)
            ]
            assert storescu(running.port, files).returncode == 0
        assert (
            mercli("route", "--once", "--all", "--rules", rules, "--spool", spool).returncode == 0
        )
        (job,) = items(spool, "outgoing")
        with Worker(Spool(spool), "dispatch") as worker:  # what the killed dispatcher recorded
            Progress(attempts=1, delivered=[p.stem for p in job.glob("*.dcm")]).save(worker, job)
        result = mercli("dispatch", "--once", "--spool", spool, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in items(spool, "success")] == [job.name]
    assert sop_uids(tmp_path / "pacs") == Counter(), "nothing is sent twice"
