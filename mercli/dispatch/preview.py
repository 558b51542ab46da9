"""What a target's edits would change in a file, for `mercli rules test` (SPEC §5.1).

The file is edited exactly as dispatch would (`mercli.dispatch.edits.EditPlan`: de-identify,
then `modify`), on a deep copy, and the two top-level datasets are compared: changed, removed
and added attributes, a sequence as its item count, binary values as their length, and the
transfer syntax dispatch would convert to. Old values that may identify a patient (PN, private
elements, anything the de-identification table acts on, Patient* keywords, AccessionNumber)
are masked unless `show_phi`; new values are shown (de-identified, or the admin's own), except
a masked value that the edit kept.

pydicom is imported by the functions, so importing this module stays light.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercli.rules.config import RuleSet

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    from mercli.dispatch.edits import EditPlan


def file_edits(
    ruleset: RuleSet,
    path: Path,
    names: Sequence[str],
    plans: dict[str, EditPlan | str],
    show_phi: bool,
) -> dict[str, dict[str, Any]]:
    """Per target: what dispatch would change in its copy of the file (see `_diff`)."""
    if not names:
        return {}
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:  # read_tags took it as DICOM: a file without a preamble is one receive would store
        original = dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return {name: edit_result(error=f"cannot be read ({exc})") for name in names}
    for name in names:
        if name not in plans:
            plans[name] = _plan(ruleset, name)
    return {name: _edited(original, plans[name], show_phi) for name in names}


def _plan(ruleset: RuleSet, name: str) -> EditPlan | str:
    """The target's edit plan, or why there is none (its secret file unreadable, say)."""
    from mercli.dispatch.edits import EditFailed, EditPlan

    try:
        return EditPlan.of(ruleset.targets[name])
    except EditFailed as exc:
        return str(exc).removeprefix(f"target {name}: ")


def _edited(original: Dataset, plan: EditPlan | str, show_phi: bool) -> dict[str, Any]:
    """Edit a copy of `original` as `plan` says; the differences, or the error."""
    from mercli.deid.model import DeidentificationRefused
    from mercli.dicom.modify import ModifyError
    from mercli.dispatch.edits import EditFailed

    if isinstance(plan, str):
        return edit_result(error=plan)
    edited = copy.deepcopy(original)  # Dataset.copy() would share elements and items
    try:
        plan.edit(edited)
    except DeidentificationRefused as exc:
        return edit_result(error=exc.reason)
    except ModifyError as exc:  # a value the file's character set cannot encode
        return edit_result(error=f"modify: {exc}")
    except EditFailed as exc:
        return edit_result(error=str(exc))
    syntax = _syntax_of(original)
    moved = None
    if plan.syntax is not None and plan.syntax != syntax:
        moved = {"old": syntax or None, "new": plan.syntax}
    return edit_result(_diff(original, edited, show_phi), moved)


def _syntax_of(dataset: Dataset) -> str:
    """The file's transfer syntax: its file meta's, or what pydicom found reading a file
    without one ("" if neither)."""
    from pydicom import uid

    meta = getattr(dataset, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return str(meta.TransferSyntaxUID)
    found: dict[tuple[bool | None, bool | None], str] = {
        (True, True): uid.ImplicitVRLittleEndian,
        (False, True): uid.ExplicitVRLittleEndian,
        (False, False): uid.ExplicitVRBigEndian,
    }
    return found.get(dataset.original_encoding, "")


def edit_result(
    changes: list[dict[str, Any]] | None = None,
    syntax: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    return {"changes": changes or [], "transfer_syntax": syntax, "error": error}


def _diff(old: Dataset, new: Dataset, show_phi: bool) -> list[dict[str, Any]]:
    """The top-level attributes that differ, in tag order (file meta aside: its SOP
    Instance UID follows the dataset's); a sequence as its item count."""
    changes = []
    for tag in sorted(set(old.keys()) | set(new.keys())):
        before, after = old.get(tag), new.get(tag)
        if before is not None and after is not None and before == after:
            continue
        element = before if before is not None else after
        assert element is not None
        kind = "added" if before is None else "removed" if after is None else "changed"
        old_text, new_text = _text(before), _text(after)
        if element.VR == "SQ" and kind == "changed" and old_text == new_text:
            new_text = f"{new_text}, contents changed"
        masked = before is not None and not show_phi and before.VR != "SQ"
        masked = masked and _identifying(element)
        if masked and before is not None:
            old_text = _masked(before, old_text)
            if after is not None and new_text == _text(before):  # kept as it was
                new_text = old_text
        changes.append(
            {
                "tag": f"({tag.group:04X},{tag.element:04X})",
                "keyword": element.keyword or ("(private)" if tag.is_private else ""),
                "vr": element.VR,
                "kind": kind,
                "old": old_text,
                "new": new_text,
                "masked": masked,
            }
        )
    return changes


_IDENTIFYING_KEYWORDS = ("Patient", "OtherPatient", "AccessionNumber")


def _identifying(element: DataElement) -> bool:
    """Whether a value may identify a patient: PN, private, what the de-identification
    profile acts on (any option), the Patient module's keywords, AccessionNumber."""
    from mercli.deid.table import lookup

    return (
        element.VR == "PN"
        or element.tag.is_private
        or lookup(int(element.tag), ()) is not None
        or element.keyword.startswith(_IDENTIFYING_KEYWORDS)
    )


def _text(element: DataElement | None) -> str | None:
    """An element's value as text: a sequence's item count, binary data's length, the
    values of a multi-valued one joined by backslashes."""
    if element is None:
        return None
    value = element.value
    if element.VR == "SQ":
        return f"{len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


def _masked(element: DataElement, text: str | None) -> str:
    if isinstance(element.value, bytes | bytearray):
        return f"*** ({text})"
    size = len(text or "")
    return f"*** ({size} char{'' if size == 1 else 's'})"
