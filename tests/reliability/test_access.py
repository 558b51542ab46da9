"""Access: a refused sender lands nothing in the spool, even one that ignores the rejection
and sends its data anyway; and no patient name or ID reaches a log or the event trail."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from tests.dicomfiles import dataset_bytes, make_instance
from tests.kit import CT, EXPLICIT
from tests.netkit import Receiver, dcmtk, storescu, wait_until
from tests.reliability.kit import Scp, claimed, dicom_target, events, items, mercli, write_rules
from tests.reliability.rawpdu import associate_rq, read_pdu, status_of, store_pdus

ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, ABORT = 0x02, 0x03, 0x04, 0x07


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Receiver]:
    running = Receiver(tmp_path / "spool", "--processes", "1", "--allow-aet", "CT1").start()
    yield running
    assert running.stop() == 0, running.output()


def landed(spool: Path) -> list[str]:
    """Anything a sender could have caused: instances, quarantines, hints, received events."""
    found = [str(p.relative_to(spool)) for p in (spool / "incoming").rglob("*")]
    found += [str(p.relative_to(spool)) for p in (spool / "error").rglob("*")]
    found += [str(p.relative_to(spool)) for p in (spool / "hints").rglob("*")]
    found += [e["event"] for e in events(spool) if e["event"] in ("received", "quarantined")]
    return found


def raw_store(port: int, calling: str, called: str, dataset: bytes, sop: str) -> list[int]:
    """Associate by hand, then send a C-STORE whatever the answer was; the PDU types seen
    (and, for P-DATA, the C-STORE status as 0x10000 + status)."""
    seen: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(associate_rq(calling, called, CT, EXPLICIT))
        answer = read_pdu(sock)
        seen.append(answer[0] if answer else -1)
        try:
            sock.sendall(store_pdus(CT, sop, dataset))
        except (BrokenPipeError, ConnectionResetError):
            return seen
        while (pdu := read_pdu(sock)) is not None:
            seen.append(pdu[0])
            if pdu[0] == P_DATA:
                status = status_of(pdu[1])
                seen.append(0x10000 + (0xFFFF if status is None else status))
                break
    return seen


def test_refused_senders_land_nothing(tmp_path: Path, guarded: Receiver) -> None:
    spool = guarded.spool
    path = make_instance(tmp_path, series="1.2.826.0.1.3680043.9.70")
    sop = path.stem
    intruder = storescu(guarded.port, [path], "-aet", "INTRUDER")
    assert intruder.returncode != 0 and "Calling AE Title Not Recognized" in intruder.stderr
    wrong_called = storescu(guarded.port, [path], "-aet", "CT1", aec="NOT_MERCLI")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    ae = AE(ae_title="PYNET")
    ae.add_requested_context(CT, EXPLICIT)
    assert not ae.associate("127.0.0.1", guarded.port, ae_title="MERCLI").is_established
    # A sender that ignores the rejection and sends its C-STORE anyway.
    rude = raw_store(guarded.port, "INTRUDER", "MERCLI", dataset_bytes(path), sop)
    assert rude[0] == ASSOCIATE_RJ and 0x10000 not in rude, rude
    # And one that does not associate at all: P-DATA out of the blue.
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=15) as sock:
        sock.sendall(store_pdus(CT, sop, dataset_bytes(path)))
        answer = read_pdu(sock)
        assert answer is None or answer[0] == ABORT, answer
    assert (
        dcmtk(
            ["echoscu", "-aet", "INTRUDER", "-aec", "MERCLI", "127.0.0.1", str(guarded.port)]
        ).returncode
        != 0
    )
    assert landed(spool) == []
    # The same hand-made client, allowed in, does store: the refusals above were real ones.
    allowed = raw_store(guarded.port, "CT1", "MERCLI", dataset_bytes(path), sop)
    assert allowed[0] == ASSOCIATE_AC and allowed[-1] == 0x10000, allowed
    wait_until(lambda: len(list((spool / "incoming").glob("*/*.tags"))) == 1, what="published")
    (stored,) = (spool / "incoming").glob("*/*.dcm")
    assert dataset_bytes(stored) == dataset_bytes(path)


NAME, PATIENT_ID = "Quoxlyquist^Wendeline", "PID-77310-SECRET"
OTHER_NAME = "Zebulonicus^Orvanna"
SECRETS = (NAME, "Quoxlyquist", "Wendeline", PATIENT_ID, "Zebulonicus", "Orvanna")


def test_no_patient_names_or_ids_in_logs_or_events(tmp_path: Path) -> None:
    """receive, route and dispatch at their default verbosity, through good and bad paths:
    a quarantined instance, a rule that fails on PatientName, a target answering failures."""
    spool, source = tmp_path / "spool", tmp_path / "src"
    source.mkdir()
    patient: dict[str, Any] = {
        "PatientName": NAME,
        "PatientID": PATIENT_ID,
        "StudyDescription": "Chest",
    }
    files = [
        make_instance(source, series="1.2.826.0.1.3680043.9.71", number=n, **patient)
        for n in range(3)
    ]
    # one more instance of that series under another name: the rules see it differ (a split)
    other = {**patient, "PatientName": OTHER_NAME}
    files.append(make_instance(source, series="1.2.826.0.1.3680043.9.71", number=9, **other))
    orphan = make_instance(source, **patient)
    failing = Scp(lambda ds: 0xA700)
    try:
        targets = {
            "archive": {"type": "folder", "path": str(tmp_path / "archive")},
            "pacs": dicom_target(failing.port, retry_delay="0s", max_attempts=2),
        }
        rules = write_rules(
            tmp_path / "rules.toml",
            targets,
            rules=(
                "[[rules]]\nname = \"numeric-name\"\nwhen = 'float(PatientName) > 1'\n"
                'targets = ["archive"]\n'
                f'[[rules]]\nname = "by-id"\nwhen = \'PatientID == "{PATIENT_ID}"\'\n'
                'targets = ["archive", "pacs"]\n'
                '[[rules]]\nname = "zeb"\nwhen = \'PatientName.startswith("Zeb")\'\n'
                'targets = ["archive"]\n'
            ),
        )
        running = Receiver(spool, "--processes", "1").start()
        try:
            assert storescu(running.port, files).returncode == 0
            assert storescu(running.port, [orphan], "-aet", "WRONG", aec="NOBODY").returncode
            ds = dcmread(orphan)
            del ds.SeriesInstanceUID
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CT, EXPLICIT)
            assoc = ae.associate("127.0.0.1", running.port, ae_title="MERCLI")
            assert assoc.send_c_store(ds).Status == 0xC212
            assoc.release()
        finally:
            assert running.stop() == 0
        outputs = {"receive": running.output()}
        route = mercli("route", "--once", "--all", "--rules", rules, "--spool", spool)
        assert route.returncode == 0, route.stderr
        assert "numeric-name" in route.stderr  # the rule's failure was logged...
        assert "disagree on PatientName" in route.stderr  # ...and the split
        outputs["route"] = route.stdout + route.stderr
        for n in range(2):
            dispatch = mercli("dispatch", "--once", "--spool", spool)
            outputs[f"dispatch {n}"] = dispatch.stdout + dispatch.stderr
        assert "0xA700" in outputs["dispatch 0"]  # ...and the target's failures
        status = mercli("status", "--spool", spool)
        outputs["status"] = status.stdout + status.stderr
        outputs["status --json"] = mercli("status", "--json", "--spool", spool).stdout
    finally:
        failing.close()
    assert len(items(spool, "error")) == 3 and len(items(spool, "success")) == 2
    assert claimed(spool) == []
    outputs["events"] = "\n".join(p.read_text() for p in (spool / "events").glob("*.ndjson"))
    for where, text in outputs.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} appears in {where}"
