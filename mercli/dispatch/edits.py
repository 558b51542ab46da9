"""Per-target edits at dispatch time (SPEC §5.1): the job's own copies, never the spool's.

A target with `deidentify`, `modify` or `transfer_syntax` gets a private, edited copy of the
job, made in the dispatching worker's scratch folder for this attempt and removed after it.
Each instance, in this order:

1. `deidentify = "basic"`: read, de-identified (`mercli.deid`, keyed by the target's
   `pseudonym_secret_file`);
2. `modify`: attributes set, blanked or deleted (`mercli.dicom.modify`), after
   de-identification, so an admin's value wins over the profile's;
3. written under its (new) SOP Instance UID, then, with `transfer_syntax`, converted
   (`mercli.dicom.convert`); an instance already in that syntax and not edited is linked,
   not copied;
4. a sidecar made from the new header.

A study job's series sub-folders are named by their new Series Instance UIDs. The received
files and every other target's hard links are never touched. The keyed hash is
deterministic, so a retry makes the same names and `dispatch.json` stays true across
attempts.

An instance that cannot be edited or converted (BurnedInAnnotation = YES without
`allow_burned_in`, an unreadable header, pixel data no codec can convert, a lossy source
where only lossless output is allowed) fails the job for good with the instance named: it
is never sent unedited or unconverted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from mercli.deid.core import deidentify
from mercli.deid.model import DeidentificationRefused, Profile, ProfileError, load_secret
from mercli.dicom.convert import TranscodeError, transcode_file
from mercli.dicom.modify import Modification, ModifyError, apply_modify, parse_modify
from mercli.dicom.scu.transcode import InstanceNotSendable, read_instance
from mercli.fsutil import make_dir, write_new
from mercli.jobs import JobInfo, Target
from mercli.names import safe_name
from mercli.secrets import SecretError
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX
from mercli.spool.items import json_bytes
from mercli.tags import UnreadableDicom, read_tags

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


class EditFailed(Exception):
    """The job cannot be edited as its target asks; `permanent`: retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


@dataclass(frozen=True)
class EditPlan:
    """What one target does to each instance: made once per attempt."""

    profile: Profile | None = None
    modifications: tuple[Modification, ...] = ()
    syntax: str | None = None
    allow_lossy: bool = False

    @classmethod
    def of(cls, target: Target) -> EditPlan:
        """The target's plan, its secret read now (a rotated file is used next attempt)."""
        try:
            modifications = parse_modify(dict(target.modify)) if target.modify else ()
        except ModifyError as exc:  # job.json written by another version: fix the rules
            raise EditFailed(f"target {target.name}: modify: {exc}", permanent=True) from None
        return cls(
            profile=profile_of(target) if target.deidentify else None,
            modifications=modifications,
            syntax=target.transfer_syntax,
            allow_lossy=target.allow_lossy,
        )

    @property
    def rewrites(self) -> bool:
        """Whether the header is edited (else only the pixels may be converted)."""
        return self.profile is not None or bool(self.modifications)

    def edit(self, dataset: Dataset) -> None:
        """De-identify, then modify, in place; DeidentificationRefused for a refused one."""
        if self.profile is not None:
            deidentify(dataset, self.profile)
        if self.modifications:
            apply_modify(dataset, self.modifications)


def profile_of(target: Target) -> Profile:
    """The target's de-identification profile with its secret."""
    try:
        secret = load_secret(Path(str(target.pseudonym_secret_file)))
        return Profile(
            options=target.deidentify_options,
            secret=secret,
            allow_burned_in=target.allow_burned_in,
            keep_private=target.keep_private,
        )
    except (SecretError, ProfileError) as exc:  # an admin fixes the file: retried
        raise EditFailed(f"target {target.name}: {exc}", permanent=False) from None


def edited_copy(folder: Path, job: JobInfo, scratch: Path) -> tuple[Path, JobInfo]:
    """The job edited into `scratch` (made here), and the JobInfo that describes it
    (a study job's new series sub-folders)."""
    plan = EditPlan.of(job.target)
    make_dir(scratch)
    if not job.series:
        _edit_folder(folder, scratch, plan)
        return scratch, job
    renamed = []
    for series in job.series:
        part = scratch / ".series"
        make_dir(part)
        name = _edit_folder(folder / series, part, plan) or series
        part.rename(scratch / name)
        renamed.append(name)
    return scratch, replace(job, series=tuple(renamed))


def _edit_folder(source: Path, destination: Path, plan: EditPlan) -> str:
    """Edit every instance of `source` into `destination`; the (new) series' folder name,
    or "" when the header was not edited (the name stays)."""
    series = ""
    for path in sorted(source.glob(f"*{INSTANCE_SUFFIX}")):
        if plan.rewrites:
            name, series_uid = _rewrite(path, destination, plan)
            series = series or series_uid
        else:
            name = path.stem
            _convert(path, destination / f"{name}{INSTANCE_SUFFIX}", plan)
        written = destination / f"{name}{INSTANCE_SUFFIX}"
        try:
            tags = read_tags(written)
        except UnreadableDicom as exc:
            raise EditFailed(
                f"{path.name}: edited copy unreadable ({exc})", permanent=True
            ) from None
        write_new(destination / f"{name}{SIDECAR_SUFFIX}", json_bytes(tags))
    return series


def _rewrite(path: Path, destination: Path, plan: EditPlan) -> tuple[str, str]:
    """Read, edit and write one instance (then convert it); its new file stem and series."""
    try:
        dataset = dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise EditFailed(f"{path.name}: cannot be read ({exc})", permanent=True) from None
    try:
        plan.edit(dataset)
    except DeidentificationRefused as exc:
        raise EditFailed(f"{path.name}: {exc.reason}", permanent=True) from None
    except ModifyError as exc:  # a value this instance's character set cannot hold
        raise EditFailed(f"{path.name}: modify: {exc}", permanent=True) from None
    name = safe_name(str(dataset.SOPInstanceUID))
    series = safe_name(str(dataset.get("SeriesInstanceUID", "")))
    final = destination / f"{name}{INSTANCE_SUFFIX}"
    if plan.syntax is None:
        dataset.save_as(final, enforce_file_format=True)
        return name, series
    edited = destination / f".{name}.edited"
    dataset.save_as(edited, enforce_file_format=True)
    try:
        _convert(edited, final, plan, shown=path.name)
    finally:
        edited.unlink(missing_ok=True)
    return name, series


def _convert(path: Path, final: Path, plan: EditPlan, *, shown: str = "") -> None:
    """`path` as `final` in the plan's syntax: linked when it is in that syntax already."""
    assert plan.syntax is not None
    try:
        same = read_instance(path).transfer_syntax == plan.syntax
    except InstanceNotSendable as exc:
        raise EditFailed(f"{shown or path.name}: {exc.reason}", permanent=True) from None
    if same:
        os.link(path, final, follow_symlinks=False)
        return
    try:
        transcode_file(path, final, plan.syntax, allow_lossy=plan.allow_lossy)
    except TranscodeError as exc:
        raise EditFailed(f"{shown or path.name}: {exc.reason}", permanent=True) from None
