"""The walk: every attribute of a dataset and of its sequences' items, given its action."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

import mercli.deid.keyed as keyed
from mercli.deid.model import Change, DeidentificationRefused, Profile, Report
from mercli.deid.table import Action, lookup

MAX_DEPTH = 16  # sequence nesting; DICOM objects in the wild stay under 8
MAX_ELEMENTS = 1_000_000  # attributes visited in one dataset, items of all sequences included
MAX_VALUES = 4096  # values of one multi-valued attribute that are replaced one by one
MAX_CLEAN_CHARS = 10_240  # longer free text under C is replaced (D), not cleaned
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}
NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "IS", "DS"}
DUMMIES: dict[str, Any] = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y"}
PSEUDONYMS = {0x00100010, 0x00100020, 0x00080050, 0x00200010}  # Z given a pseudonym, not blank
IDENTIFYING = (  # values looked for, and blanked, in free text under C (clean)
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "InstitutionName",
    "InstitutionAddress", "StationName", "PatientAddress", "PatientTelephoneNumbers",
)  # fmt: skip
MAX_TOKENS = 64


@dataclass
class Walk:
    profile: Profile
    shift: int  # days, for Modified Dates
    cleaner: re.Pattern[str] | None
    report: Report = field(default_factory=Report)
    visited: int = 0


def run(dataset: Dataset, profile: Profile) -> Report:
    patient = str(dataset.get("PatientID", "") or dataset.get("PatientName", "") or "")
    walk = Walk(profile, keyed.shift_days(profile.secret, patient), cleaner_for(dataset))
    visit(dataset, walk, 0, "")
    return walk.report


def cleaner_for(dataset: Dataset) -> re.Pattern[str] | None:
    """A pattern of this dataset's identifying values (literal, so its cost is linear)."""
    tokens: set[str] = set()
    for keyword in IDENTIFYING:
        element = dataset.get(keyword)
        values = [] if element is None else element if isinstance(element, list) else [element]
        for value in values:
            tokens.update(t for t in re.split(r"[\^=\\ ,]+", str(value)[:256]) if len(t) >= 3)
    if not tokens:
        return None
    chosen = sorted(tokens, key=len, reverse=True)[:MAX_TOKENS]
    return re.compile("|".join(re.escape(t) for t in chosen), re.IGNORECASE)


