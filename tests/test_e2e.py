"""End to end: storescu -> `mercli run` -> Orthanc, DCMTK storescp and a folder; all compared."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.dicomfiles import dataset_bytes, make_instance
from tests.netkit import DCMTK_ENV, free_port, port_open, storescu, wait_until
from tests.orthanckit import Orthanc, orthanc
from tests.test_receive import _readable_corpus

STORESCP_FOLDER_AND_RULES = """
[targets.storescp]
type = "dicom"
host = "127.0.0.1"
port = {storescp_port}
called_aet = "STORESCP"
retry_delay = "1s"

[targets.folder]
type = "folder"
path = "{folder}"

[[rules]]
name = "no-scouts"
when = '"LOCALIZER" in ImageType'
action = "discard"

[[rules]]
name = "everything"
targets = ["storescp", "folder"{more_targets}]
"""

RULES = (
    """
[route]
settle = "1s"
series_timeout = "30s"

[targets.orthanc]
type = "dicom"
host = "127.0.0.1"
port = {orthanc_port}
called_aet = "ORTHANC"
retry_delay = "1s"
"""
    + STORESCP_FOLDER_AND_RULES
)

FOLDER_AND_STORESCP = '[route]\nsettle = "1s"\n' + STORESCP_FOLDER_AND_RULES


@contextmanager
def storescp(out: Path) -> Iterator[int]:
    out.mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "+B", "+xa", "-pm", "-uf", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), what="storescp")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def mercli_run(spool: Path, rules: Path, *options: str) -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "-m", "mercli", "run", "--spool", str(spool), "--rules", str(rules)]
    log = (spool.parent / "run.log").open("wb")
    process = subprocess.Popen(
        [*command, "--port", str(port), "--purge-every", "0", *options], stdout=log, stderr=log
    )
    try:
        wait_until(lambda: port_open(port), what="mercli run to listen")
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        log.close()
        assert code == 0, (spool.parent / "run.log").read_text()[-3000:]


def by_uid(folder: Path) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.iterdir()}


def synthetic_study(folder: Path) -> tuple[list[Path], list[Path]]:
    """Four series of eight (CT and MR), and a three-image scout series the rules discard."""
    study = "1.2.826.0.1.3680043.10.1234.1"
    (folder / "study").mkdir()
    (folder / "scouts").mkdir()
    series = [
        make_instance(
            folder / "study",
            series=f"{study}.{s}",
            study=study,
            number=n,
            SeriesNumber=s,
            Modality="CT" if s < 3 else "MR",
        )
        for s in range(1, 5)
        for n in range(8)
    ]
    scouts = [
        make_instance(
            folder / "scouts",
            series=f"{study}.9",
            study=study,
            number=n,
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        )
        for n in range(3)
    ]
    return series, scouts


def test_study_and_corpus_through_mercli_run_to_orthanc_and_storescp(tmp_path: Path) -> None:
    synthetic, scouts = synthetic_study(tmp_path)
    corpus = _readable_corpus()
    spool = tmp_path / "spool"
    with (
        orthanc(tmp_path / "orthanc") as pacs,
        storescp(tmp_path / "storescp") as storescp_port,
    ):
        rules = tmp_path / "rules.toml"
        rules.write_text(
            RULES.format(
                orthanc_port=pacs.dicom_port,
                storescp_port=storescp_port,
                folder=tmp_path / "out",
                more_targets=', "orthanc"',
            )
        )
        with mercli_run(spool, rules) as port:
            assert storescu(port, [*synthetic, *scouts]).returncode == 0
            sent = [path for path in corpus if storescu(port, [path]).returncode == 0]
            expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in synthetic}
            expected |= {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
            wait_until(lambda: len(by_uid(tmp_path / "storescp")) >= len(expected), timeout=120)
            wait_until(lambda: not _pending(spool), timeout=120, what="outgoing to drain")
        assert len(sent) > 30
        at_storescp = by_uid(tmp_path / "storescp")
        assert set(at_storescp) == expected  # everything, nothing invented, no scouts
        for path in synthetic:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(at_storescp[uid]) == dataset_bytes(path)
        in_orthanc = pacs.sop_instance_uids()
        failed = _failed_uids(spool)  # jobs Orthanc would not take, with the reason kept
        assert in_orthanc | failed.get("orthanc", set()) == expected
        assert not failed.get("storescp") and not failed.get("folder")
        for path in synthetic:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes_of(pacs, uid) == dataset_bytes(path)
    discarded = [
        json.loads((item / "job.json").read_text()) for item in (spool / "discard").iterdir()
    ]
    assert len(discarded) == 1 and "no-scouts" in discarded[0]["reason"]
    assert discarded[0]["instances"] == len(scouts)
    folder_uids = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (tmp_path / "out").glob("*/*.dcm")
    }
    assert folder_uids == expected


def test_study_through_mercli_run_with_the_dcmtk_engine(tmp_path: Path) -> None:
    """The same path with storescp + getdcmtags receiving: same routing, same bytes out."""
    synthetic, scouts = synthetic_study(tmp_path)
    spool = tmp_path / "spool"
    with storescp(tmp_path / "storescp") as storescp_port:
        rules = tmp_path / "rules.toml"
        rules.write_text(
            FOLDER_AND_STORESCP.format(
                storescp_port=storescp_port, folder=tmp_path / "out", more_targets=""
            )
        )
        with mercli_run(spool, rules, "--engine", "dcmtk") as port:
            assert storescu(port, [*synthetic, *scouts]).returncode == 0
            wait_until(lambda: len(by_uid(tmp_path / "storescp")) >= len(synthetic), timeout=60)
            wait_until(lambda: not _pending(spool), timeout=60, what="outgoing to drain")
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in synthetic}
    at_storescp = by_uid(tmp_path / "storescp")
    assert set(at_storescp) == set(expected)
    in_folder = {p.stem: p for p in (tmp_path / "out").glob("*/*.dcm")}
    assert len(in_folder) == len(expected)
    for uid, path in expected.items():
        assert dataset_bytes(at_storescp[uid]) == dataset_bytes(path)
    landed = [dcmread(p, stop_before_pixels=True) for p in in_folder.values()]
    assert {str(d.SOPInstanceUID) for d in landed} == set(expected)
    (discarded,) = list((spool / "discard").iterdir())
    assert "no-scouts" in json.loads((discarded / "job.json").read_text())["reason"]
    assert list((spool / "error").iterdir()) == []


def dataset_bytes_of(pacs: Orthanc, uid: str) -> bytes:
    copy = pacs.folder / "fetched.dcm"
    copy.write_bytes(pacs.file_of(uid))
    return dataset_bytes(copy)


def _pending(spool: Path) -> bool:
    """Anything still waiting in incoming/ or outgoing/ (or claimed)."""
    busy = [spool / "incoming", spool / "outgoing"]
    claimed = any(any(owner.iterdir()) for owner in (spool / "claims").iterdir())
    return claimed or any(any(folder.iterdir()) for folder in busy if folder.exists())


def _failed_uids(spool: Path) -> dict[str, set[str]]:
    failed: dict[str, set[str]] = {}
    for item in (spool / "error").iterdir():
        job = item / "job.json"
        if not job.exists():
            continue
        target = json.loads(job.read_text())["target"]["name"]
        for tags in item.glob("*.tags"):
            failed.setdefault(target, set()).add(json.loads(tags.read_text())["SOPInstanceUID"])
    return failed


INVERT = Path(__file__).resolve().parent.parent / "examples" / "modules" / "invert" / "invert.py"

PROCESS_RULES = """
[route]
settle = "0.5s"
series_timeout = "30s"

