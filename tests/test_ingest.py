"""`mercli ingest`: files, zips and DICOMDIRs land as receive would; hostile input is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pydicom
from click.testing import CliRunner

from mercli.cli import cli
from mercli.names import safe_name
from mercli.tags import UnreadableDicom, read_tags
from tests.dicomfiles import CORPUS, PYDICOM_DATA, dataset_bytes, make_instance
from tests.netkit import receiver, storescu

RECEIVE_METADATA = ("SenderAddress", "ReceivedAt")
IMPLICIT, BIG, DEFLATE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def sidecars(spool: Path) -> dict[str, dict[str, object]]:
    """incoming/<series>/<name>.tags, receive metadata left out."""
    found = {}
    for tags in (spool / "incoming").glob("*/*.tags"):
        sidecar = json.loads(tags.read_text())
        for key in RECEIVE_METADATA:
            sidecar.pop(key)
        found[f"{tags.parent.name}/{tags.stem}"] = sidecar
    return found


def _syntax_option(path: Path) -> list[str]:
    """storescu options that send a file in its own encoding (DCMTK converts otherwise;
    ingest never does)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return []
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None:
        return {IMPLICIT: ["-xi"], BIG: ["-xb"], DEFLATE: ["-xd"]}.get(str(syntax), [])
    implicit, little = ds.original_encoding  # a bare data set: ingest keeps its encoding
    return ["-xi"] if implicit else [] if little else ["-xb"]


def _dataset_of(path: Path) -> bytes:
    """A source file's data set: after the file meta of a Part 10 file, a bare one whole."""
    data = path.read_bytes()
    return dataset_bytes(path) if data[128:132] == b"DICM" else data


def _last_source_per_instance(paths: list[str]) -> dict[str, Path]:
    """series/instance -> the file that published it last (in ingest's order)."""
    found = {}
    for path in map(Path, paths):
        try:
            tags = read_tags(path)
        except UnreadableDicom:
            continue
        series, sop = tags.get("SeriesInstanceUID"), tags.get("SOPInstanceUID")
        if series and sop:
            found[f"{safe_name(str(series))}/{safe_name(str(sop))}"] = path
    return found


def test_corpus_folder_lands_as_storescu_would_send_it(tmp_path: Path) -> None:
    sent = tmp_path / "sent"
    sendable = []
    with receiver(sent, "--processes", "1") as running:
        for path in CORPUS:
            done = storescu(running.port, [path], "-aet", "INGEST", *_syntax_option(path))
            if done.returncode == 0 and "E: " not in done.stdout + done.stderr:
                sendable.append(str(path))
    # the files storescu can send, in the same order: the same spool
    code, out, err = run("ingest", "--spool", str(tmp_path / "ingested"), *sendable)
    ours, theirs = sidecars(tmp_path / "ingested"), sidecars(sent)
    assert len(theirs) > 20  # corpus files share UIDs
    for name in sorted(set(ours) | set(theirs)):
        assert ours.get(name) == theirs.get(name), (name, _diff(ours.get(name), theirs.get(name)))
    sources = _last_source_per_instance(sendable)
    for name in ours:
        # the data set is the file's, byte for byte (storescu re-encodes some files: DCMTK
        # writes what it parsed, and deflates anew)
        ingested = tmp_path / "ingested" / "incoming" / f"{name}.dcm"
        assert dataset_bytes(ingested) == _dataset_of(sources[name]), name
    # the whole corpus: junk skipped and counted, unreadable files quarantined, not fatal
    folders = [str(PYDICOM_DATA / "charset_files"), str(PYDICOM_DATA / "test_files")]
    code, out, err = run("ingest", "--spool", str(tmp_path / "ingested"), *folders)
    assert code == 1, err
    assert "not DICOM (skipped)" in err and "quarantined in error/" in err
    ours = sidecars(tmp_path / "ingested")
    assert set(out.split()) == {name.split("/")[0] for name in ours}
    assert all(s["SenderAET"] == "INGEST" for s in ours.values())
    tags = next((tmp_path / "ingested" / "incoming").glob("*/*.tags"))
    assert json.loads(tags.read_text())["SenderAddress"] == "file"
    assert list((tmp_path / "ingested" / "hints").iterdir())  # route settles after the ingest


