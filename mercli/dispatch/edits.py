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

The pixel data is never decoded, nor even read into memory: an instance is read with its
large values left in the file (`DEFER_SIZE`), and written (`save`) as pydicom's `save_as`
would write it (the same bytes: the tests hold the two equal on pydicom's corpus), but with
the Pixel Data's value copied from the received file by the kernel; elements after Pixel
Data are de-identified and written as any other. Whatever that writer does not handle (big
endian, deflate, an odd length, pixel data that was edited or is small) goes through
`save_as`. The sidecar is read from the header bytes written (every tag a sidecar holds
comes before Pixel Data), and written unsynced, as the copy is: it lives for this attempt
only, and a target that keeps it copies and syncs it.

A series of `HELPER_MIN` instances or more is split in two when an edit helper is idle
(`mercli.dispatch.helpers`: processes the dispatcher forked before its threads started): the
helper edits (or converts) the second half into the same scratch folder while this thread
does the first, so a de-identified CT takes two cores, not one. Its failure is the same
failure as here (the instance named, permanent or not); a helper that dies or does not answer
by `helper_deadline` fails the attempt, to be retried.

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

import errno
import hashlib
import hmac
import io
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.fileutil import read_undefined_length_value
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import SequenceDelimiterTag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from mercli.deid.core import deidentify
from mercli.deid.model import DeidentificationRefused, Profile, ProfileError, load_secret
from mercli.dicom.convert import TranscodeError, transcode_file
from mercli.dicom.modify import Modification, ModifyError, apply_modify, parse_modify
from mercli.dicom.scu.transcode import InstanceNotSendable, read_instance
from mercli.dispatch import helpers
from mercli.dispatch.helpers import HELPER_MIN, Answer, HelperLost, Request
from mercli.fsutil import fsync_all, give_file_mode, make_dir, open_new, unlink_quietly
from mercli.jobs import JobInfo, Target
from mercli.names import safe_name
from mercli.secrets import SecretError
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX
from mercli.spool.items import json_bytes
from mercli.tags import UnreadableDicom, read_tags

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

DEFER_SIZE = 64 * 1024  # values larger than this stay in the received file until written
PIXEL_DATA = 0x7FE00010
ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
COPY_CHUNK = 1024 * 1024
META_UIDS = (
    ("MediaStorageSOPClassUID", "SOPClassUID"),
    ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
)


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

    def fingerprint(self) -> str:
        """What this plan does, the secret included (keyed, never shown): an edit helper
        that built its own plan from the job compares it with the worker's, so a secret
        rotated between the two never splits one series between two keys."""
        profile = self.profile
        secret = profile.secret if profile is not None else b""
        shown = (profile.options, profile.allow_burned_in, profile.keep_private) if profile else ()
        parts = repr((shown, self.modifications, self.syntax, self.allow_lossy))
        return hmac.new(secret, parts.encode(), hashlib.sha256).hexdigest()

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
    (a study job's new series sub-folders).

    Every file of the copy is new (never a link to the spool's), so a folder target may take
    the copy by hard links (`private_links`) instead of writing it a second time."""
    plan = EditPlan.of(job.target)
    make_dir(scratch)
    if not job.series:
        _edit_folder(folder, folder, scratch, plan)
        return scratch, private_links(job, scratch)
    renamed = []
    for series in job.series:
        part = scratch / ".series"
        make_dir(part)
        name = _edit_folder(folder, folder / series, part, plan) or series
        part.rename(scratch / name)
        renamed.append(name)
    return scratch, private_links(replace(job, series=tuple(renamed)), scratch)


def private_links(job: JobInfo, scratch: Path) -> JobInfo:
    """A folder target gets the private copy by hard links where DEST is on the spool's
    filesystem (else copies): the copy is the job's alone and deleted after the attempt, so
    DEST shares an inode with nothing. Its files are fsync'ed here, all at once, as the
    folder target expects of files it links (it fsyncs DEST's folders itself)."""
    if job.target.type != "folder":
        return job
    fsync_all([path for path in scratch.rglob("*") if path.is_file()])
    return replace(job, target=replace(job.target, link=True))


def _edit_folder(job: Path, source: Path, destination: Path, plan: EditPlan) -> str:
    """Edit every instance of `source` (a folder of the job at `job`) into `destination`;
    the (new) series' folder name, or "" when the header was not edited (the name stays).
    Half of a large series goes to an edit helper when one is idle."""
    paths = sorted(source.glob(f"*{INSTANCE_SUFFIX}"))
    pool = helpers.current()
    large = len(paths) >= HELPER_MIN
    helper = pool.take() if pool is not None and large else None
    if pool is None or helper is None:
        return edit_paths(paths, destination, plan)
    half = len(paths) // 2
    request = Request(str(job), str(source), half, str(destination), plan.fingerprint())
    try:
        helper.send(request)
    except HelperLost as exc:
        pool.lose(helper, str(exc))
        return edit_paths(paths, destination, plan)
    started = time.monotonic()
    series, own_error = "", None
    try:
        series = edit_paths(paths[:half], destination, plan)
    except Exception as exc:  # the helper finishes its half first: then it is idle again
        own_error = exc
    except BaseException:
        pool.lose(helper, "its worker stopped mid-series")
        raise
    try:
        answer = helper.receive(helper_deadline(time.monotonic() - started))
    except HelperLost as exc:
        pool.lose(helper, str(exc))
        if own_error is not None:
            raise own_error from None
        raise EditFailed(str(exc), permanent=False) from None
    pool.give_back(helper)
    if own_error is not None:
        raise own_error
    _raise_what_stopped(answer)  # as if met here
    if answer.edited != len(paths) - half:
        raise EditFailed(
            f"the edit helper edited {answer.edited} of {len(paths) - half} instances",
            permanent=False,
        )
    log.debug("%s: %d of %d instances edited by helper", source.name, answer.edited, len(paths))
    return series or answer.series


def serve_request(request: Request) -> Answer:
    """In an edit helper (`mercli.dispatch.helpers`): edit what `request` asks, with the
    plan built from the job's own job.json, if it is the worker's (`EditPlan.fingerprint`)."""
    try:
        job = Path(request.job)
        plan = EditPlan.of(JobInfo.load(job.name, job).target)
        if plan.fingerprint() != request.fingerprint:
            raise EditFailed(
                "the target's edits or secret changed during the attempt", permanent=False
            )
        paths = sorted(Path(request.source).glob(f"*{INSTANCE_SUFFIX}"))[request.start :]
        series = edit_paths(paths, Path(request.destination), plan)
        return Answer(series=series, edited=len(paths))
    except EditFailed as exc:
        return Answer(error=str(exc) or "the edit helper failed", permanent=exc.permanent)
    except OSError as exc:
        return Answer(
            error=exc.strerror or str(exc) or repr(exc),
            errno=exc.errno if exc.errno is not None else errno.EIO,
            filename=None if exc.filename is None else str(exc.filename),
        )


def _raise_what_stopped(answer: Answer) -> None:
    """Raise what stopped a helper, as the worker would have met it."""
    if answer.errno is not None:
        raise OSError(answer.errno, answer.error, answer.filename)
    if answer.error:
        raise EditFailed(answer.error, permanent=answer.permanent)


def helper_deadline(own: float) -> float:
    """Seconds a helper may still take once this thread has edited its own half in `own`
    seconds: ten times that, and never under a minute (a loaded disk is no hang)."""
    return max(60.0, 10 * own)


def edit_paths(paths: list[Path], destination: Path, plan: EditPlan) -> str:
    """Edit `paths` into `destination` in this process: the (new) series' folder name, or ""
    (see `_edit_folder`). A failure no check foresaw (pydicom refusing a value, say) fails
    the job for good naming the instance, as a refused one does."""
    series = ""
    for path in paths:
        try:
            edited = _edit_one(path, destination, plan)
        except (EditFailed, OSError, MemoryError, RecursionError):
            raise  # the last two: this machine, not the instance (retried)
        except Exception as exc:
            raise EditFailed(f"{path.name}: cannot be edited ({exc!r})", permanent=True) from exc
        series = series or edited
    return series


def _edit_one(path: Path, destination: Path, plan: EditPlan) -> str:
    """One instance and its sidecar; the series it is in once edited ("" if unedited)."""
    header, series = None, ""
    if plan.rewrites:
        name, series, header = _rewrite(path, destination, plan)
    else:
        name = path.stem
        _convert(path, destination / f"{name}{INSTANCE_SUFFIX}", plan)
    written = destination / f"{name}{INSTANCE_SUFFIX}"
    try:  # the header holds every tag a sidecar has: they all come before Pixel Data
        tags = read_tags(io.BytesIO(header) if header is not None else written)
    except UnreadableDicom as exc:
        raise EditFailed(f"{path.name}: edited copy unreadable ({exc})", permanent=True) from None
    _write_scratch(destination / f"{name}{SIDECAR_SUFFIX}", json_bytes(tags))
    return series


def _rewrite(path: Path, destination: Path, plan: EditPlan) -> tuple[str, str, bytes | None]:
    """Read, edit and write one instance (then convert it); its new file stem and series,
    and the bytes before its Pixel Data when they are all it was written from (see `save`)."""
    try:
        dataset = dcmread(path, defer_size=DEFER_SIZE)
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
        return name, series, save(dataset, path, final)
    edited = destination / f".{name}.edited"
    save(dataset, path, edited)
    try:
        _convert(edited, final, plan, shown=path.name)
    finally:
        edited.unlink(missing_ok=True)
    return name, series, None


def _convert(path: Path, final: Path, plan: EditPlan, *, shown: str = "") -> None:
    """`path` as `final` in the plan's syntax: copied as it is when it is in that syntax
    already (a copy, not a link: the copy may be linked into a folder target's DEST, which
    must never share an inode with the spool)."""
    assert plan.syntax is not None
    try:
        same = read_instance(path).transfer_syntax == plan.syntax
    except InstanceNotSendable as exc:
        raise EditFailed(f"{shown or path.name}: {exc.reason}", permanent=True) from None
    if same:
        shutil.copyfile(path, final, follow_symlinks=False)
        give_file_mode(final)
        return
    try:
        transcode_file(path, final, plan.syntax, allow_lossy=plan.allow_lossy)
    except TranscodeError as exc:
        raise EditFailed(f"{shown or path.name}: {exc.reason}", permanent=True) from None


# -- writing without reading the pixel data ----------------------------------------------------


class _Unusual(Exception):
    """Not an instance `_Copy` handles: `save_as` writes it."""


def save(dataset: Dataset, source: Path, path: Path) -> bytes | None:
    """Write `dataset`, read from `source` with `DEFER_SIZE`, as a new Part 10 file at `path`,
    as `dataset.save_as(path, enforce_file_format=True)` does; the bytes before Pixel Data
    when its value was copied from `source` (None when `save_as` wrote it all)."""
    try:
        copy = _Copy.of(dataset, source)
    except _Unusual:
        dataset.save_as(path, enforce_file_format=True)
        return None
    copy.write(path)
    return copy.header


@dataclass(frozen=True)
class _Copy:
    """An edited instance as `dcmwrite` (enforce_file_format) would write it, its Pixel Data
    still in the received file: `header` (preamble, file meta and the elements before Pixel
    Data), then Pixel Data's element header, `size` bytes of `source` from `start`, `tail`
    (the sequence delimiter of encapsulated pixel data, the elements after it)."""

    header: bytes
    pixel: bytes
    source: Path
    start: int
    size: int
    tail: bytes

    @classmethod
    def of(cls, dataset: Dataset, source: Path) -> _Copy:
        """For a little-endian data set whose Pixel Data is still in `source` (deferred);
        `_Unusual` for anything else. The file meta is the dataset's own, updated as
        `dcmwrite` updates its deep copy of it."""
        element = dataset.get_item(PIXEL_DATA, keep_deferred=True)
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        if (
            not isinstance(element, RawDataElement)
            or element.value is not None
            or not element.is_little_endian
            or syntax is None
            or syntax.is_private
            or not syntax.is_transfer_syntax
            or not syntax.is_little_endian
            or syntax == DeflatedExplicitVRLittleEndian
            or dataset.original_encoding != (syntax.is_implicit_VR, True)
            or element.is_implicit_VR != syntax.is_implicit_VR
            or dataset.original_character_set != dataset._character_set  # else re-encoded
            or (element.length == 0xFFFFFFFF) != syntax.is_compressed
            or any(tag.group in (0, 2) for tag in sorted(dataset.keys()))  # save_as refuses
            or len(getattr(dataset, "preamble", None) or b"\0" * 128) != 128
        ):
            raise _Unusual
        vr = None if syntax.is_implicit_VR else element.VR  # implicit: no VR written
        if vr not in (None, "OB", "OW"):
            raise _Unusual
        start, size = element.value_tell, int(element.length)
        if syntax.is_compressed:
            with open(source, "rb") as fp:
                size = _pixel_length(fp, element)
                fp.seek(start)
                if fp.read(4) != ITEM:
                    raise _Unusual  # save_as refuses it: let it say why
        if size % 2 or start + size > os.stat(source).st_size:
            raise _Unusual
        header, tail = _encode(dataset, syntax.is_implicit_VR)
        pixel = struct.pack("<HH", 0x7FE0, 0x0010) + (vr.encode() + b"\0\0" if vr else b"")
        pixel += struct.pack("<L", element.length)
        if syntax.is_compressed:
            tail = SEQUENCE_END + tail
        return cls(header, pixel, source, start, size, tail)

    def write(self, path: Path) -> None:
        """The new file at `path`, not synced (see `_write_scratch`)."""
        with open(self.source, "rb") as fp:
            fd = open_new(path)
            try:
                _write_all(fd, self.header + self.pixel)
                _copy(fp.fileno(), fd, self.start, self.size)
                _write_all(fd, self.tail)
            except BaseException:
                os.close(fd)
                unlink_quietly(path)
                raise
            os.close(fd)


def _pixel_length(fp: io.BufferedReader, element: RawDataElement) -> int:
    """The length of the deferred, undefined-length Pixel Data's value as pydicom reads it:
    the bytes before its sequence delimiter."""
    fp.seek(element.value_tell)
    try:
        read_undefined_length_value(fp, True, SequenceDelimiterTag, defer_size=0)
    except EOFError:
        raise _Unusual from None
    return fp.tell() - 8 - element.value_tell


def _encode(dataset: Dataset, implicit: bool) -> tuple[bytes, bytes]:
    """The preamble, file meta and elements before Pixel Data, and the elements after it, as
    `dcmwrite` (enforce_file_format) and `write_dataset` encode them."""
    meta = dataset.file_meta  # ours: dcmwrite's deep copy is for callers who keep theirs
    for key, own in META_UIDS:
        found, wanted = meta.get(key), dataset.get(own)
        if found is None or (wanted and wanted != found):
            setattr(meta, key, wanted)
    parts = [DicomBytesIO(), DicomBytesIO()]
    for part in parts:
        part.is_implicit_VR, part.is_little_endian = implicit, True
    parts[0].write((getattr(dataset, "preamble", None) or b"\0" * 128) + b"DICM")
    write_file_meta_info(parts[0], meta, enforce_standard=True)
    encodings = dataset.get("SpecificCharacterSet", default_encoding)
    for tag in sorted(dataset.keys()):
        if (tag.element == 0 and tag.group > 6) or tag == PIXEL_DATA:  # group lengths: retired
            continue
        element = dataset.get_item(tag)
        raw = _raw_bytes(element, implicit)
        if raw is None:
            write_data_element(parts[tag > PIXEL_DATA], element, encodings)
        else:
            parts[tag > PIXEL_DATA].write(raw)
    return parts[0].getvalue(), parts[1].getvalue()


def _raw_bytes(element: DataElement | RawDataElement, implicit: bool) -> bytes | None:
    """A raw element of defined length as `write_data_element` writes it (its bytes as read),
    without its per-element buffers; None for anything else."""
    if not isinstance(element, RawDataElement) or element.length == 0xFFFFFFFF:
        return None
    value, vr = element.value, element.VR
    if not isinstance(value, bytes):
        return None
    tag = struct.pack("<HH", element.tag >> 16, element.tag & 0xFFFF)
    if implicit:
        return tag + struct.pack("<L", len(value)) + value
    if vr in EXPLICIT_VR_LENGTH_32:
        return tag + vr.encode() + b"\0\0" + struct.pack("<L", len(value)) + value
    if vr is None or len(vr) != 2 or len(value) > 0xFFFF:  # pydicom raises, or writes UN
        return None
    return tag + vr.encode() + struct.pack("<H", len(value)) + value


def _write_scratch(path: Path, data: bytes) -> None:
    """A new file in the scratch folder: neither synced nor written back (it is deleted after
    the attempt; a target that keeps it copies and syncs it)."""
    fd = open_new(path)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy(source: int, fd: int, offset: int, size: int) -> None:
    """`size` bytes of `source` from `offset` appended to `fd`, by the kernel where it can."""
    try:
        while size:
            done = os.copy_file_range(source, fd, size, offset)
            if not done:
                raise OSError(errno.EIO, "the received file changed while copied")
            offset, size = offset + done, size - done
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while size:  # a filesystem or kernel without copy_file_range
        chunk = os.pread(source, min(size, COPY_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, "the received file changed while copied")
        _write_all(fd, chunk)
        offset, size = offset + len(chunk), size - len(chunk)