[targets.storescp]
type = "dicom"
host = "127.0.0.1"
port = {storescp_port}
called_aet = "STORESCP"
retry_delay = "1s"

[modules.invert]
command = [{python}, {invert}]
timeout = "60s"
retry_delay = "1s"
settings = {{ prefix = "E2E-INV ", series_number_offset = 500 }}

[[rules]]
name = "ct-inverted"
when = 'Modality == "CT"'
process = ["invert"]
targets = ["storescp"]

[[rules]]
name = "ct-originals"
when = 'Modality == "CT"'
targets = ["storescp"]
"""


def _pixels(ds: Dataset) -> array[int]:
    values = array("H")
    values.frombytes(bytes(ds.PixelData))
    return values


def test_process_invert_module_through_mercli_run_to_storescp(tmp_path: Path) -> None:
    """storescu -> `mercli run` -> module invert (host command) -> storescp: the derived series
    (new UIDs, prefix from the module's settings, pixels = max - original) and, by a second
    rule, the originals byte for byte."""
    (tmp_path / "series").mkdir()
    study, series = "1.2.826.0.1.3680043.10.1234.7", "1.2.826.0.1.3680043.10.1234.7.1"
    originals = [
        make_instance(
            tmp_path / "series",
            series=series,
            study=study,
            number=n,
            rows=16,
            columns=16,
            SeriesNumber=3,
            SeriesDescription="Chest",
        )
        for n in range(1, 7)
    ]
    spool, received = tmp_path / "spool", tmp_path / "storescp"
    with storescp(received) as storescp_port:
        rules = tmp_path / "rules.toml"
        rules.write_text(
            PROCESS_RULES.format(
                storescp_port=storescp_port,
                python=json.dumps(sys.executable),
                invert=json.dumps(str(INVERT)),
            )
        )
        with mercli_run(spool, rules) as port:
            assert storescu(port, originals).returncode == 0
            wait_until(
                lambda: len(by_uid(received)) >= 2 * len(originals),
                timeout=25,
                what="originals and derived series at storescp",
            )
            wait_until(
                lambda: not _pending(spool) and not any((spool / "processing").iterdir()),
                timeout=10,
                what="processing and outgoing to drain",
            )
    at_storescp = {uid: dcmread(path) for uid, path in by_uid(received).items()}
    sent = {str(dcmread(p).SOPInstanceUID): p for p in originals}
    assert set(sent) <= set(at_storescp) and len(at_storescp) == 2 * len(originals)
    for uid, path in sent.items():  # the originals, unchanged
        assert dataset_bytes(by_uid(received)[uid]) == dataset_bytes(path)
    derived = [ds for uid, ds in at_storescp.items() if uid not in sent]
    assert len({str(ds.SeriesInstanceUID) for ds in derived}) == 1
    assert str(derived[0].SeriesInstanceUID) != series
    assert {str(ds.StudyInstanceUID) for ds in derived} == {study}
    by_number = {int(ds.InstanceNumber): ds for ds in derived}
    assert len(by_number) == len(originals)
    for path in originals:
        original = dcmread(path)
        inverted = by_number[int(original.InstanceNumber)]
        assert inverted.SeriesDescription == "E2E-INV Chest"
        assert int(inverted.SeriesNumber) == 503 and inverted.ImageType[0] == "DERIVED"
        before, after = _pixels(original), _pixels(inverted)
        assert len(after) == len(before) and after != before
        assert list(after) == [max(before) - value for value in before]
    (processed,) = [job for job in (spool / "success").iterdir() if (job / "module.log").exists()]
    assert "invert: 6 instance(s) written" in (processed / "module.log").read_text()
    assert list((spool / "error").iterdir()) == []