def test_zip_and_folder_give_the_same_spool_and_junk_is_counted(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for index in range(5):
        make_instance(source, number=index + 1, series="1.2.3.4", filename=f"im{index}.dcm")
    (source / "README.txt").write_text("not DICOM\n")
    (source / "notes.json").write_text("{}")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(source.iterdir()):
            out.write(path, path.name)
        out.writestr("../../../../tmp/escape.dcm", (source / "im0.dcm").read_bytes())
        out.writestr("/abs/im0.dcm", (source / "im1.dcm").read_bytes())
    code, out_folder, err = run("ingest", "--spool", str(tmp_path / "a"), str(source))
    assert code == 0, err
    assert "2 not DICOM (skipped)" in err
    code, out_zip, err = run("ingest", "--spool", str(tmp_path / "b"), str(archive))
    assert code == 0, err
    assert out_folder == out_zip == "1.2.3.4\n"
    assert sidecars(tmp_path / "a") == sidecars(tmp_path / "b")
    assert not Path("/tmp/escape.dcm").exists() and not Path("/abs").exists()
    assert len(list((tmp_path / "b" / "incoming" / "1.2.3.4").glob("*.dcm"))) == 5


def test_dicomdir_made_by_dcmmkdir(tmp_path: Path) -> None:
    assert shutil.which("dcmmkdir"), "dcmmkdir (DCMTK) missing: `make setup` installs dcmtk"
    cd = tmp_path / "CD"
    (cd / "IMAGES").mkdir(parents=True)
    for index in range(3):
        make_instance(cd / "IMAGES", filename=f"IM{index:04d}", number=index + 1)
    made = subprocess.run(
        ["dcmmkdir", "+r", "+I", "IMAGES"], cwd=cd, capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, made.stderr
    code, _out, err = run("ingest", "--spool", str(tmp_path / "spool"), str(cd / "DICOMDIR"))
    assert code == 0, err
    assert len(sidecars(tmp_path / "spool")) == 3
    # the same CD walked as a folder: each file once, the DICOMDIR itself never published
    code, _, err = run("ingest", "-r", "--spool", str(tmp_path / "walked"), str(cd))
    assert code == 0 and "3 instance(s)" in err, err
    assert sidecars(tmp_path / "walked") == sidecars(tmp_path / "spool")


def test_dicomdir_reference_outside_its_folder_is_refused(tmp_path: Path) -> None:
    cd = tmp_path / "cd"
    cd.mkdir()
    inside = make_instance(cd, filename="IM1")
    outside = make_instance(tmp_path, filename="SECRET")
    ds = pydicom.Dataset()
    records = []
    for parts in (["IM1"], ["..", "SECRET"], ["..", "..", "etc", "passwd"]):
        record = pydicom.Dataset()
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = parts
        records.append(record)
    (cd / "LINK").symlink_to(outside)
    record = pydicom.Dataset()
    record.ReferencedFileID = ["LINK"]
    records.append(record)
    ds.DirectoryRecordSequence = records
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.save_as(cd / "DICOMDIR", enforce_file_format=True)
    code, out, _err = run(
        "ingest", "--json", "--spool", str(tmp_path / "spool"), str(cd / "DICOMDIR")
    )
    assert code == 1
    failed = json.loads(out)["failed"]
    assert len(failed) == 3 and all("refused" in f for f in failed), failed
    stored = sidecars(tmp_path / "spool")
    assert len(stored) == 1
    (sidecar,) = stored.values()
    assert sidecar["SOPInstanceUID"] == pydicom.dcmread(inside).SOPInstanceUID


def test_symlinks_in_folders_are_not_followed(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_instance(source, filename="a.dcm")
    elsewhere = make_instance(tmp_path, filename="elsewhere.dcm")
    (source / "link.dcm").symlink_to(elsewhere)
    code, _, err = run("ingest", "--spool", str(tmp_path / "spool"), str(source))
    assert code == 0 and "1 symlink(s)/special file(s) not followed" in err, err
    assert len(sidecars(tmp_path / "spool")) == 1
    code, _, err = run("ingest", "--spool", str(tmp_path / "spool2"), str(source / "link.dcm"))
    assert code == 0 and len(sidecars(tmp_path / "spool2")) == 1  # named: followed


def test_zip_bombs_and_size_limits_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("zeros.dcm", b"\0" * (50 << 20))  # ~1000:1
        out.writestr("ok.dcm", make_instance(tmp_path, filename="ok.dcm").read_bytes())
    code, out, err = run("ingest", "--json", "--spool", str(tmp_path / "spool"), str(archive))
    (failed,) = json.loads(out)["failed"]
    assert code == 1 and "compression ratio" in failed, err
    assert len(sidecars(tmp_path / "spool")) == 1
    big = make_instance(tmp_path, rows=256, columns=256, filename="big.dcm")
    code, out, _ = run(
        "ingest", "--json", "--max-size", "64K", "--spool", str(tmp_path / "s2"), str(big)
    )
    assert code == 1 and "--max-size" in json.loads(out)["failed"][0]
    assert sidecars(tmp_path / "s2") == {}


def test_dry_run_writes_nothing_and_move_deletes_only_what_is_durable(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_instance(source, series="1.2.5", filename="a.dcm")
    (source / "junk.txt").write_text("x")
    code, out, _ = run("ingest", "--dry-run", "--spool", str(tmp_path / "spool"), str(source))
    assert code == 0 and out == "1.2.5\n"
    assert not (tmp_path / "spool").exists()
    code, out, _ = run("ingest", "--move", "--spool", str(tmp_path / "spool"), str(source))
    assert code == 0 and out == "1.2.5\n"
    assert sorted(os.listdir(source)) == ["junk.txt"]  # skipped files are never deleted
    code, _, _err = run("ingest", "--move", "--dry-run", str(source))
    assert code == 2


def test_unreadable_dicom_is_quarantined_with_the_reason(tmp_path: Path) -> None:
    good = make_instance(tmp_path, filename="good.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:300])
    code, _, _err = run("ingest", "--json", "--spool", str(tmp_path / "spool"), str(cut))
    assert code == 1
    (item,) = (tmp_path / "spool" / "error").iterdir()
    record = json.loads((item / "error.json").read_text())
    assert record["SenderAET"] == "INGEST" and record["reason"]


def _diff(a: dict[str, object] | None, b: dict[str, object] | None) -> object:
    if a is None or b is None:
        return (a is None, b is None)
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
