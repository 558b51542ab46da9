"""Constants the tests share: UIDs, paths, VR sets and the common targets of rules files."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GETDCMTAGS = ROOT / "build" / "getdcmtags"

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
MR = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
EXPLICIT = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian
IMPLICIT = "1.2.840.10008.1.2"  # Implicit VR Little Endian

# Explicit-VR elements whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

# A DICOM target nobody listens on and a folder target, as rules files in the tests name them.
PACS_AND_ARCHIVE = """\
[targets.pacs]
type = "dicom"
host = "127.0.0.1"
port = 104
called_aet = "PACS"

[targets.archive]
type = "folder"
path = "archive"
"""
