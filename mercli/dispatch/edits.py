"""Per-target edits at dispatch time (SPEC §5.1): the job's own copies, never the spool's.

A target with `deidentify = "basic"` gets a private, de-identified copy of the job, made in
the dispatching worker's scratch folder for this attempt and removed after it: every instance
read, de-identified (`mercli.deid`, keyed by the target's `pseudonym_secret_file`), and
written under its new SOP Instance UID, with a sidecar made from the new header; a study
job's series sub-folders are named by their new Series Instance UIDs. The received files and
every other target's hard links are never touched. The keyed hash is deterministic, so a
retry makes the same names and `dispatch.json` stays true across attempts.

An instance that cannot be de-identified (BurnedInAnnotation = YES without
`allow_burned_in`, an unreadable header) fails the job for good with the instance named: it
is never sent unedited.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from mercli.deid.core import deidentify
from mercli.deid.model import DeidentificationRefused, Profile, ProfileError, load_secret
from mercli.fsutil import make_dir, write_new
from mercli.jobs import JobInfo, Target
from mercli.names import safe_name
from mercli.secrets import SecretError
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX
from mercli.spool.items import json_bytes
from mercli.tags import UnreadableDicom, read_tags


class EditFailed(Exception):
    """The job cannot be edited as its target asks; `permanent`: retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


def profile_of(target: Target) -> Profile:
    """The target's profile, its secret read now (so a rotated file is used next attempt)."""
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
    """The job de-identified into `scratch` (made here), and the JobInfo that describes it
    (a study job's new series sub-folders)."""
    profile = profile_of(job.target)
    make_dir(scratch)
    if not job.series:
        _edit_folder(folder, scratch, profile)
        return scratch, job
    renamed = []
    for series in job.series:
        part = scratch / "series"
        make_dir(part)
        name = _edit_folder(folder / series, part, profile)
        (part).rename(scratch / name)
        renamed.append(name)
    return scratch, replace(job, series=tuple(renamed))


def _edit_folder(source: Path, destination: Path, profile: Profile) -> str:
    """De-identify every instance of `source` into `destination`; the new series' name."""
    series = ""
    for path in sorted(source.glob(f"*{INSTANCE_SUFFIX}")):
        try:
            dataset = dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise EditFailed(f"{path.name}: cannot be read ({exc})", permanent=True) from None
        try:
            deidentify(dataset, profile)
        except DeidentificationRefused as exc:
            raise EditFailed(f"{path.name}: {exc.reason}", permanent=True) from None
        name = safe_name(str(dataset.SOPInstanceUID))
        series = series or safe_name(str(dataset.get("SeriesInstanceUID", "")))
        target = destination / f"{name}{INSTANCE_SUFFIX}"
        dataset.save_as(target, enforce_file_format=True)
        try:
            tags = read_tags(target)
        except UnreadableDicom as exc:
            raise EditFailed(
                f"{path.name}: edited copy unreadable ({exc})", permanent=True
            ) from None
        write_new(destination / f"{name}{SIDECAR_SUFFIX}", json_bytes(tags))
    return series or "series"
