"""`build/getdcmtags` (csrc/getdcmtags.cpp) prints the same sidecars as `mercli tags` (SPEC §3).

Parity is checked on pydicom's whole bundled corpus and on synthetic files for the conversion
rules the corpus does not reach (`mercli.tags` defines them). Both tools run once
over all files; results are matched to files through the `Error: <reason> (<path>)` lines.
Equal means equal JSON once parsed and re-serialized: same keys in the same order, same types
(5.0 is not 5), same values; floats compare exactly, since both tools write the shortest
decimal that reads back to the value (for FL, to the 32-bit value).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.dicomfiles import CORPUS, make_instance
from tests.reliability.hostile import many_elements, many_items

ERROR_LINE = re.compile(r"^Error: .+ \(.+\)$")

# Files where the two tools are known to disagree, with the reason. Keep it empty unless a
# difference cannot be fixed; every entry must say which tool is wrong and why.
KNOWN_DIFFERENCES: dict[str, str] = {}


def run(command: list[str | Path], files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *files], capture_output=True, text=True, timeout=60, check=False
    )


def sidecars(command: list[str | Path], files: list[Path]) -> dict[Path, Any]:
    """Each file's parsed sidecar, or None for the files the tool reported as unreadable."""
    result = run(command, files)
    failed = set()
    for line in result.stderr.splitlines():
        named = [path for path in files if line.endswith(f" ({path})")]
        assert ERROR_LINE.match(line) and named, f"{command[0]}: unexpected stderr {line!r}"
        failed.add(max(named, key=lambda path: len(str(path))))
    assert result.returncode == (1 if failed else 0), result.stderr
    lines = result.stdout.splitlines()
    readable = [path for path in files if path not in failed]
    assert len(lines) == len(readable), f"{command[0]}: one line per readable file"
    found: dict[Path, Any] = dict.fromkeys(failed)
    found.update((path, json.loads(line)) for path, line in zip(readable, lines, strict=True))
    return found


def mercli_tags() -> list[str | Path]:
    return [sys.executable, "-m", "mercli", "tags"]


def assert_parity(files: list[Path], getdcmtags: Path) -> dict[Path, Any]:
    """Both tools agree on every file; returns getdcmtags' sidecars."""
    cpp = sidecars([getdcmtags], files)
    python = sidecars(mercli_tags(), files)
    differences = []
    for path in files:
        if path.name in KNOWN_DIFFERENCES:
            continue
        if (cpp[path] is None) != (python[path] is None):
            side = "getdcmtags" if cpp[path] is None else "mercli tags"
            differences.append(f"{path.name}: only {side} fails")
        elif json.dumps(cpp[path]) != json.dumps(python[path]):
            for key in dict.fromkeys([*cpp[path], *python[path]]):
                mine, theirs = cpp[path].get(key), python[path].get(key)
                if json.dumps(mine) != json.dumps(theirs):
                    differences.append(f"{path.name} {key}: C++ {mine!r}, Python {theirs!r}")
            if list(cpp[path]) != list(python[path]):
                differences.append(f"{path.name}: key order differs")
    assert not differences, "\n".join(differences)
    return cpp


def test_corpus_parity(getdcmtags: Path) -> None:
    cpp = assert_parity(CORPUS, getdcmtags)
    readable = [path for path in CORPUS if cpp[path] is not None]
    assert len(readable) >= 80, "the corpus should be mostly DICOM files"
    assert any("charset_files" in str(path) for path in readable)


