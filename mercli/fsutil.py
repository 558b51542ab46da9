"""Filesystem primitives the spool protocol is built from: durable writes and no-clobber renames.

Everything here is about what survives a crash or a power cut: data is fsync'ed before it is
renamed into view, and the directory is fsync'ed after, so a rename that a reader has seen is
also one the disk will still show after a reboot.

And about who may read it (SPEC §9): the spool holds patient data, so files are created
`FILE_MODE` (0640) and folders `DIR_MODE` (0750), whatever the umask: a umask only narrows
the mode given to open(2)/mkdir(2), and where it narrowed these (umask 077) the mode is set
back, so the spool's group can always read. A folder made in a setgid folder keeps the setgid
bit (and the group) it inherits, which is how a spool is shared with a group.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

FILE_MODE = 0o640  # owner writes, the spool's group reads, others nothing
DIR_MODE = 0o750

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

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - not Linux
    _sync_file_range = None

_syncfs: Any
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - not Linux
    _syncfs = None


class FilesystemSync:
    """Makes everything written to one filesystem durable with one call: `syncfs` and then one
    fsync of a folder on it, for a caller that has just written many small files there.

    One `syncfs` writes each inode table and folder block once, where an fsync per file writes
    a block shared by 16 new inodes up to 16 times (each time waiting for it; ext4 without a
    journal also flushes the disk's cache each time): publishing 2000 journaled instances took
    0.7 s instead of 1.1 s on the development VM. The price: it also writes whatever else is
    dirty on that filesystem. The folder's fsync after it flushes the disk's cache once more,
    because ext4 without a journal writes its metadata blocks after the flush `syncfs` issues.

    The descriptor is opened once and kept: `syncfs` reports a failed write of a page only to
    descriptors opened before it happened, and only since Linux 5.8 (before, it returned 0).
    An error of the filesystem's own commit it reports since 5.17; before that the fsync of the
    folder after it reports such an error. Without `syncfs` or before 5.8, `sync` fsyncs the
    files and folders it is given instead, one by one.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.reports_errors = _syncfs is not None and _kernel_at_least(5, 8)

    def sync(
        self,
        files: Iterable[str | os.PathLike[str]] = (),
        dirs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        if not self.reports_errors:  # pragma: no cover - not Linux, or Linux < 5.8
            fsync_all(files, dirs)
            return
        if _syncfs(self.fd) != 0:
            number = ctypes.get_errno()
            raise OSError(number, f"syncfs: {os.strerror(number)}")
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _kernel_at_least(major: int, minor: int) -> bool:
    """Whether this is Linux `major.minor` or later."""
    release = os.uname().release
    numbers = [int(part) for part in release.split("-")[0].split(".")[:2] if part.isdigit()]
    return os.uname().sysname == "Linux" and len(numbers) == 2 and tuple(numbers) >= (major, minor)


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting.

    For files we will fsync soon, among many: the fsyncs then find the data on its way (or
    written) instead of issuing one write-and-wait after the other; 300 CT instances fsync'ed
    in about half the time on the development VM. Only a hint: errors are ignored (the
    fsync that follows reports them).
    """
    start_writeback_range(fd, 0, 0)


def start_writeback_range(fd: int, offset: int, length: int) -> None:
    """`start_writeback` for `length` bytes from `offset` (0: to the end of the file)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


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
        os.link(src, dst, follow_symlinks=False)
        os.unlink(src)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_THREADS = 8  # fsyncs of one batch in flight at once (they wait on the disk, not the CPU)
_sync_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): none survives a fork
_sync_pool_lock = threading.Lock()


def _forget_sync_pool() -> None:  # in a forked child: the parent's threads are not there
    global _sync_pool, _sync_pool_lock
    _sync_pool, _sync_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_sync_pool)


