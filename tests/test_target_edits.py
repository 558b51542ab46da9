"""`modify` and `transfer_syntax` on targets, and edits of study jobs (SPEC §5.1, issue 20):
dispatch sends each edited target a private copy, converted or modified as asked; the
received files and other targets' copies stay byte-identical; what cannot be converted fails
the job naming the instance, and is never sent as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
from pydicom import dcmread

from mercli.dicom.convert import JPEG_LS_LOSSLESS, RLE_LOSSLESS
from mercli.dicom.scu.association import DicomPeer
from mercli.errors import ConfigError
from mercli.rules.config import load_rules
from mercli.spool import ERROR, OUTGOING, SUCCESS, Spool
from tests.test_dispatch import dispatch_once, routed
from tests.test_studies import SERIES, STUDY, complete_due, send_series, series_uid
from tests.test_transcoding import FILES, decoded
from tests.test_transcoding import storescp_only as storescp_only  # a fixture

SECRET = b"a-secret-of-more-than-16-bytes\n"
CLEAR = '[targets.clear]\ntype = "folder"\npath = "clear"\n\n'


def rules_file(tmp_path: Path, edited: str, *, targets: str = '"edited", "clear"') -> Path:
    """Rules sending every series to `clear` (a plain folder) and to `edited` (the TOML
    of `[targets.edited]`)."""
    key = tmp_path / "pseudo.key"
    key.write_bytes(SECRET)
    key.chmod(0o600)
    path = tmp_path / "rules.toml"
    path.write_text(
        f'{CLEAR}[targets.edited]\n{edited}\n\n[[rules]]\nname = "all"\ntargets = [{targets}]\n'
    )
    return path


def delivered(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def spool_instances(spool: Spool) -> list[bytes]:
    return sorted(
        path.read_bytes()
        for state in (OUTGOING, SUCCESS, ERROR)
        for item in spool.items(state)
        for path in item.path.rglob("*.dcm")
    )


# -- transfer_syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", ["jpeg-ls-lossless", RLE_LOSSLESS])
def test_a_folder_target_gets_converted_copies_with_the_same_pixels(
    tmp_path: Path, spool: Spool, syntax: str
) -> None:
    edited = f'type = "folder"\npath = "edited"\ntransfer_syntax = "{syntax}"'
    files = routed(tmp_path, spool, rules_file(tmp_path, edited), {"1.2.50": 3})
    before = spool_instances(spool)
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    converted, clear = delivered(tmp_path / "edited"), delivered(tmp_path / "clear")
    assert sorted(p.read_bytes() for p in clear) == sorted(p.read_bytes() for p in files)
    assert spool_instances(spool) == before  # the spool's files: never edited
    uid = JPEG_LS_LOSSLESS if syntax == "jpeg-ls-lossless" else syntax
    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in files}
    assert len(converted) == 3
    for path in converted:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == uid
        assert path.stem == str(ds.SOPInstanceUID)  # not de-identified: the name stays
        assert numpy.array_equal(decoded(path), decoded(by_uid[path.stem]))
        sidecar = json.loads(path.with_suffix(".tags").read_text())
        assert sidecar["SOPInstanceUID"] == path.stem


def test_an_instance_in_the_target_syntax_already_is_sent_as_it_is(
    tmp_path: Path, spool: Spool
) -> None:
    edited = 'type = "folder"\npath = "edited"\ntransfer_syntax = "explicit-little-endian"'
    files = routed(tmp_path, spool, rules_file(tmp_path, edited), {"1.2.51": 2})
    assert {str(dcmread(p).file_meta.TransferSyntaxUID) for p in files} == {"1.2.840.10008.1.2.1"}
    assert dispatch_once(spool).returncode == 0
    got = sorted(p.read_bytes() for p in delivered(tmp_path / "edited"))
    assert got == sorted(p.read_bytes() for p in files)
    spool_inodes = {
        path.stat().st_ino for item in spool.items(SUCCESS) for path in item.path.rglob("*.dcm")
    }
    assert spool_inodes and not spool_inodes & {
        path.stat().st_ino for path in delivered(tmp_path / "edited")
    }  # the private copy: it shares no inode with the spool (edits never reach the spool)


def test_an_instance_that_cannot_be_converted_fails_the_job_naming_it(
    tmp_path: Path, spool: Spool
) -> None:
    edited = 'type = "folder"\npath = "edited"\ntransfer_syntax = "explicit-little-endian"'
    routed(tmp_path, spool, rules_file(tmp_path, edited), {"1.2.52": 2})
    data = bytearray((FILES / "MR_small_jp2klossless.dcm").read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ: break the codestream
    data[start + 4 : start + 64] = b"\xff" * 60
    for item in spool.items(OUTGOING):
        if json.loads((item.path / "job.json").read_text())["target"]["name"] == "edited":
            victim = sorted(item.path.glob("*.dcm"))[0]
            victim.unlink()
            victim.write_bytes(bytes(data))
    assert dispatch_once(spool).returncode == 1
    (failed,) = spool.items(ERROR)
    reason = json.loads((failed.path / "error.json").read_text())["reason"]
    assert victim.name in reason and "JPEG 2000" in reason, reason
    assert not delivered(tmp_path / "edited")  # nothing sent unconverted
    assert len(delivered(tmp_path / "clear")) == 2


@pytest.mark.parametrize("storescp_only", [JPEG_LS_LOSSLESS], indirect=True)
def test_a_dicom_target_proposes_only_its_syntax(
    tmp_path: Path, spool: Spool, storescp_only: tuple[DicomPeer, Path]
) -> None:
    peer, received = storescp_only
    dicom = (
        f'type = "dicom"\nhost = "127.0.0.1"\nport = {peer.port}\ncalled_aet = "STORESCP"\n'
        f'max_attempts = 1\ntransfer_syntax = "{JPEG_LS_LOSSLESS}"'
    )
    plain = dicom.replace(f'transfer_syntax = "{JPEG_LS_LOSSLESS}"', "")
    rules = rules_file(tmp_path, dicom, targets='"edited", "plain"')
    rules.write_text(rules.read_text() + f"\n[targets.plain]\n{plain}\n")
    files = routed(tmp_path, spool, rules, {"1.2.53": 3})
    dispatch_once(spool)
    (failed,) = spool.items(ERROR)  # the plain target: the peer takes JPEG-LS only
    assert json.loads((failed.path / "job.json").read_text())["target"]["name"] == "plain"
    (done,) = spool.items(SUCCESS)
    assert json.loads((done.path / "job.json").read_text())["target"]["name"] == "edited"
    got = sorted(received.iterdir())
    assert len(got) == 3
    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in files}
    for path in got:
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
        assert numpy.array_equal(decoded(path), decoded(by_uid[str(ds.SOPInstanceUID)]))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('transfer_syntax = "1.2.3.4"', 'unknown or unsupported transfer_syntax "1.2.3.4"'),
        ('transfer_syntax = "jpeg-2000"', "is lossy"),
        ('transfer_syntax = "1.2.840.10008.1.2.4.50"', "set allow_lossy = true"),
        ("allow_lossy = true", "needs a lossy transfer_syntax"),
        ("transfer_syntax = 1", '"transfer_syntax" must be a string'),
    ],
)
def test_bad_transfer_syntaxes_are_refused(tmp_path: Path, lines: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_rules(rules_file(tmp_path, f'type = "folder"\npath = "edited"\n{lines}'))


def test_a_lossy_syntax_with_allow_lossy_is_taken(tmp_path: Path) -> None:
    edited = 'type = "folder"\npath = "e"\ntransfer_syntax = "jpeg-2000"\nallow_lossy = true'
    target = load_rules(rules_file(tmp_path, edited)).targets["edited"]
    assert (target.transfer_syntax, target.allow_lossy) == ("1.2.840.10008.1.2.4.91", True)
    assert target.to_json()["transfer_syntax"] == "1.2.840.10008.1.2.4.91"


# -- modify ------------------------------------------------------------------------------------

MODIFY = (
    'type = "folder"\npath = "edited"\ndeidentify = "basic"\npseudonym_secret_file = "pseudo.key"\n'
    'modify = { InstitutionName = "RESEARCH", "(0008,1030)" = "delete", '
    'PatientName = "STUDY^042", StationName = "", WindowWidth = [400, 1500] }'
)


def test_modify_applies_after_deidentification_on_the_copy_only(
    tmp_path: Path, spool: Spool
) -> None:
    files = routed(tmp_path, spool, rules_file(tmp_path, MODIFY), {"1.2.54": 2})
    for path in files:
        ds = dcmread(path)
        ds.InstitutionName, ds.StudyDescription = "General Hospital", "Head CT"
        ds.save_as(path)
    before = spool_instances(spool)
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    edited = delivered(tmp_path / "edited")
    assert len(edited) == 2
    for path in edited:
        ds = dcmread(path)
        assert ds.InstitutionName == "RESEARCH"  # the profile removes it; modify sets it
        assert "StudyDescription" not in ds
        assert str(ds.PatientName) == "STUDY^042"  # the admin's value wins over the pseudonym
        assert "StationName" in ds and ds.StationName == ""
        assert [float(v) for v in ds.WindowWidth] == [400.0, 1500.0]
        assert ds.PatientIdentityRemoved == "YES"
        sidecar = json.loads(path.with_suffix(".tags").read_text())
        assert sidecar["PatientName"] == "STUDY^042"
    assert spool_instances(spool) == before
    for path in delivered(tmp_path / "clear"):
        assert dcmread(path).get("InstitutionName") != "RESEARCH"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{ StudyDate = "yesterday" }', "StudyDate"),
        ('{ InstitutionNme = "X" }', "InstitutionName"),
        ('{ "(0019,10B0)" = "X" }', "private"),
        ('{ PixelData = "delete" }', "PixelData"),
        ('"InstitutionName"', "must be a table"),
        ("{}", "must be a table"),
    ],
)
def test_bad_modify_values_are_refused_at_rules_check(
    tmp_path: Path, value: str, message: str
) -> None:
    path = rules_file(tmp_path, f'type = "folder"\npath = "e"\nmodify = {value}')
    with pytest.raises(ConfigError, match=message) as caught:
        load_rules(path)
    assert str(caught.value).startswith(f'{path}:8: target "edited": modify')


# -- study jobs --------------------------------------------------------------------------------

STUDY_RULES = """
[targets.pacs]
type = "folder"
path = "pacs"