# (VR, raw value) per tag, written as is; odd-length values on purpose.
EDGE_CASES: dict[str, dict[int, tuple[str, bytes]]] = {
    "ds_whole_and_multi": {0x00180050: ("DS", b"5 "), 0x00180087: ("DS", b" 1.5\\2E3\\\\-0 ")},
    "ds_not_finite": {0x00180050: ("DS", b"1e999"), 0x00180087: ("DS", b"NaN ")},
    "ds_python_syntax": {0x00180050: ("DS", b"0x10"), 0x00180087: ("DS", b"1_0.5")},
    "ds_inf_exponent": {0x00180050: ("DS", b"inf"), 0x00180087: ("DS", b"+.5e-3")},
    "ds_tiny_huge": {0x00180050: ("DS", b"1e-7"), 0x00180087: ("DS", b"12345678901234567")},
    "is_float_forms": {
        0x00200011: ("IS", b"1.0 "),
        0x00200013: ("IS", b"abc"),
        0x00200012: ("IS", b"1.5"),
    },
    "is_signs": {
        0x00200011: ("IS", b" +007"),
        0x00200013: ("IS", b"1e3"),
        0x00200012: ("IS", b"-0"),
    },
    "is_lists": {
        0x00200011: ("IS", b"\\"),
        0x00200013: ("IS", b"3\\\\4"),
        0x00280008: ("IS", b"99999999999999999999"),
    },
    "empty_values": {
        0x00081030: ("LO", b"  "),
        0x00080060: ("CS", b""),
        0x00080008: ("CS", b"\\ "),
    },
    "trimming": {
        0x00080008: ("CS", b"ORIGINAL \\PRIMARY\\\\X "),
        0x00181020: ("LO", b" v1 \\v2 \x00"),
        0x00081010: ("SH", b" STATION "),
        0x00080018: ("UI", b"1.2.3\x00"),
        0x00080020: ("DA", b"20200101 "),
    },
    "person_names": {0x00100010: ("PN", b"Doe^John==  "), 0x00080090: ("PN", b"A^B\\C^D=E ")},
    "person_name_ideographic_only": {0x00100010: ("PN", b"=Yamada")},
    "json_escapes": {
        0x00204000: ("LT", b'line1\r\nback\\slash "quoted"\ttab\x01 \x00'),
        0x00081030: ("LO", b"\x7f del"),
    },
    "latin1_by_default": {0x00081030: ("LO", b"caf\xe9"), 0x00080060: ("CS", b"\xe9X")},
    "latin1": {0x00080005: ("CS", b"ISO_IR 100"), 0x00100010: ("PN", b"M\xfcller^J\xf6rg")},
    "charset_misspelled": {0x00080005: ("CS", b"ISO IR 100"), 0x00100010: ("PN", b"M\xfcller")},
    "charset_misspelled_cyrillic": {
        0x00080005: ("CS", b"ISO-IR 144"),
        0x00100010: ("PN", b"\xbb\xee\xdb"),
    },
    "charset_unknown": {0x00080005: ("CS", b"FOO"), 0x00100010: ("PN", b"M\xfcller")},
    "utf8": {
        0x00080005: ("CS", b"ISO_IR 192"),
        0x00100010: ("PN", "Wang^XiaoDong=王^小東".encode()),
    },
    "utf8_invalid_bytes": {
        0x00080005: ("CS", b"ISO_IR 192"),
        0x00100010: ("PN", b"ab\xff\xfecd\xe4\xb8"),
    },
    "utf8_with_extensions": {
        0x00080005: ("CS", b"ISO_IR 192\\ISO 2022 IR 87"),
        0x00081030: ("LO", "日本".encode()),
    },
    "greek": {
        0x00080005: ("CS", b"ISO_IR 126"),
        0x00100010: ("PN", b"\xc4\xe9\xef\xed\xf5\xf3\xe9\xef\xf2"),
    },
    "katakana_ir13": {0x00080005: ("CS", b"ISO_IR 13"), 0x00100010: ("PN", b"\xd4\xcf\xc0\xde\\~")},
    "gb18030": {0x00080005: ("CS", b"GB18030"), 0x00100010: ("PN", "张^三".encode("gb18030"))},
    "thai": {0x00080005: ("CS", b"ISO_IR 166"), 0x00081030: ("LO", "ภาษา".encode("tis-620"))},
}
EDGE_SYNTAXES = {
    "ds_whole_and_multi": ImplicitVRLittleEndian,
    "is_float_forms": ExplicitVRBigEndian,
    "person_names": DeflatedExplicitVRLittleEndian,
}


def write_edge_case(folder: Path, name: str) -> Path:
    syntax = EDGE_SYNTAXES.get(name, ExplicitVRLittleEndian)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    for tag, (vr, value) in EDGE_CASES[name].items():
        implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, implicit, little)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the invalid values we write
def test_edge_case_parity(getdcmtags: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    files = [write_edge_case(tmp_path, name) for name in EDGE_CASES]
    cpp = assert_parity(files, getdcmtags)
    assert all(cpp.values()), "every edge case file is readable"


def test_many_elements_parity(getdcmtags: Path, tmp_path: Path) -> None:
    """300 000 small private elements (3.6 MB), 200 000 items in one sequence (5.6 MB): the
    same JSON from both tools. getdcmtags once reached DCMTK's elements and items by index,
    which walks a linked list each time: a minute for such a file, past run()'s timeout."""
    sop = "1.2.826.0.1.3680043.9.78.1"
    files = {"elements": many_elements(sop, 300_000), "items": many_items(f"{sop}.1", 200_000)}
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / f"many_{name}.dcm")
        paths[-1].write_bytes(data)
    cpp = assert_parity(paths, getdcmtags)
    assert all(cpp[path] and cpp[path]["InstanceNumber"] == 7 for path in paths)


def test_header_split_between_elements_at_first_read_parity(
    getdcmtags: Path, tmp_path: Path
) -> None:
    """A first read (64 KiB) that ends exactly between two elements is the end of the
    buffer, not of the data set: read_tags once dropped every element after it."""
    path = tmp_path / "split.dcm"
    path.write_bytes(many_elements("1.2.826.0.1.3680043.9.78.2", 10_000, between=True))
    cpp = assert_parity([path], getdcmtags)
    assert cpp[path] and cpp[path]["SeriesInstanceUID"] and cpp[path]["InstanceNumber"] == 7


def test_unreadable_file_is_reported_and_the_others_printed(
    getdcmtags: Path, tmp_path: Path
) -> None:
    good = make_instance(tmp_path, filename="good.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all\n" * 10)
    missing = tmp_path / "missing.dcm"
    result = run([getdcmtags], [junk, good, missing])
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result.stderr
    assert ERROR_LINE.match(errors[0]) and errors[0].endswith(f" ({junk})")
    assert ERROR_LINE.match(errors[1]) and errors[1].endswith(f" ({missing})")
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert (
        json.loads(lines[0])["SOPInstanceUID"]
        == json.loads(run(mercli_tags(), [good]).stdout)["SOPInstanceUID"]
    )


def test_file_given_twice_prints_two_lines(getdcmtags: Path, tmp_path: Path) -> None:
    path = make_instance(tmp_path, filename="twice.dcm", PatientName="Müller^Jörg")
    result = run([getdcmtags], [path, path])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    assert json.loads(lines[0])["PatientName"] == "Müller^Jörg"


def test_no_arguments_is_a_usage_error(getdcmtags: Path) -> None:
    result = run([getdcmtags], [])
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Usage: getdcmtags FILE..." in result.stderr
