"""`mercli receive` against real senders on loopback: DCMTK and pynetdicom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from mercli.names import safe_name
from mercli.spool import Spool, recover
from tests.dicomfiles import CORPUS, dataset_bytes, make_instance
from tests.kit import CT
from tests.netkit import Receiver, dcmtk, free_port, port_open, receiver, storescu, wait_until


def stored(spool: Path) -> dict[str, Path]:
    """SOP Instance UID (raw, from the sidecar) -> stored .dcm, for everything in incoming/."""
    found = {}
    for tags in (spool / "incoming").glob("*/*.tags"):
        sidecar = json.loads(tags.read_text())
        found[sidecar["SOPInstanceUID"]] = tags.with_suffix(".dcm")
    return found


def published(spool: Path, uid: str, *, or_quarantined_after: int | None = None) -> Path | None:
    """The stored .dcm of `uid` once receive has published it: acknowledged instances are
    durable in the journal at once and in incoming/ a moment later (mercli.spool.journal).
    With `or_quarantined_after` (the count of error/ items before sending): None as soon as
    one more item is in error/ (a quarantined instance is answered with a failure, but DCMTK's
    tools exit 0 on it)."""
    found: list[Path] = []

    def done() -> bool:
        path = stored(spool).get(uid)
        if path is not None:
            found.append(path)
            return True
        return or_quarantined_after is not None and errors(spool) > or_quarantined_after

    wait_until(done, timeout=15, what=f"instance {uid} in incoming/")
    return found[0] if found else None


def taken(stored: Path) -> None:
    """Remove a stored instance and its sidecar, as route would take them away."""
    stored.unlink()
    stored.with_suffix(".tags").unlink()


def errors(spool: Path) -> int:
    folder = spool / "error"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def associate(
    port: int, contexts: list[tuple[str, str]], calling: str = "PYSCU", called: str = "MERCLI"
) -> object:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_echo(tmp_path: Path) -> None:
    with receiver(tmp_path / "spool", "--processes", "1") as running:
        result = dcmtk(["echoscu", "-aec", "MERCLI", "127.0.0.1", str(running.port)])
        assert result.returncode == 0, result.stderr


def test_storescu_series_land_grouped_with_sidecars(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    study = "1.2.826.0.1.3680043.2.1"
    series = ["1.2.826.0.1.3680043.2.1.1", "1.2.826.0.1.3680043.2.1.2"]
    files = [
        make_instance(source, series=series[n % 2], study=study, number=n, StudyDescription="Chest")
        for n in range(10)
    ]
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        result = storescu(running.port, files)
        assert result.returncode == 0, result.stderr
        hints = spool / "hints"
        wait_until(lambda: sorted(p.name for p in hints.iterdir()) == sorted(series), what="hints")
    for uid in series:
        group = spool / "incoming" / uid
        assert len(list(group.glob("*.dcm"))) == 5 and len(list(group.glob("*.tags"))) == 5
        hint = Spool(spool).read_hint(uid)
        assert hint is not None and hint["ended"] == "released" and hint["instances"] == 10
    for path in files:
        source_ds = dcmread(path)
        target = (
            spool / "incoming" / source_ds.SeriesInstanceUID / f"{source_ds.SOPInstanceUID}.dcm"
        )
        assert dataset_bytes(target) == dataset_bytes(path)
        sidecar = json.loads(target.with_suffix(".tags").read_text())
        assert sidecar["SenderAET"] == "STORESCU" and sidecar["ReceiverAET"] == "MERCLI"
        assert sidecar["SenderAddress"] == "127.0.0.1"
        assert datetime.fromisoformat(sidecar["ReceivedAt"]).tzinfo is not None
        assert sidecar["StudyDescription"] == "Chest"
        assert sidecar["InstanceNumber"] == source_ds.InstanceNumber
        meta = dcmread(target).file_meta
        assert meta.MediaStorageSOPInstanceUID == source_ds.SOPInstanceUID
    events = [
        json.loads(line)
        for f in (spool / "events").glob("*.ndjson")
        for line in f.read_text().splitlines()
    ]
    assert sum(e["event"] == "received" for e in events) == 10
    assert not any("Test^Patient" in json.dumps(e) or "P001" in json.dumps(e) for e in events)
    assert "Test^Patient" not in running.output() and "P001" not in running.output()


def _readable_corpus() -> list[Path]:
    usable = []
    for path in CORPUS:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, Exception):
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta or "SOPInstanceUID" not in ds:
            continue
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        usable.append(path)
    return usable


def test_pydicom_corpus_is_stored_byte_for_byte(tmp_path: Path, chunked_send: None) -> None:
    """Every corpus file, in its own transfer syntax, sent raw by pynetdicom: identical bytes."""
    files = _readable_corpus()
    assert len(files) > 50
    spool = tmp_path / "spool"
    compared = 0
    with receiver(spool, "--processes", "1") as running:
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            assoc = associate(running.port, [(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)])
            assert assoc.is_established, path  # type: ignore[attr-defined]
            status = assoc.send_c_store(path)  # type: ignore[attr-defined]
            assoc.release()  # type: ignore[attr-defined]
            assert status.Status == 0x0000, (path.name, hex(status.Status))
            target = published(spool, ds.SOPInstanceUID)
            assert target is not None
            assert dataset_bytes(target) == dataset_bytes(path), path.name
            assert (
                dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID
                == ds.file_meta.TransferSyntaxUID
            )
            taken(target)  # corpus files share UIDs: the next one must not find this copy
            compared += 1
    assert compared == len(files)


@pytest.mark.parametrize("tool", ["storescu", "dcmsend"])
def test_dcmtk_corpus_matches_dcmtks_bit_preserving_storescp(tmp_path: Path, tool: str) -> None:
    """What DCMTK sends of each corpus file, mercli stores exactly as DCMTK's own storescp +B.

    DCMTK re-encodes a file when it sends it (storescu may also convert it to a transfer
    syntax it proposes; both refuse some files), so the oracle is DCMTK's storescp in
    bit-preserving mode receiving the very same transmission.
    """
    send = ["storescu"] if tool == "storescu" else ["dcmsend", "-dn"]
    spool = tmp_path / "spool"
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    oracle_port = free_port()
    oracle = subprocess.Popen(
        ["storescp", "+B", "-od", str(oracle_dir), "-uf", "+xa", str(oracle_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    compared = 0
    try:
        wait_until(lambda: port_open(oracle_port), what="storescp")
        with receiver(spool, "--processes", "1") as running:
            for path in CORPUS:
                before = errors(spool)
                sent = dcmtk([*send, "-aec", "MERCLI", "127.0.0.1", str(running.port), str(path)])
                if sent.returncode != 0:
                    continue  # DCMTK cannot send this file at all
                for old in oracle_dir.iterdir():
                    old.unlink()
                reference = dcmtk([*send, "-aec", "ANY", "127.0.0.1", str(oracle_port), str(path)])
                assert reference.returncode == 0, reference.stderr
                (oracle_file,) = oracle_dir.iterdir()
                uid = dcmread(oracle_file, stop_before_pixels=True).SOPInstanceUID
                ours = published(spool, str(uid), or_quarantined_after=before)
                if ours is None:
                    assert list((spool / "error").iterdir()), (
                        f"{path.name} neither stored nor quarantined"
                    )
                    continue
                assert dataset_bytes(ours) == dataset_bytes(oracle_file), path.name
                taken(ours)
                compared += 1
    finally:
        oracle.terminate()
        oracle.wait(timeout=30)
    assert compared > (50 if tool == "dcmsend" else 30)


def test_concurrent_associations(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    batches = [
        [make_instance(source, series=f"1.2.3.{s}", number=n) for n in range(20)] for s in range(4)
    ]
    spool = tmp_path / "spool"
    statuses: list[int] = []
    with receiver(spool, "--processes", "1") as running:

        def send(files: list[Path]) -> None:
            assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
            for path in files:
                statuses.append(assoc.send_c_store(dcmread(path)).Status)  # type: ignore[attr-defined]
            assoc.release()  # type: ignore[attr-defined]

        senders = [threading.Thread(target=send, args=(files,)) for files in batches]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
    assert statuses == [0] * 80
    for s in range(4):
        assert len(list((spool / "incoming" / f"1.2.3.{s}").glob("*.dcm"))) == 20


def test_several_processes_share_the_port(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    files = [make_instance(source, series=f"1.2.4.{n % 4}", number=n) for n in range(40)]
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "2") as running:
        wait_until(lambda: len(list((spool / "leases").iterdir())) == 2, what="two listeners")
        senders = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aec",
                    "MERCLI",
                    "127.0.0.1",
                    str(running.port),
                    *map(str, files[n::4]),
                ],
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            for n in range(4)
        ]
        assert [sender.wait(timeout=120) for sender in senders] == [0, 0, 0, 0]
    assert len(stored(spool)) == 40
    assert list((spool / "leases").iterdir()) == []  # clean shutdown of both listeners


def test_unknown_calling_ae_is_rejected(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source)
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1", "--allow-aet", "CT1", "--allow-aet", "MR2") as running:
        rejected = storescu(running.port, [path], "-aet", "INTRUDER")
        assert rejected.returncode != 0
        assert "Association Rejected" in rejected.stderr
        assert "Calling AE Title Not Recognized" in rejected.stderr
        accepted = storescu(running.port, [path], "-aet", "CT1")
        assert accepted.returncode == 0, accepted.stderr
    assert len(stored(spool)) == 1


def test_called_ae_must_match_unless_any_is_allowed(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source)
    with receiver(tmp_path / "strict", "--processes", "1") as running:
        wrong = storescu(running.port, [path], aec="SOMEONE_ELSE")
        assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
    with receiver(tmp_path / "lenient", "--processes", "1", "--any-called-aet") as running:
        assert storescu(running.port, [path], aec="AI_ROUTE").returncode == 0
    (target,) = stored(tmp_path / "lenient").values()
    assert json.loads(target.with_suffix(".tags").read_text())["ReceiverAET"] == "AI_ROUTE"


@pytest.mark.parametrize(
    "hostile",
    ["../../../../tmp/escape", "1.2/../../3", "1.2.3\x00../x", "9" * 200, "..", "/etc/passwd"],
)
def test_hostile_uids_never_escape_the_spool(
    tmp_path: Path, hostile: str, chunked_send: None
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    sop = hostile + ".1"
    path = make_instance(source, series=hostile, sop=sop, study=hostile, filename="h.dcm")
    # Hostile in the data set only: a command carrying such a UID is refused with 0xC213
    # (tests/reliability/test_hostile_load.py); pynetdicom takes the command's from file meta.
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.save_as(path)
    spool = tmp_path / "spool"
    before = set(tmp_path.parent.rglob("*escape*"))
    with receiver(spool, "--processes", "1") as running:
        assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
        assert assoc.send_c_store(path).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    (target,) = stored(spool).values()
    assert target.parent == spool / "incoming" / safe_name(hostile.rstrip("\x00"))
    assert target.parent.name.startswith("x") and target.parent.parent == spool / "incoming"
    sidecar = json.loads(target.with_suffix(".tags").read_text())
    assert sidecar["SeriesInstanceUID"] == dcmread(path).SeriesInstanceUID  # the raw value
    assert set(tmp_path.parent.rglob("*escape*")) == before
    assert not Path("/tmp/escape").exists()


def test_instance_without_uids_is_quarantined(tmp_path: Path, chunked_send: None) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source)
    ds = dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(path)
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
        assert assoc.send_c_store(path).Status == 0xC212  # type: ignore[attr-defined]
        good = make_instance(source)
        assert assoc.send_c_store(good).Status == 0x0000  # the association goes on  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    (item,) = (spool / "error").iterdir()
    record = json.loads((item / "error.json").read_text())
    assert record["reason"] == "missing SeriesInstanceUID" and record["status"] == "0xC212"
    assert dataset_bytes(item / "instance.dcm") == dataset_bytes(path)
    assert len(stored(spool)) == 1


def test_garbage_dataset_is_quarantined(tmp_path: Path, chunked_send: None) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source)
    data = path.read_bytes()
    header = len(data) - len(dataset_bytes(path))
    (source / "garbage.dcm").write_bytes(data[:header] + b"\xff\xfe\x00\x01" * 3000)
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
        status = assoc.send_c_store(source / "garbage.dcm")  # type: ignore[attr-defined]
        assert status.Status in (0xC210, 0xC212)
        assert assoc.send_c_store(path).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    (item,) = (spool / "error").iterdir()
    assert (item / "instance.dcm").read_bytes().endswith(b"\xff\xfe\x00\x01" * 3000)


def test_full_disk_answers_a700_and_keeps_serving(tmp_path: Path) -> None:
    """A real full filesystem: the spool on a 3 MB tmpfs in a private mount namespace."""
    mount = tmp_path / "small"
    mount.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    files = [
        make_instance(source, series="1.2.5", number=n, rows=256, columns=256) for n in range(40)
    ]
    port = free_port()
    script = (
        f"mount -t tmpfs -o size=3m tmpfs {mount} && "
        f"exec {sys.executable} -m mercli receive --processes 1 --host 127.0.0.1 "
        f"--port {port} --spool {mount}/spool"
    )
    process = subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", script], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: port_open(port), what="receiver in namespace")
        spool = Path(f"/proc/{process.pid}/root") / str(mount).lstrip("/") / "spool"
        assoc = associate(port, [(CT, "1.2.840.10008.1.2.1"), (Verification, "1.2.840.10008.1.2")])
        statuses = [assoc.send_c_store(dcmread(path)).Status for path in files]  # type: ignore[attr-defined]
        assert 0xA700 in statuses, [hex(s) for s in statuses]
        assert assoc.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        acknowledged = [path for path, status in zip(files, statuses, strict=True) if status == 0]
        group = spool / "incoming" / "1.2.5"
        names = sorted(p.name for p in acknowledged)
        wait_until(lambda: sorted(p.name for p in group.glob("*.dcm")) == names, timeout=15)
        for path in acknowledged:
            assert dataset_bytes(group / path.name) == dataset_bytes(path)
            assert (group / path.name).with_suffix(".tags").stat().st_size > 0
        # nothing half-written: only empty files the receiver creates ahead of need
        assert [p for p in (spool / "tmp").rglob("*") if p.is_file() and p.stat().st_size] == []
        # Space comes back: the same listener stores again.
        for path in acknowledged[:3]:
            (group / path.name).unlink()
        assoc = associate(port, [(CT, "1.2.840.10008.1.2.1")])
        assert assoc.send_c_store(dcmread(files[-1])).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""


def test_sigterm_finishes_the_open_association(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    files = [make_instance(source, series="1.2.6", number=n) for n in range(6)]
    spool = tmp_path / "spool"
    running = Receiver(spool, "--processes", "1").start()
    assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
    for path in files[:3]:
        assert assoc.send_c_store(dcmread(path)).Status == 0  # type: ignore[attr-defined]
    assert running.process is not None
    running.process.terminate()
    wait_until(lambda: not port_open(running.port), what="listener to stop accepting")
    for path in files[3:]:
        assert assoc.send_c_store(dcmread(path)).Status == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert running.stop() == 0
    assert len(stored(spool)) == 6


def test_port_in_use_exits_3(tmp_path: Path) -> None:
    with receiver(tmp_path / "a", "--processes", "1") as running:
        import socket

        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "mercli",
                "receive",
                "--processes",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--spool",
                str(tmp_path / "b"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        blocker.close()
        assert result.returncode == 3, result.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
        assert running.process is not None and running.process.poll() is None


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_huge_instance_streams_with_flat_memory(tmp_path: Path) -> None:
    """A 512 MB multi-frame instance: stored whole, while the receiver's memory stays flat."""
    from benchmarks.datasets import huge_instance

    huge = huge_instance(tmp_path, 512 << 20).files[0]
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        assert running.process is not None
        baseline = _peak_rss_mb(running.process.pid)
        result = storescu(running.port, [huge])
        assert result.returncode == 0, result.stderr
        peak = _peak_rss_mb(running.process.pid)
    (target,) = stored(spool).values()
    assert target.stat().st_size > 512 << 20
    assert dataset_bytes(target) == dataset_bytes(huge)
    assert peak - baseline < 64, f"receiving 512 MB grew the receiver by {peak - baseline:.0f} MB"


