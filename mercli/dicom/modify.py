"""Per-target edits (SPEC §5.1 `modify`): set, blank or delete top-level attributes.

    modify = { InstitutionName = "RESEARCH", "(0019,10B0)" = "delete", StationName = "",
               WindowCenter = [40, 400] }

`parse_modify(table)` checks a target's table when the rules are loaded (`rules check`), so a bad
entry is refused before any image is sent; `apply_modify(dataset, modifications)` changes the
target's own copy of an instance at dispatch time, after de-identification.

- Keys: a keyword of pydicom's dictionary, or a tag as "(gggg,eeee)", "gggg,eeee" or "ggggeeee".
  Values: "delete" removes the attribute, "" blanks it (an empty value of its VR; the attribute
  is created if absent, whatever its type), anything else sets it: a string, an int or float
  for numeric VRs, or a list of those for several values. Only the top-level dataset is edited.
- Every value is checked against the dictionary's VR (pydicom's `validate_value`, plus what it
  lets through: backslashes, control characters, IS/DS ranges, non-finite numbers) and VM.
- Refused: file meta (0002), command (0000) and item (FFFE) groups, group lengths, pixel data
  (7FE0 and the 7Fxx repeaters), SpecificCharacterSet (it says how all other text is encoded),
  removing or blanking SOPClassUID/SOPInstanceUID (a C-STORE names them), setting a sequence
  or a binary VR, private attributes except "delete" (their VR and creator are unknown) and
  private creators, unknown tags except "delete", and more than `MAX_ENTRIES` entries.
- At dispatch a non-ASCII value that the instance's SpecificCharacterSet cannot encode is
  refused (`ModifyError`): it is never written with replacement characters.

pydicom is imported by the functions, not by this module: `--help` stays fast.
"""

from __future__ import annotations

import difflib
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MAX_ENTRIES = 64  # entries in one target's table
MAX_VALUES = 256  # values of one multi-valued entry
MAX_VALUE_CHARS = 10_240  # characters of one value (LT's limit; UT and UC could hold more)
MAX_KEY_CHARS = 64

Scalar = str | int | float
Value = Scalar | list[Scalar] | None
Action = Literal["set", "blank", "delete"]