def visit(dataset: Dataset, walk: Walk, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise DeidentificationRefused(f"cannot: sequences nested deeper than {MAX_DEPTH}")
    for tag in list(dataset.keys()):
        walk.visited += 1
        if walk.visited > MAX_ELEMENTS:
            raise DeidentificationRefused(f"cannot: more than {MAX_ELEMENTS} attributes")
        path = f"{where}{tag_text(tag)}"
        if tag.is_private:
            if not kept_private(dataset, tag, walk.profile.keep_private):
                del dataset[tag]
                walk.report.add(Change(path, "(private)", "X", "***", ""))
            continue
        action = lookup(int(tag), walk.profile.options)
        if action is None:
            if vr_of(dataset, tag) == "SQ":
                items(dataset, tag, walk, depth, path)
            continue
        apply(dataset, tag, action, walk, depth, path)


def apply(
    dataset: Dataset, tag: BaseTag, action: Action, walk: Walk, depth: int, path: str
) -> None:
    code, vr = action.code, vr_of(dataset, tag)
    if code == "X":
        del dataset[tag]
        walk.report.add(Change(path, keyword_of(tag), "X", "***", ""))
    elif vr == "SQ":
        if code == "Z" or (code == "D" and "Z" in action.basic):
            replace(dataset, tag, [], walk, path, "Z")
        else:  # K, C, U: the items are de-identified by their own attributes' actions
            items(dataset, tag, walk, depth, path)
    elif code == "K":
        return
    elif code == "Z":
        old = dataset[tag].value
        new = keyed.pseudonym(walk.profile.secret, str(old)) if int(tag) in PSEUDONYMS else None
        replace(dataset, tag, new if old not in (None, "") else old, walk, path, "Z")
    elif code == "U" or (code == "D" and vr == "UI"):
        replace(dataset, tag, new_uids(dataset[tag].value, walk), walk, path, "U")
    elif code == "D":
        replace(dataset, tag, dummy(dataset[tag].value, vr, walk), walk, path, "D")
    elif code == "C":
        replace(dataset, tag, cleaned(dataset[tag].value, vr, action, walk), walk, path, "C")


def items(dataset: Dataset, tag: BaseTag, walk: Walk, depth: int, path: str) -> None:
    for index, item in enumerate(dataset[tag].value or []):
        visit(item, walk, depth + 1, f"{path}[{index}]")


def replace(dataset: Dataset, tag: BaseTag, new: Any, walk: Walk, path: str, code: str) -> None:
    element = dataset[tag]
    old = element.value
    if old == new or (old in (None, "", b"") and new in (None, "", b"", [])):
        return
    dataset[tag] = DataElement(tag, element.VR, new)
    uid = element.VR == "UI"
    walk.report.add(Change(path, keyword_of(tag), code, masked(old, uid), masked(new, uid)))


def values_of(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return (
        list(value)
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
        else [value]
    )


def new_uids(value: Any, walk: Walk) -> Any:
    found = values_of(value)
    if len(found) > MAX_VALUES:
        raise DeidentificationRefused(f"cannot: a UID attribute with more than {MAX_VALUES} values")
    new = [keyed.uid(walk.profile.secret, str(v)) for v in found]
    return new[0] if len(new) == 1 else new or value


def dummy(value: Any, vr: str, walk: Walk) -> Any:
    """D: a value of the VR that says nothing of the original; a keyed pseudonym for text, so
    the same identifier stays the same identifier."""
    if not values_of(value):
        return value
    if vr in TEXT_VRS:
        return keyed.pseudonym(walk.profile.secret, str(value)[:MAX_CLEAN_CHARS])
    if vr in NUMBER_VRS:
        return "0" if vr in ("IS", "DS") else 0
    return DUMMIES.get(vr)  # bytes, UR, AT...: an empty value


def cleaned(value: Any, vr: str, action: Action, walk: Walk) -> Any:
    """C: dates moved back by the patient's shift (Modified Dates; times stay, the shift being
    whole days); free text with this dataset's identifying values blanked; anything else D."""
    if action.option == "retain-longitudinal-modified-dates":
        if vr in ("DA", "DT"):
            moved = [keyed.shift_date(str(v), walk.shift) for v in values_of(value)]
            if any(m is None for m in moved):
                return None  # not a date: blank rather than keep
            return moved[0] if len(moved) == 1 else moved
        return value
    found = [str(v) for v in values_of(value)[: MAX_VALUES + 1]]
    if vr in TEXT_VRS and len(found) <= MAX_VALUES and sum(map(len, found)) <= MAX_CLEAN_CHARS:
        new = [walk.cleaner.sub("***", v) if walk.cleaner else v for v in found]
        return new[0] if len(new) == 1 else new
    return dummy(value, vr, walk)


def kept_private(dataset: Dataset, tag: BaseTag, keep: Iterable[str]) -> bool:
    """A private attribute in a block whose creator is one of `keep` (the creator included)."""
    element = tag.element
    if 0x10 <= element <= 0xFF:
        creator_tag = tag
    elif element >= 0x1000:
        creator_tag = BaseTag((tag.group << 16) | (element >> 8))
    else:
        return False
    creator = dataset.get(creator_tag)
    return creator is not None and str(creator.value).strip() in set(keep)


def vr_of(dataset: Dataset, tag: BaseTag) -> str:
    """The VR without converting a raw value, unless the file does not say (implicit VR).
    A value left in the file (`dcmread(defer_size=...)`: pixel data) is not read for it."""
    raw = dataset.get_item(tag, keep_deferred=True)
    vr = getattr(raw, "VR", None)
    if vr in (None, "UN"):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
        if " or " in vr:  # "OB or OW", "US or SS": never a sequence, the first will do
            vr = vr.split(" or ")[0]
        elif vr == "UN":
            vr = dataset[tag].VR
    return str(vr)


def keyword_of(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or tag_text(tag)


def tag_text(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def masked(value: Any, uid: bool) -> str:
    """UIDs shown (they are logged anyway); anything else only as whether it is empty."""
    if value in (None, "", b"", []):
        return ""
    return str(value)[:200] if uid else "***"
