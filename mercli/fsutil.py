"""Filesystem primitives the spool protocol is built from: durable writes and no-clobber renames.

Everything here is about what survives a crash or a power cut: data is fsync'ed before it is
renamed into view, and the directory is fsync'ed after, so a rename that a reader has seen is
also one the disk will still show after a reboot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

_renameat2: Any
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _c_int, _c_str = ctypes.c_int, ctypes.c_char_p
    _renameat2.argtypes = [_c_int, _c_str, _c_int, _c_str, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - glibc < 2.28 or not Linux
    _renameat2 = None

_noreplace_supported = _renameat2 is not None


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename src to dst atomically, failing with FileExistsError if dst exists.

    Plain rename(2) silently replaces a file or an empty directory at dst; for claims and for
    publishing items under unique names that would be a lost update. Uses renameat2 with
    RENAME_NOREPLACE; on filesystems without it, falls back to link+unlink for files and a
    checked rename for directories (documented as weaker in the README).
    """
    global _noreplace_supported
    if _noreplace_supported and _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
        _noreplace_supported = False  # pragma: no cover - filesystem without RENAME_NOREPLACE
    _rename_noreplace_fallback(src, dst)  # pragma: no cover


def _rename_noreplace_fallback(
    src: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> None:  # pragma: no cover - exercised only on exotic filesystems
    if os.path.isdir(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", os.fspath(dst))
        os.rename(src, dst)
    else:
        os.link(src, dst)
        os.unlink(src)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Create `path` exclusively, write and fsync it. Unlinks it again if anything fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_fd(fd, data)
    except BaseException:
        unlink_quietly(path)
        raise


def write_fd(fd: int, data: bytes) -> None:
    """Write all of `data` to a fresh descriptor, fsync it and close it (closed on error too)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | os.PathLike[str]) -> None:
    """Unlink a file that may already be gone."""
    with suppress(FileNotFoundError):
        os.unlink(path)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a file or a directory tree that may already be (partly) gone."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_ignore_missing)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _ignore_missing(func: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
