"""Reading sidecars from DICOM files: the fast scan for receive's hot path, pydicom for the rest.

The sidecar format itself is specified in `mercli.tags`.

Reading (`read_tags`) is built for `receive`'s hot path. The data set is scanned element by
element with `struct`, keeping only the bytes of the wanted elements (plus Specific Character
Set), and the scan stops at the first top-level tag above the highest tag wanted (by default
NumberOfFrames (0028,0008)): pixel data, the private groups after it and large per-frame
sequences are never read, and a 1 GB multi-frame file costs a 64 KiB read. This relies on the
ascending tag order PS3.5 §7.1 requires. Values are converted from their bytes by rules that
mirror pydicom's converters (`pydicom.values`) and with pydicom's `decode_bytes` for character
sets; the tests hold the result equal to `pydicom.dcmread` on pydicom's whole test corpus.
A data set whose first element contradicts the transfer syntax (explicit VR under an implicit
syntax, or the reverse) is read as its first element says, as pydicom and DCMTK do. Anything
else the fast scan does not handle (no Part 10 header, big endian, deflate, unknown VRs,
command sets) goes through `pydicom.filereader.read_partial` with the same stop rule.

Errors: anything that is not readable DICOM raises `UnreadableDicom` (exit code 1), never a
pydicom, struct or OS exception. A file cut short inside the part we scan is unreadable; one cut
short after it (say, inside the pixel data) gives the full sidecar, since nothing in the sidecar
is missing or wrong. The same damage is unreadable whichever reader meets it, and in
`getdcmtags` too (DCMTK): an element header or value (also one skipped) that runs past the end
of the data, undefined-length sequences nested more than 64 deep, a defined-length sequence
whose value is not items, a text or number value of undefined length.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from mercli.tags.scan import MAX_DEPTH, UNDEFINED, VR_NAMES, Fallback, Raw, Short, scan_part10
from mercli.tags.spec import (
    CHARSET,
    Plan,
    UnreadableDicom,
    plan_for,
    tag_key,
)
from mercli.tags.values import (
    convert_element,
    convert_raw,
    dictionary_vr,
    python_encodings,
    vr_kind,
)

__all__ = ["extract_tags", "read_tags"]

_FIRST_READ = 64 * 1024  # enough for the header of nearly every instance
_MAX_IN_MEMORY = 16 * 1024 * 1024  # past this, a header that does not fit goes to pydicom
_RAW_START_GROUPS = frozenset({0x0000, 0x0002, 0x0008})  # how a data set without header begins


def read_tags(
    source: str | os.PathLike[str] | BinaryIO, *, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """The sidecar object (SPEC §3) of a DICOM file, read as little of the file as possible.

    `source` is a path or a binary file object positioned at the start of the DICOM data: a
    Part 10 file, or a bare data set (no preamble) beginning with group 0000, 0002 or 0008.
    Raises `UnreadableDicom` for anything that is not readable DICOM, including an empty
    sidecar; `InvalidTag` for a bad `extra`.
    """
    plan = plan_for(tuple(extra))
    try:
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as fp:
                sidecar = _read(fp, plan)
        else:
            sidecar = _read(source, plan)
    except OSError as exc:
        raise UnreadableDicom(exc.strerror or str(exc)) from exc
    if not sidecar:
        raise UnreadableDicom("no DICOM attributes found")
    return sidecar


def _read(fp: BinaryIO, plan: Plan) -> dict[str, Any]:
    start = fp.tell()
    size = fp.seek(0, io.SEEK_END) - start
    fp.seek(start)
    buf = fp.read(min(size, _FIRST_READ))
    size = size if len(buf) == min(size, _FIRST_READ) else len(buf)
    if buf[128:132] != b"DICM":
        if not _looks_like_data_set(buf):
            raise UnreadableDicom("not a DICOM file: no DICM prefix and no data set")
        return _read_with_pydicom(_whole(fp, start, buf, size), plan, force=True)
    while True:
        try:
            return _sidecar(scan_part10(buf, plan, complete=len(buf) >= size), plan)
        except Fallback:
            return _read_with_pydicom(_whole(fp, start, buf, size), plan, force=False)
        except Short:
            if len(buf) >= size:
                message = f"truncated: the data ends inside an element (at byte {size})"
                raise UnreadableDicom(message) from None
            if len(buf) >= _MAX_IN_MEMORY:  # a huge header: let pydicom stream it
                fp.seek(start)
                return _read_with_pydicom(fp, plan, force=False)
            fp.seek(start)
            buf = fp.read(min(size, _MAX_IN_MEMORY))


def _whole(fp: BinaryIO, start: int, buf: bytes, size: int) -> BinaryIO:
    """A stream for pydicom: the whole input in memory when small, else the file itself."""
    if size <= _MAX_IN_MEMORY:
        return io.BytesIO(buf + fp.read(size - len(buf)))
    fp.seek(start)
    return fp


def _looks_like_data_set(buf: bytes) -> bool:
    if len(buf) < 8:
        return False
    little, big = struct.unpack_from("<H", buf)[0], struct.unpack_from(">H", buf)[0]
    return little in _RAW_START_GROUPS or big in _RAW_START_GROUPS


def _sidecar(elements: Raw, plan: Plan) -> dict[str, Any]:
    """Convert the scanned raw elements, in sidecar order."""
    charset = elements.get(CHARSET)
    try:
        encodings = python_encodings(charset[1]) if charset else (default_encoding,)
    except Exception as exc:  # only with pydicom's reading_validation_mode = RAISE
        raise UnreadableDicom(f"cannot decode SpecificCharacterSet: {exc}") from exc
    sidecar: dict[str, Any] = {}
    for key, tag in plan.raw_fields:
        found = elements.get(tag)
        if found is None:
            continue
        written, data = found
        vr = VR_NAMES.get(written) if written is not None else None
        if vr is None or vr == "UN":
            vr = dictionary_vr(tag)
        try:
            value = convert_raw(vr, data, encodings)
        except Exception as exc:  # pydicom's decoder fed untrusted bytes; see module doc
            raise UnreadableDicom(f"cannot decode {key} {tag_key(tag)}: {exc}") from exc
        if value is not None:
            sidecar[key] = value
    return sidecar


def _read_with_pydicom(fp: BinaryIO, plan: Plan, *, force: bool) -> dict[str, Any]:
    """The slow path. All elements up to the stop are read (not only the wanted ones), so
    that sequences stay in the data set for the nesting check the fast scan also makes."""
    bounded = _Bounded(fp)
    try:
        ds = read_partial(bounded, plan.stop_when, force=force)  # type: ignore[arg-type]
    except Exception as exc:  # pydicom raises a dozen types on bad input; see module doc
        raise UnreadableDicom(f"cannot parse DICOM data ({type(exc).__name__}: {exc})") from exc
    if bounded.cut_short:
        message = f"truncated: the data ends inside an element (at byte {bounded.end})"
        raise UnreadableDicom(message)
    _check_structure(ds, plan, 0)
    return _extract(ds, ds.file_meta, None, plan)


def _check_structure(ds: Dataset, plan: Plan, depth: int) -> None:
    """What pydicom reads but the fast scan and DCMTK reject: undefined-length sequences
    nested too deeply, and a wanted value (text, numbers) of undefined length, which pydicom
    reads up to the next sequence delimiter it happens to find."""
    for tag in list(ds.keys()):  # get_item may replace an element while we iterate
        try:
            element = ds.get_item(tag)  # converts a few raw elements (odd VRs): may fail
        except Exception:  # not a sequence, then; a wanted one fails again in _extract
            continue
        if isinstance(element, RawDataElement):
            if depth == 0 and element.tag in plan.wanted and element.length == UNDEFINED:
                vr = element.VR if element.VR not in (None, "UN") else dictionary_vr(element.tag)
                if vr_kind(str(vr)) is not None:
                    raise UnreadableDicom(f"undefined length on a {vr} value ({element.tag})")
        elif element.VR == "SQ" and element.is_undefined_length:
            if depth + 1 > MAX_DEPTH:
                raise UnreadableDicom("sequences nested too deeply")
            for item in element.value:
                _check_structure(item, plan, depth + 1)


class _Bounded:
    """A stream for pydicom that notices what pydicom silently accepts: an element header or
    value that runs past the end of the data (pydicom reads the short bytes, or skips past the
    end, and stops there as if the data set were complete). The fast scan rejects those; so
    does this, so that the way a file is read never changes whether it is readable."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self._start = fp.tell()
        self.end = fp.seek(0, io.SEEK_END)
        fp.seek(self._start)
        self.cut_short = False
        self.name = getattr(fp, "name", None)

    def read(self, size: int = -1) -> bytes:
        pos = self._fp.tell()
        data = self._fp.read(size)
        if 0 < size != len(data) and pos != self.end:  # at the very end: how pydicom stops
            self.cut_short = True
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = self._fp.seek(offset, whence)
        if pos < self.end:  # a look-ahead that went back (preamble, delimiter search): fine
            self.cut_short = False
        return pos

    def tell(self) -> int:
        return self._fp.tell()


