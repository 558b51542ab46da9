"""Which tags a sidecar holds and how they are keyed (SPEC §3; format: `mercli.tags`).

`SIDECAR_KEYWORDS` is the fixed set, in output order; `parse_tag` turns an extra tag asked for
(a keyword or `(gggg,eeee)`) into a tag and its sidecar key; `plan_for` resolves, once per set
of extras, everything a reader needs: which tags to keep and where reading stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import dictionary_keyword, tag_for_keyword
from pydicom.tag import BaseTag

from mercli.errors import ExitCode, MercliError, UsageError

__all__ = [
    "CHARSET",
    "SIDECAR_KEYWORDS",
    "TRANSFER_SYNTAX",
    "InvalidTag",
    "Plan",
    "UnreadableDicom",
    "parse_tag",
    "plan_for",
    "tag_key",
]

SIDECAR_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "TransferSyntaxUID",
    "Modality",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "InstanceNumber",
    "AcquisitionNumber",
    "BodyPartExamined",
    "ProtocolName",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "InstitutionName",
    "ReferringPhysicianName",
    "ImageType",
    "SliceThickness",
    "MagneticFieldStrength",
    "SequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ContrastBolusAgent",
    "ImageComments",
    "NumberOfFrames",
)
"""The keywords every sidecar holds when the instance has them (SPEC §3), in output order."""


class UnreadableDicom(MercliError):
    """The input is not readable DICOM: not DICOM at all, truncated, or malformed."""

    exit_code = ExitCode.SOME_FAILED


class InvalidTag(UsageError):
    """An extra tag is neither a known keyword nor written as `(gggg,eeee)` / `ggggeeee`."""


CHARSET = 0x00080005
TRANSFER_SYNTAX = 0x00020010
_PIXEL_TAGS_START = 0x7FE00008  # Float/Double Float Pixel Data, Pixel Data: never read
_HEX_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def parse_tag(spec: str) -> tuple[BaseTag, str]:
    """Return (tag, sidecar key) for a keyword, `(gggg,eeee)`, `gggg,eeee` or `ggggeeee`.

    The key is the keyword when the data dictionary has one for exactly this tag, else the tag
    as `GGGG,EEEE`. Raises `InvalidTag` for anything else.
    """
    text = spec.strip()
    match = _HEX_TAG.match(text)
    if match:
        tag = BaseTag(int(match.group(1) + match.group(2), 16))
        try:
            keyword = dictionary_keyword(tag)
        except KeyError:  # private, or not in pydicom's dictionary
            keyword = ""
        if keyword and tag_for_keyword(keyword) == tag:  # repeating groups (60xx) have none
            return tag, keyword
        return tag, tag_key(tag)
    if _KEYWORD.match(text):
        found = tag_for_keyword(text)
        if found is not None:
            return BaseTag(found), text
    raise InvalidTag(
        f"unknown tag {spec!r}: use a DICOM keyword (PatientWeight) or a tag ((0010,1030))"
    )


def tag_key(tag: int) -> str:
    return f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to read and how to key it, resolved once per set of extra tags."""

    fields: tuple[tuple[str, BaseTag], ...]  # (sidecar key, tag), in output order
    raw_fields: tuple[tuple[str, int], ...]  # the same with plain int tags
    wanted: frozenset[int]  # data set tags to keep while scanning (charset included)
    meta_wanted: frozenset[int]  # file meta (group 0002) tags to keep
    max_tag: int  # scanning stops at the first top-level tag above this

    def stop_when(self, tag: int, vr: str | None, length: int) -> bool:
        """pydicom's `stop_when` callback: the same stop rule as the fast scan."""
        return int.__gt__(tag, self.max_tag)


@lru_cache(maxsize=64)
def plan_for(extra: tuple[str, ...]) -> Plan:
    fields: dict[str, BaseTag] = {}
    for keyword in SIDECAR_KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        fields[keyword] = BaseTag(tag)
    seen = set(fields.values())
    for spec in extra:
        tag, key = parse_tag(spec)
        if tag not in seen:
            fields[key] = tag
            seen.add(tag)
    # Plain ints: BaseTag compares in Python code, which the scan loop cannot afford.
    data_tags = {int(tag) for tag in seen if tag >> 16 != 2}
    return Plan(
        fields=tuple(fields.items()),
        raw_fields=tuple((key, int(tag)) for key, tag in fields.items()),
        wanted=frozenset(data_tags | {CHARSET}),
        meta_wanted=frozenset(int(tag) for tag in seen if tag >> 16 == 2),
        max_tag=min(max(data_tags), _PIXEL_TAGS_START - 1),
    )
