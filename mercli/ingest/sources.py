"""Which files an ingest reads: paths, folders, DICOMDIRs — and which it refuses to.

- A path named on the command line is read even if it is a symlink (the admin named it).
- In a folder, entries are taken in name order; sub-folders only with `recursive`. Symlinks
  met while walking are never followed (skipped and counted), nor are FIFOs, sockets or
  devices: a walk never leaves the tree it was given. Names starting with `.` are skipped.
- A file named `DICOMDIR` (PS3.10 fixes that name) is read for the files it references;
  a reference with an empty, `.` or `..` component, a separator, or that resolves (symlinks
  included) outside the DICOMDIR's folder is refused and counted as a failure. On a CD
  mounted with lower-case names, a referenced `IMAGES/IM0001` is found as `images/im0001`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mercli.names import printable


@dataclass(frozen=True)
class Candidate:
    """A file to read; `follow`: it was named explicitly, so a symlink may be followed."""

    path: Path
    follow: bool = False


@dataclass(frozen=True)
class Skipped:
    """Something that is not read, on purpose (a symlink met in a walk, a FIFO)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Refused:
    """Something that should have been read and cannot be (counts as a failure)."""

    path: Path
    reason: str


Entry = Candidate | Skipped | Refused


def walk(paths: Iterable[Path], *, recursive: bool, max_dicomdir: int) -> Iterator[Entry]:
    """Every entry to consider under `paths`, in order; DICOMDIRs are expanded."""
    for path in paths:
        try:
            info = os.stat(path)  # named explicitly: follow a symlink
        except OSError as exc:
            yield Refused(path, f"cannot read: {exc.strerror or exc}")
            continue
        if stat.S_ISDIR(info.st_mode):
            yield from _folder(path, recursive, max_dicomdir)
        elif path.name.upper() == "DICOMDIR":
            yield from _dicomdir(path, max_dicomdir)
        else:
            yield Candidate(path, follow=True)


def _folder(folder: Path, recursive: bool, max_dicomdir: int) -> Iterator[Entry]:
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as exc:
        yield Refused(folder, f"cannot list: {exc.strerror or exc}")
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            yield Skipped(path, "symlink (not followed)")
        elif entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from _folder(path, recursive, max_dicomdir)
        elif not entry.is_file(follow_symlinks=False):
            yield Skipped(path, "not a regular file")
        elif entry.name.upper() == "DICOMDIR":
            yield from _dicomdir(path, max_dicomdir)
        else:
            yield Candidate(path)


def _dicomdir(path: Path, max_size: int) -> Iterator[Entry]:
    """The files a DICOMDIR references, each checked to stay inside its folder."""
    try:
        references = read_dicomdir(path, max_size)
    except (OSError, ValueError) as exc:
        yield Refused(path, f"unreadable DICOMDIR: {exc}")
        return
    root = path.parent
    real_root = os.path.realpath(root)
    for components in references:
        shown = printable("/".join(components), 200)
        if not _safe_components(components):
            yield Refused(path, f"DICOMDIR references {shown}: outside its folder, refused")
            continue
        found = _find(root, components)
        if found is None:
            yield Refused(path, f"DICOMDIR references {shown}: no such file")
            continue
        real = os.path.realpath(found)
        if os.path.commonpath([real_root, real]) != real_root:
            yield Refused(path, f"DICOMDIR references {shown}: leads outside its folder, refused")
            continue
        yield Candidate(Path(real), follow=True)


def read_dicomdir(path: Path, max_size: int) -> list[list[str]]:
    """The ReferencedFileID of every directory record, as path components (ValueError)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    size = os.stat(path).st_size
    if size > max_size:
        raise ValueError(f"{size} bytes, more than the limit ({max_size})")
    try:
        ds = dcmread(path, force=True)
        records = ds.get("DirectoryRecordSequence") or []
    except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise ValueError(str(exc)) from exc
    references = []
    for record in records:
        value = record.get("ReferencedFileID")
        if value is None:
            continue
        parts = [value] if isinstance(value, str) else list(value)
        references.append([str(part) for part in parts])
    return references


def _safe_components(components: list[str]) -> bool:
    return bool(components) and all(
        part and part not in (".", "..") and not any(c in part for c in "/\\\x00")
        for part in components
    )


def _find(root: Path, components: list[str]) -> Path | None:
    """The referenced file, matching each component exactly or else case-insensitively."""
    current = root
    for part in components:
        exact = current / part
        if os.path.lexists(exact):
            current = exact
            continue
        try:
            names = os.listdir(current)
        except OSError:
            return None
        matches = [name for name in names if name.upper() == part.upper()]
        if len(matches) != 1:
            return None
        current = current / matches[0]
    return current if os.path.isfile(current) else None