def fsync_all(
    files: Iterable[str | os.PathLike[str]], dirs: Iterable[str | os.PathLike[str]] = ()
) -> None:
    """fsync some files and folders, all at once; returns when every one is durable.

    The fsyncs are issued together from SYNC_THREADS threads, so a journaling filesystem can
    make them durable in one commit and one flush of the disk's cache (ext4 and XFS join
    concurrent fsyncs into the commit under way) instead of one each. Each file and folder
    is still fsync'ed, so nothing depends on how a filesystem orders its writes. Raises the
    first error after all have finished.
    """
    steps = [(fsync_file, path) for path in files] + [(fsync_dir, path) for path in dirs]
    if len(steps) <= 1:
        for step, path in steps:
            step(path)
        return
    pool = sync_pool()
    futures = [pool.submit(step, path) for step, path in steps]
    errors = [error for future in futures if (error := future.exception()) is not None]
    if errors:
        raise errors[0]


def sync_pool() -> ThreadPoolExecutor:
    """The threads that fsync for this process (made on first use, none across a fork)."""
    global _sync_pool
    with _sync_pool_lock:
        if _sync_pool is None or _sync_pool[0] != os.getpid():
            pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="mercli-fsync")
            _sync_pool = (os.getpid(), pool)
        return _sync_pool[1]


def write_new(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Create `path` exclusively (FILE_MODE), write and fsync it. Unlinks it if anything fails.

    `sync=False`: the caller fsyncs it later, with others (`fsync_file`): only the writeback
    is started now. Several files of one transaction synced in one pass cost one journal
    commit instead of one each.
    """
    fd = open_new(path)
    try:
        write_fd(fd, data, sync=sync)
    except BaseException:
        unlink_quietly(path)
        raise


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file by name (never through a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_new(path: str | os.PathLike[str], flags: int = os.O_WRONLY) -> int:
    """Create a file exclusively with FILE_MODE (whatever the umask); its descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        set_file_mode(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    return fd


def set_file_mode(fd: int) -> None:
    """Give an open file exactly FILE_MODE (an fstat only, when it has it already)."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
        os.fchmod(fd, FILE_MODE)


def give_file_mode(path: str | os.PathLike[str]) -> None:
    """FILE_MODE for a file made elsewhere (receive's dataset, storescp's), before publishing."""
    if stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode) != FILE_MODE:
        os.chmod(path, FILE_MODE)


def write_fd(fd: int, data: bytes, *, sync: bool = True) -> None:
    """Write all of `data` to a fresh descriptor, fsync it and close it (closed on error too).

    The file gets FILE_MODE first, however it was created (receive opens its own files).
    `sync=False` only starts the writeback: the caller fsyncs the file later.
    """
    try:
        set_file_mode(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
        else:
            start_writeback(fd)
    finally:
        os.close(fd)


def make_dir(path: str | os.PathLike[str], *, exist_ok: bool = False) -> bool:
    """Create a folder with DIR_MODE (plus the setgid bit it inherits); True if created."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        # a folder, or one that was there and has been renamed away since, is fine. One look
        # only: with two (is it a folder? is anything there?) a group claimed away and made
        # anew by another publisher in between read as "something else is there".
        if exist_ok and _is_dir_or_gone(path):
            return False
        raise
    with suppress(FileNotFoundError):  # renamed away already (a claim): the umask only narrowed
        set_dir_mode(path)
    return True


def _is_dir_or_gone(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True


def set_dir_mode(path: str | os.PathLike[str]) -> None:
    """Give a folder exactly DIR_MODE, keeping its setgid bit (a stat only, when it has it)."""
    mode = os.stat(path, follow_symlinks=False).st_mode
    if stat.S_IMODE(mode) & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE | (mode & stat.S_ISGID))


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


def open_plain_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading, never through a symlink (ELOOP), never waiting on a
    FIFO; anything but a regular file raises OSError(EINVAL).

    For code outside the spool package that sends item files (the DICOM SCU): a symlink
    planted in a job must not make it read a file the job never held.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return os.fdopen(fd, "rb")


def link_tree(source: Path, destination: Path) -> None:
    """Hard-link a folder's files (sub-folders recreated) into an existing `destination`:
    an item moved into a transaction without copying (symlinks are linked, never followed)."""
    for entry in os.scandir(source):
        if entry.is_dir(follow_symlinks=False):
            os.mkdir(destination / entry.name)
            link_tree(Path(entry.path), destination / entry.name)
        else:
            os.link(entry.path, destination / entry.name, follow_symlinks=False)