TAG_FORMS = re.compile(
    r"\(\s*(?P<g1>[0-9A-Fa-f]{4})\s*,\s*(?P<e1>[0-9A-Fa-f]{4})\s*\)"
    r"|(?P<g2>[0-9A-Fa-f]{4})\s*,\s*(?P<e2>[0-9A-Fa-f]{4})"
    r"|(?P<g3>[0-9A-Fa-f]{4})(?P<e3>[0-9A-Fa-f]{4})"
)
KEYWORD_FORM = re.compile(r"[A-Za-z][A-Za-z0-9]*")
FREE_TEXT_VRS = {"LT", "ST", "UT"}  # may hold backslashes, CR, LF, FF and TAB
CHARSET_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}  # extended by SpecificCharacterSet
TEXT_VRS = CHARSET_VRS | {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"}
INT_VRS = {"US", "SS", "UL", "SL", "SV", "UV"}
FLOAT_VRS = {"FL", "FD"}
SETTABLE_VRS = TEXT_VRS | INT_VRS | FLOAT_VRS | {"AT", "DS", "IS", "US or SS"}
FORBIDDEN_GROUPS = {0x0000: "command", 0x0002: "file meta", 0xFFFE: "item delimitation"}
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_UIDS = {0x00080016: "MediaStorageSOPClassUID", 0x00080018: "MediaStorageSOPInstanceUID"}
DEFAULT_CHARSETS = {"", "ISO_IR 6", "ISO 2022 IR 6"}
IS_RANGE = (-(2**31), 2**31 - 1)


class ModifyError(ValueError):
    """A `modify` entry that is refused: "<key>: <why>", for "target X: modify: <message>"."""

    def __init__(self, reason: str, key: object = None) -> None:
        super().__init__(reason if key is None else f"{show(key)}: {reason}")


@dataclass(frozen=True)
class Modification:
    tag: int
    keyword: str  # "" for private, unknown and repeating-group (50xx, 60xx) tags
    vr: str  # the dictionary's, possibly ambiguous ("US or SS"); "" when unknown
    action: Action
    value: Value = None  # for "set": pydicom-ready (DS as strings), a list when multi-valued

    @property
    def name(self) -> str:
        return self.keyword or f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"


def show(key: object) -> str:
    """A key as it may appear in a message: quoted, escaped, short."""
    text = repr(key[:MAX_KEY_CHARS] if isinstance(key, str) else key)[: MAX_KEY_CHARS + 2]
    return text + ("..." if isinstance(key, str) and len(key) > MAX_KEY_CHARS else "")


def parse_modify(raw: Mapping[str, object]) -> tuple[Modification, ...]:
    """The checked entries of a target's `modify` table, in the table's order."""
    if not isinstance(raw, Mapping):
        raise ModifyError(f"must be a table of attribute = value, not {type(raw).__name__}")
    if len(raw) > MAX_ENTRIES:
        raise ModifyError(f"{len(raw)} entries; at most {MAX_ENTRIES} are allowed")
    seen: dict[int, object] = {}
    result = []
    for key, value in raw.items():
        modification = parse_entry(key, value)
        if modification.tag in seen:
            raise ModifyError(f"the same attribute as {show(seen[modification.tag])}", key)
        seen[modification.tag] = key
        result.append(modification)
    return tuple(result)


def parse_entry(key: object, value: object) -> Modification:
    tag, keyword, vr, vm = resolve_key(key)
    check_tag(key, tag, keyword)
    if value == "delete":
        if tag in SOP_UIDS:
            raise ModifyError("cannot be removed: every instance sent needs it", key)
        return Modification(tag, keyword, vr, "delete")
    if tag & 0x10000 or not vr:
        what = "a private attribute" if tag & 0x10000 else "not in the DICOM dictionary"
        raise ModifyError(f'{what}: only "delete" is allowed (its VR is unknown)', key)
    if value == "":
        if tag in SOP_UIDS:
            raise ModifyError("cannot be blanked: every instance sent needs it", key)
        return Modification(tag, keyword, vr, "blank")
    return Modification(tag, keyword, vr, "set", parse_value(key, vr, vm, value))


def resolve_key(key: object) -> tuple[int, str, str, str]:
    """(tag, keyword, VR, VM) of a key; VR and VM are "" for private and unknown tags."""
    from pydicom.datadict import get_entry, keyword_dict

    if not isinstance(key, str):
        raise ModifyError("a key must be a keyword or a (gggg,eeee) tag", key)
    if len(key) > MAX_KEY_CHARS:
        raise ModifyError("too long for a keyword or a tag", key)
    match = TAG_FORMS.fullmatch(key)
    if match:
        group, element = (part for part in match.groups() if part is not None)
        tag = int(group + element, 16)
        if tag & 0x10000:
            return tag, "", "", ""
        try:
            vr, vm, _name, _retired, keyword = get_entry(tag)
        except KeyError:
            return tag, "", "", ""
        return tag, keyword if keyword_dict.get(keyword) == tag else "", vr, vm
    if KEYWORD_FORM.fullmatch(key) and key in keyword_dict:
        tag = keyword_dict[key]
        vr, vm, *_ = get_entry(tag)
        return tag, key, vr, vm
    raise ModifyError(unknown_key_reason(key), key)


def unknown_key_reason(key: str) -> str:
    from pydicom._dicom_dict import RepeatersDictionary  # not re-exported by datadict
    from pydicom.datadict import keyword_dict

    if not KEYWORD_FORM.fullmatch(key):
        return "not a keyword or a tag; tags are written (gggg,eeee), in hexadecimal"
    for mask, entry in RepeatersDictionary.items():
        if entry[4] == key:
            example = mask.replace("x", "0")
            return f"a repeating-group attribute: give its tag, e.g. ({example[:4]},{example[4:]})"
    by_case = {keyword.lower(): keyword for keyword in keyword_dict}
    matches = [by_case[key.lower()]] if key.lower() in by_case else []
    matches = matches or difflib.get_close_matches(key, keyword_dict, n=3)
    hint = f"; did you mean {', '.join(matches)}?" if matches else ""
    return f"unknown keyword{hint}"


def check_tag(key: object, tag: int, keyword: str) -> None:
    group, element = tag >> 16, tag & 0xFFFF
    if group in FORBIDDEN_GROUPS:
        raise ModifyError(f"{FORBIDDEN_GROUPS[group]} group ({group:04X}) cannot be edited", key)
    if element == 0:
        raise ModifyError("group lengths cannot be edited", key)
    if 0x7F00 <= group <= 0x7FE0 and not group & 1:
        raise ModifyError("pixel data cannot be edited", key)
    if group & 1 and 0x0010 <= element <= 0x00FF:
        raise ModifyError("private creators cannot be edited (their blocks depend on them)", key)
    if tag == SPECIFIC_CHARACTER_SET:
        raise ModifyError("cannot be edited: it says how every other text is encoded", key)


def parse_value(key: object, vr: str, vm: str, value: object) -> Value:
    """A value to set, checked against the VR and VM: pydicom-ready."""
    if isinstance(value, Mapping):
        raise ModifyError('a nested table is not a value; give a value, "" or "delete"', key)
    if vr not in SETTABLE_VRS:
        raise ModifyError(f'a {vr} attribute cannot be set, only "delete" or "" (blank)', key)
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ModifyError('an empty list; use "" to blank', key)
    if len(items) > MAX_VALUES:
        raise ModifyError(f"{len(items)} values; at most {MAX_VALUES} are allowed", key)
    if vm and not vm_allows(vm, len(items)):
        raise ModifyError(f"{len(items)} value(s), but the dictionary's VM is {vm}", key)
    converted = [parse_scalar(key, vr, item) for item in items]
    return converted if len(converted) > 1 else converted[0]


def vm_allows(vm: str, count: int) -> bool:
    """Whether a dictionary VM ("1", "1-3", "1-n", "2-2n", "3-3n", ...) allows `count` values."""
    low, _, high = vm.partition("-")
    try:
        if not high:
            return count == int(low)
        if high == "n":
            return count >= int(low)
        if high.endswith("n"):
            return count >= int(low) and count % int(high[:-1]) == 0
        return int(low) <= count <= int(high)
    except ValueError:
        return True  # a VM this code does not know: leave it to the reader


def parse_scalar(key: object, vr: str, item: object) -> Scalar:
    """One value for `vr`, or ModifyError naming `key`."""
    if isinstance(item, bool) or not isinstance(item, str | int | float):
        kind = "a boolean" if isinstance(item, bool) else f"a {type(item).__name__}"
        raise ModifyError(f"{kind} is not a value; give a string or a number", key)
    if isinstance(item, str) and len(item) > MAX_VALUE_CHARS:
        raise ModifyError(f"{len(item)} characters; at most {MAX_VALUE_CHARS} are allowed", key)
    try:
        return convert(vr, item)
    except (ValueError, TypeError, OverflowError) as e:
        reason = str(e).split(" Please see")[0][:200]
        raise ModifyError(f"not a valid {vr} value: {reason}", key) from None


def convert(vr: str, item: str | int | float) -> Scalar:
    """`item` made pydicom-ready for `vr`; ValueError (pydicom's, where it has one) if invalid."""
    from pydicom import config
    from pydicom.valuerep import format_number_as_ds, validate_value

    if vr == "US or SS":
        for each in ("US", "SS"):
            convert(each, item)
        return item
    if isinstance(item, float) and not math.isfinite(item):
        raise ValueError("not a finite number")
    if isinstance(item, str):
        check_characters(vr, item)
    if vr in TEXT_VRS:
        if not isinstance(item, str):
            raise ValueError("a number; give it as a string")
    elif vr == "IS":
        if isinstance(item, float):
            raise ValueError("an integer is needed")
        if isinstance(item, str):
            validate_value(vr, item, config.RAISE)
        if not IS_RANGE[0] <= int(item) <= IS_RANGE[1]:
            raise ValueError("out of the range of a 32-bit integer")
        item = str(item) if isinstance(item, int) else item
    elif vr == "DS":
        if isinstance(item, float):
            item = format_number_as_ds(item)
        item = str(item)
        validate_value(vr, item, config.RAISE)
        if not math.isfinite(float(item)):
            raise ValueError("not a finite number")
    elif vr in INT_VRS:
        if not isinstance(item, int):
            raise ValueError("an integer is needed")
    elif vr in FLOAT_VRS:
        if isinstance(item, str):
            raise ValueError("a number is needed")
        item = float(item)
        if vr == "FL":
            struct.pack("<f", item)  # OverflowError beyond 32-bit floats
    elif vr == "AT":
        item = int(tag_of(item)) if isinstance(item, str) else item
    else:
        raise ValueError(f'a {vr} attribute cannot be set, only "delete" or "" (blank)')
    validate_value(vr, item, config.RAISE)
    return item


def check_characters(vr: str, text: str) -> None:
    allowed = "\t\n\f\r\\" if vr in FREE_TEXT_VRS else ""
    bad = [c for c in text if (ord(c) < 0x20 or c in "\\\x7f") and c not in allowed]
    if bad:
        hint = "; give several values as a list" if "\\" in bad else ""
        raise ValueError(f"character {bad[0]!r} is not allowed{hint}")


def tag_of(text: str) -> int:
    match = TAG_FORMS.fullmatch(text)
    if not match:
        raise ValueError("a tag, written (gggg,eeee), is needed")
    return int("".join(part for part in match.groups() if part is not None), 16)


def apply_modify(dataset: Dataset, modifications: Sequence[Modification]) -> list[str]:
    """Apply `modifications` to `dataset`'s top level, in place; what changed, without values.

    "delete" of an absent attribute changes nothing and is not listed. An attribute that
    exists with another VR than the dictionary's keeps it if the value is valid for it (UN and
    implicit-VR attributes take the dictionary's). Setting SOPClassUID or SOPInstanceUID sets
    the file meta's MediaStorage... copy too. ModifyError if a value cannot be encoded in the
    dataset's SpecificCharacterSet.
    """
    from pydicom.dataelem import DataElement, empty_value_for_VR

    changes = []
    for modification in modifications:
        tag, name = modification.tag, modification.name
        if modification.action == "delete":
            if tag in dataset:
                del dataset[tag]
                changes.append(f"{name} deleted")
            continue
        vr = target_vr(dataset, modification)
        if modification.action == "blank":
            dataset[tag] = DataElement(tag, vr, empty_value_for_VR(vr))
            changes.append(f"{name} blanked")
            continue
        check_encodable(dataset, modification)
        dataset[tag] = DataElement(tag, vr, modification.value)
        file_meta = getattr(dataset, "file_meta", None)
        if tag in SOP_UIDS and file_meta is not None:
            setattr(file_meta, SOP_UIDS[tag], modification.value)
        changes.append(f"{name} set")
    return changes


def target_vr(dataset: Dataset, modification: Modification) -> str:
    """The VR to write: the present attribute's if the value fits it, else the dictionary's."""
    present = dataset.get_item(modification.tag) if modification.tag in dataset else None
    vr = present.VR if present is not None else None  # None: read as implicit VR
    if vr and vr not in ("UN", modification.vr) and fits(vr, modification.value):
        return vr
    return resolve_ambiguous(dataset, modification.vr)


def fits(vr: str, value: Value) -> bool:
    """Whether `value` (None: an empty one) is valid for `vr` as well."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    try:
        for item in items:
            convert(vr, item)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def resolve_ambiguous(dataset: Dataset, vr: str) -> str:
    """A dictionary VR such as "US or SS" made one, as pydicom would on writing."""
    if "US or SS" in vr:
        return "SS" if dataset.get("PixelRepresentation") == 1 else "US"
    return {"OB or OW": "OW", "US or OW": "US"}.get(vr, vr)


def check_encodable(dataset: Dataset, modification: Modification) -> None:
    """ModifyError if a non-ASCII value cannot be written in the dataset's character set."""
    from pydicom.charset import python_encoding

    value = modification.value
    texts = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    if modification.vr not in CHARSET_VRS or all(text.isascii() for text in texts):
        return
    charset = dataset.get("SpecificCharacterSet") or ""
    terms = [charset] if isinstance(charset, str) else list(charset)
    encodings = [python_encoding.get(term, "") for term in terms if term not in DEFAULT_CHARSETS]
    for text in texts:
        if not any(encodes(text, encoding) for encoding in encodings):
            raise ModifyError(
                f"the value cannot be written in this instance's SpecificCharacterSet "
                f"({show(chr(92).join(terms))})",
                modification.name,
            )


def encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (LookupError, UnicodeError):
        return False
    return True
