"""Target types: one module per `type`, each with the same small interface.

A target module offers `deliver(folder, job, progress) -> Attempt`: send the claimed job in
`folder` (instances, sidecars, job.json) to `job.target`, record what the peer now has in
`progress` (dispatch saves it), and say how it went. It raises nothing for the target's own
failures: an unreachable host, a refused instance or a full disk is an `Attempt` with an
error, which dispatch turns into a retry or a move to error/. Spool errors (OSError on the
job's own files) propagate.

`DELIVER` is the registry by `type`; `rules check` refuses types it does not list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mercli.dispatch.targets import dicom, dicomweb, folder, s3, sftp
from mercli.dispatch.targets.base import Attempt
from mercli.jobs import JobInfo, Progress

Deliver = Callable[[Path, JobInfo, Progress], Attempt]

DELIVER: dict[str, Deliver] = {
    "dicom": dicom.deliver,
    "dicomweb": dicomweb.deliver,
    "folder": folder.deliver,
    "s3": s3.deliver,
    "sftp": sftp.deliver,
}


def deliver(
    folder: Path, job: JobInfo, progress: Progress, *, stop: Callable[[], bool] | None = None
) -> Attempt:
    """Send a job with the module of its target's type.

    `stop`: asked between instances by the types that send one at a time (dicom); when it says
    yes, the attempt ends after the current instance, with an error (`mercli cancel`). The
    others deliver a job whole per attempt, so dispatch asks before and after instead."""
    if stop is not None and job.target.type == "dicom":
        return dicom.deliver(folder, job, progress, stop)
    try:
        send = DELIVER[job.target.type]
    except KeyError:
        return Attempt(error=f"unknown target type {job.target.type!r}", permanent=True)
    return send(folder, job, progress)


__all__ = ["DELIVER", "Attempt", "Deliver", "deliver"]
