"""`mercli metrics --textfile PATH`: the exposition for node_exporter's textfile collector.

node_exporter reads every `*.prom` file of its folder at each scrape, so a half-written file
would be read as broken metrics. The text is written to a hidden temp file in the same folder
(its name does not end in `.prom`, so node_exporter ignores it), fsync'ed, renamed over PATH,
and the folder fsync'ed: readers see the old file or the new one, whole. Mode 0644, because
node_exporter usually runs as another user and the file holds no patient data.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mercli.fsutil import fsync_dir, unlink_quietly

TEXTFILE_MODE = 0o644


def temp_name(path: Path) -> Path:
    """`.NAME.<pid>.<random>.tmp` beside PATH: unique, hidden, not `*.prom`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_textfile(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data` (OSError if the folder is not writable)."""
    temp = temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, TEXTFILE_MODE)
    try:
        try:
            os.fchmod(fd, TEXTFILE_MODE)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        unlink_quietly(temp)
        raise
    fsync_dir(path.parent)