[targets.research]
type = "folder"
path = "research"
deidentify = "basic"
pseudonym_secret_file = "pseudo.key"
transfer_syntax = "rle-lossless"

[[rules]]
name = "brain"
trigger = "study"
when = 'Modality == "MR"'
require = ['"T1" in SeriesDescription', '"FLAIR" in SeriesDescription']
targets = ["pacs", "research"]
"""


def test_a_study_job_is_edited_series_by_series_under_new_uids(
    tmp_path: Path, spool: Spool
) -> None:
    (tmp_path / "pseudo.key").write_bytes(SECRET)
    (tmp_path / "pseudo.key").chmod(0o600)
    (tmp_path / "rules.toml").write_text(STUDY_RULES)
    rules = load_rules(tmp_path / "rules.toml")
    for description, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010)):
        send_series(tmp_path, spool, rules, description, at)
    made, _ = complete_due(spool, rules, 1020)
    assert len(made) == 2
    result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    (job,) = [p for p in (tmp_path / "research").iterdir()]
    old = {series_uid(d, at) for d, at in (("T1", 1000), ("DWI", 1005), ("FLAIR", 1010))}
    folders = sorted(p for p in job.iterdir() if p.is_dir())
    assert len(folders) == 3 and not {f.name for f in folders} & old
    studies = set()
    for folder in folders:
        for path in folder.glob("*.dcm"):
            ds = dcmread(path)
            assert str(ds.SeriesInstanceUID) == folder.name
            assert ds.file_meta.TransferSyntaxUID == RLE_LOSSLESS
            studies.add(str(ds.StudyInstanceUID))
    assert len(studies) == 1 and STUDY not in studies
    counts = sorted(len(list(f.glob("*.dcm"))) for f in folders)
    assert counts == sorted(SERIES.values())
    pacs = delivered(tmp_path / "pacs")
    assert {str(dcmread(p).SeriesInstanceUID) for p in pacs} == old


def test_pydicom_is_imported_without_requests_which_stays_importable() -> None:
    """`import_pydicom` (what an editing dispatch loads pydicom with) skips `requests` and
    leaves it importable for anyone else; pydicom then downloads (never asked) by urllib."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mercli.dicom import import_pydicom\n"
        "import_pydicom()\n"
        "import pydicom.data.download as d\n"
        "assert 'pydicom' in sys.modules and 'requests' not in sys.modules, sorted(sys.modules)\n"
        "assert d.HAVE_REQUESTS is False\n"
        "import requests\n"
        "print(requests.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "requests"