def test_duplicate_instance_replaces_the_earlier_copy(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    first = make_instance(source, series="1.2.7", sop="1.2.7.1", StudyDescription="first")
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        assert storescu(running.port, [first]).returncode == 0
        second = make_instance(
            source, series="1.2.7", sop="1.2.7.1", filename="again.dcm", StudyDescription="second"
        )
        assert storescu(running.port, [second]).returncode == 0
    group = spool / "incoming" / "1.2.7"
    assert sorted(p.name for p in group.iterdir()) == ["1.2.7.1.dcm", "1.2.7.1.tags"]
    assert json.loads((group / "1.2.7.1.tags").read_text())["StudyDescription"] == "second"
    assert dataset_bytes(group / "1.2.7.1.dcm") == dataset_bytes(second)
    events = [
        json.loads(line)
        for f in (spool / "events").glob("*.ndjson")
        for line in f.read_text().splitlines()
    ]
    assert [e["replaced"] for e in events if e["event"] == "received"] == [False, True]


def test_private_sop_class_is_accepted(tmp_path: Path, chunked_send: None) -> None:
    source = tmp_path / "source"
    source.mkdir()
    private = "1.3.6.1.4.1.99999.1.1"  # no standard knows it
    path = make_instance(source, series="1.2.8", SOPClassUID=private)
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = private
    ds.save_as(path)
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        assoc = associate(running.port, [(private, "1.2.840.10008.1.2.1")])
        assert assoc.is_established  # type: ignore[attr-defined]
        assert assoc.send_c_store(path).Status == 0x0000  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    (target,) = stored(spool).values()
    assert json.loads(target.with_suffix(".tags").read_text())["SOPClassUID"] == private
    assert dataset_bytes(target) == dataset_bytes(path)


def test_a_broken_peer_does_not_disturb_others(tmp_path: Path) -> None:
    """Garbage, a truncated PDU and an abrupt close, while storescu sends a series."""
    import socket

    source = tmp_path / "source"
    source.mkdir()
    files = [make_instance(source, series="1.2.9", number=n) for n in range(30)]
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1") as running:
        sender = subprocess.Popen(
            ["storescu", "-aec", "MERCLI", "127.0.0.1", str(running.port), *map(str, files)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for junk in (
            b"\x00" * 64,
            b"\x01\x00\xff\xff\xff\xff",
            b"\x04\x00\x00\x00\x00\x10abc",
            b"GET / HTTP/1.0\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", running.port)) as bad:
                bad.sendall(junk)
                bad.shutdown(socket.SHUT_WR)
                bad.settimeout(10)
                while bad.recv(4096):
                    pass  # the receiver answers (A-ABORT) or closes; it never hangs
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
        assert dcmtk(["echoscu", "-aec", "MERCLI", "127.0.0.1", str(running.port)]).returncode == 0
    assert len(stored(spool)) == 30


def test_max_associations_rejects_transiently(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source)
    with receiver(tmp_path / "spool", "--processes", "1", "--max-associations", "1") as running:
        holder = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
        assert holder.is_established  # type: ignore[attr-defined]
        busy = storescu(running.port, [path])
        assert busy.returncode != 0 and "Local Limit Exceeded" in busy.stderr
        holder.release()  # type: ignore[attr-defined]
        wait_until(lambda: storescu(running.port, [path]).returncode == 0, what="a free slot")


def test_extra_tags_reach_the_sidecar_and_bad_ones_exit_2(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    path = make_instance(source, PatientWeight="72.5", ProtocolName="Thorax")
    spool = tmp_path / "spool"
    with receiver(spool, "--processes", "1", "--extra-tag", "PatientWeight") as running:
        assert storescu(running.port, [path]).returncode == 0
    (target,) = stored(spool).values()
    sidecar = json.loads(target.with_suffix(".tags").read_text())
    assert sidecar["PatientWeight"] == 72.5 and sidecar["ProtocolName"] == "Thorax"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mercli",
            "receive",
            "--extra-tag",
            "NoSuchTag",
            "--spool",
            str(spool),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown tag 'NoSuchTag'" in bad.stderr


@pytest.mark.parametrize("side", [128, 512])  # 32 KB in the journal; 512 KB: files of their own
def test_kill_9_mid_association_keeps_every_acknowledged_instance(
    tmp_path: Path, side: int
) -> None:
    """Durable receipt: SIGKILL while a sender streams; all it saw acknowledged is whole."""
    source = tmp_path / "source"
    source.mkdir()
    files = [
        make_instance(source, series="1.2.10", number=n, rows=side, columns=side)
        for n in range(200 if side == 128 else 100)
    ]
    spool = tmp_path / "spool"
    running = Receiver(spool, "--processes", "1").start()
    assert running.process is not None
    assoc = associate(running.port, [(CT, "1.2.840.10008.1.2.1")])
    acknowledged: list[Path] = []
    for n, path in enumerate(files):
        if n == (60 if side == 128 else 30):
            running.process.kill()  # SIGKILL: no cleanup, mid-association
        status = assoc.send_c_store(dcmread(path))  # type: ignore[attr-defined]
        if status.get("Status") != 0x0000:
            break
        acknowledged.append(path)
    assoc.abort()  # type: ignore[attr-defined]
    try:  # a SIGKILLed process ends once its threads leave the kernel: a slow disk holds them
        running.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"receive outlived SIGKILL by 120 s: {kernel_state(running.process.pid)}")
    running.log_file.close()
    assert len(acknowledged) >= (60 if side == 128 else 30)
    # What it acknowledged is in its journal, if not yet in incoming/: recovery publishes it.
    report = recover(Spool(spool))
    assert report.owners and not list((spool / "journal").glob("receive.*"))
    group = spool / "incoming" / "1.2.10"
    for path in acknowledged:
        assert dataset_bytes(group / path.name) == dataset_bytes(path)
        assert (
            json.loads((group / path.name).with_suffix(".tags").read_text())["InstanceNumber"] >= 0
        )
    # The next receiver recovers the dead one's lease and scratch, and serves again.
    with receiver(spool, "--processes", "1") as again:
        assert storescu(again.port, files[-1:]).returncode == 0
        wait_until(lambda: len(list((spool / "leases").iterdir())) == 1, what="dead lease reaped")
        (live,) = (spool / "leases").iterdir()
        assert [p.name for p in (spool / "tmp").iterdir()] == [live.name]  # dead scratch reaped


def kernel_state(pid: int) -> str:
    """Each thread's state and kernel wait channel (what a process that will not die is in)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = (task / "wchan").read_text() if (task / "wchan").exists() else "?"
        found.append(f"{task.name}:{stat}:{wchan}")
    return " ".join(found)