def extract_tags(
    ds: Dataset, *, transfer_syntax: str | None = None, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """The sidecar object (SPEC §3) for a dataset, e.g. the one a C-STORE request carries.

    TransferSyntaxUID is `transfer_syntax` when given, else the one in `ds.file_meta`.
    `extra` adds keywords or tags (`PatientWeight`, `(0019,100A)`, `0019100A`); an unknown one
    raises `InvalidTag`. An element that cannot be decoded at all raises `UnreadableDicom`.
    Elements pydicom has not converted yet are converted from their bytes, which is several
    times faster than letting pydicom do it and gives the same result.
    """
    meta = getattr(ds, "file_meta", None)
    return _extract(ds, meta, transfer_syntax, plan_for(tuple(extra)))


def _extract(
    ds: Dataset, meta: Dataset | None, transfer_syntax: str | None, plan: Plan
) -> dict[str, Any]:
    sidecar: dict[str, Any] = {}
    present = ds.keys()
    meta_present = meta.keys() if meta is not None else set()
    for key, tag in plan.fields:
        if transfer_syntax and key == "TransferSyntaxUID":
            sidecar[key] = str(transfer_syntax)
            continue
        if tag in present:
            source = ds
        elif tag in meta_present and meta is not None:
            source = meta
        else:
            continue
        try:
            value = _value(source, tag)
        except UnreadableDicom:
            raise
        except Exception as exc:  # a third-party decoder fed untrusted bytes; see module doc
            raise UnreadableDicom(f"cannot decode {key} {tag}: {exc}") from exc
        if value is not None:
            sidecar[key] = value
    return sidecar


def _value(ds: Dataset, tag: BaseTag) -> Any:
    element = ds.get_item(tag)
    if isinstance(element, RawDataElement) and element.is_little_endian:
        vr = element.VR
        if vr is None or vr == "UN":
            vr = dictionary_vr(tag)
        return convert_raw(vr, element.value or b"", _encodings(ds))
    converted = ds[tag]
    return convert_element(converted.VR, converted.value)


def _encodings(ds: Dataset) -> Sequence[str]:
    """The Python codecs pydicom would decode `ds`'s text with."""
    charset = ds.original_character_set
    if not charset:
        specific = ds.get("SpecificCharacterSet")
        charset = convert_encodings(specific) if specific else default_encoding
    return [charset] if isinstance(charset, str) else charset
