"""Folders of earlier runs set aside, not deleted, until the suite's scratch goes.

On the VM these figures come from, the root filesystem is ext4 without a journal, mounted
with `discard`: deleting a run's thousands of files right before the next run charged that
run for the deletion (discards sent to the disk, new inodes allocated around the recently
deleted ones). `storescp -od` took 2000 small instances at 1229 img/s right after such a
delete and at 2700-3700 img/s without one, so whichever subject came after a delete lost.
A rename costs nothing of that: every run starts in a fresh folder, and the files go when
the suite's temporary folder is removed, after its last timing.
"""

from __future__ import annotations

import itertools
from pathlib import Path

_SET_ASIDE = ".set-aside"
_numbers = itertools.count()


def set_aside(path: Path) -> None:
    """Move `path` (an earlier run's folder), if there is one, out of the way within its
    parent; it is deleted with the rest of the suite's scratch."""
    if not path.exists() and not path.is_symlink():
        return
    aside = path.parent / _SET_ASIDE
    aside.mkdir(exist_ok=True)
    path.rename(aside / f"{path.name}-{next(_numbers)}")
