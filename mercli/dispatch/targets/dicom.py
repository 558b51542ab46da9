"""Delivery to a `dicom` target: C-STORE over one association per job (SPEC §5).

Instances go in InstanceNumber order, and only those `dispatch.json` does not list as
delivered yet; every response status is checked. A study job (SPEC §4.1) goes over one
association too: its series in arrival order, each in InstanceNumber order, each instance
recorded as delivered as `<series>/<name>`. A failure status leaves the job to be
retried; an instance no codec can convert fails the job for good, as does a job with more
presentation contexts than one association can carry. `stop` is asked before each instance:
once it says yes (`mercli cancel`), the association is released after the instance in flight
and the attempt ends with an error, for dispatch to settle.

With `tls = true` the association runs over TLS (`mercli.dicom.tls`: TLS 1.2+, the server's
chain checked against `tls_ca` and its name against `host`; `tls_cert`/`tls_key` for mutual
TLS), built afresh for each attempt, so a renewed certificate is picked up without a
restart. A failed handshake fails the attempt with the reason (not trusted, wrong host name,
client certificate refused); it is retried as any other failure, since an admin fixes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mercli.dicom.scu.session import (
    DicomPeer,
    InstanceNotSendable,
    PeerRefused,
    PeerUnreachable,
    StoreSession,
    TooManyContexts,
    status_category,
)
from mercli.dicom.tls import TlsConfigError, client_context
from mercli.dispatch.targets.base import Attempt
from mercli.errors import PeerError
from mercli.jobs import JobInfo, Progress
from mercli.spool import INSTANCE_SUFFIX, SIDECAR_SUFFIX


def instances_in_order(folder: Path) -> list[Path]:
    """The job's .dcm files by InstanceNumber (from the sidecars), then by name."""
    keyed = []
    for path in folder.glob(f"*{INSTANCE_SUFFIX}"):
        try:
            sidecar = json.loads(path.with_suffix(SIDECAR_SUFFIX).read_bytes())
            number = sidecar.get("InstanceNumber")
        except (OSError, ValueError):
            number = None
        keyed.append((number if isinstance(number, int | float) else float("inf"), path.name, path))
    return [path for _, _, path in sorted(keyed)]


def _never() -> bool:
    return False


def deliver(
    folder: Path, job: JobInfo, progress: Progress, stop: Callable[[], bool] = _never
) -> Attempt:
    """Send the job's instances the peer does not have yet, in order, over one association."""
    target = job.target
    assert target.host is not None and target.port is not None and target.called_aet is not None
    try:
        tls = client_context(target.tls_ca, target.tls_cert, target.tls_key) if target.tls else None
    except TlsConfigError as exc:  # a file an admin can fix: retried, with the reason
        return Attempt(error=str(exc))
    peer = DicomPeer(
        target.host, target.port, target.called_aet, target.calling_aet, target.timeout, tls
    )
    done = set(progress.delivered)
    keyed = [(path.stem, path) for path in instances_in_order(folder)] if not job.series else []
    for series in job.series:  # a study job: series in arrival order, one association
        keyed += [(f"{series}/{path.stem}", path) for path in instances_in_order(folder / series)]
    pending = [(key, path) for key, path in keyed if key not in done]
    if not pending:
        # Everything is delivered already: an earlier attempt was killed after recording
        # that in dispatch.json but before moving the job to success/. Opening an association
        # anyway would propose no presentation context at all, which peers such as DCMTK's
        # storescp answer with silence (a hang until our timeout, on every retry).
        return Attempt(0)
    failures: list[str] = []
    unsendable: list[str] = []
    sent = 0
    try:
        files = [path for _, path in pending]
        with StoreSession(peer, files, only_syntax=target.transfer_syntax) as session:
            for key, path in pending:
                if stop():
                    return Attempt(sent, "cancelled", permanent=True)
                try:
                    status = session.store(path)
                except InstanceNotSendable as exc:
                    unsendable.append(f"{path.stem}: {exc.reason}")
                    continue
                if status_category(status) == "failure":
                    failures.append(f"{path.stem}: status 0x{status:04X}")
                else:
                    progress.delivered.append(key)
                    sent += 1
    except TooManyContexts as exc:
        return Attempt(sent, str(exc), permanent=True)
    except PeerError as exc:
        down = isinstance(exc, PeerUnreachable | PeerRefused) and sent == 0
        return Attempt(sent, str(exc), unreachable=down)
    if unsendable:
        return Attempt(sent, f"cannot send {len(unsendable)}: {'; '.join(unsendable[:5])}", True)
    if failures:
        return Attempt(sent, f"{len(failures)} refused: {'; '.join(failures[:5])}")
    return Attempt(sent)
