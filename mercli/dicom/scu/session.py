"""A blocking C-STORE / C-ECHO SCU: the delivery engine of `dicom` targets (SPEC §5).

Built like `mercli.dicom.scp.listener` and for the same reason: pynetdicom's association reactors
poll with 1 ms sleeps, which caps one association near 200 instances/s. Here one thread owns one
socket (TCP_NODELAY), `mercli.dicom.scu.acse` encodes the A-ASSOCIATE-RQ and decodes the answer, and
each instance goes out as one command PDU plus its dataset read straight from the file, several PDUs
per `sendmsg` call, so a small instance costs two system calls and one round trip.

Presentation contexts: per SOP class, one context per transfer syntax the job's files are in,
each carrying only that syntax (so an acceptor that orders syntaxes its own way cannot trade
a JPEG original for a bigger uncompressed copy), plus one fallback context with explicit and
implicit VR little endian; a target with `transfer_syntax` (whose files dispatch converted
already) proposes that one syntax alone. A file goes in its own syntax when the peer accepted
it, else it is converted (`mercli.dicom.scu.transcode`), else `store()` raises
`InstanceNotSendable` for it alone.
A job needing more than 128 contexts raises `TooManyContexts` before connecting: a series has
one SOP class and rarely more than two syntaxes, so splitting jobs is the router's business.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from mercli.dicom.dimse import C_STORE_RSP, encode_store_rq, status_category
from mercli.dicom.scu.association import (
    Association,
    DicomPeer,
    LocalReadError,
    PeerAborted,
    PeerRefused,
    PeerTimeout,
    PeerUnreachable,
)
from mercli.dicom.scu.transcode import (
    UNCOMPRESSED,
    Instance,
    InstanceNotSendable,
    encode,
    read_instance,
    usable_syntax,
)
from mercli.errors import MercliError, PeerError
from mercli.fsutil import open_plain_file

__all__ = [
    "DicomPeer",
    "InstanceNotSendable",
    "PeerAborted",
    "PeerError",
    "PeerRefused",
    "PeerTimeout",
    "PeerUnreachable",
    "StoreSession",
    "TooManyContexts",
    "echo",
    "propose",
    "status_category",
]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # odd context IDs 1..255 (PS3.8 9.3.2.2)
VERIFICATION = "1.2.840.10008.1.1"
_CONTEXT_RESULTS = {
    1: "rejected by the peer (user rejection)",
    2: "rejected by the peer (no reason given)",
    3: "SOP class not supported by the peer",
    4: "none of the transfer syntaxes is supported by the peer",
}


class TooManyContexts(MercliError):
    """A job mixes more SOP class / transfer syntax pairs than one association can carry."""


def propose(
    instances: Sequence[Instance], only: str | None = None
) -> list[tuple[str, tuple[str, ...]]]:
    """The presentation contexts for a job, as (abstract syntax, transfer syntaxes);
    `only`: the target's `transfer_syntax`, the one syntax proposed (no fallback)."""
    by_class: dict[str, list[str]] = {}
    for instance in instances:
        syntaxes = by_class.setdefault(instance.sop_class, [])
        if instance.transfer_syntax not in syntaxes:
            syntaxes.append(instance.transfer_syntax)
    contexts: list[tuple[str, tuple[str, ...]]] = []
    for sop_class, syntaxes in by_class.items():
        if only:
            contexts.append((sop_class, (only,)))
            continue
        contexts.extend((sop_class, (syntax,)) for syntax in syntaxes)
        fallback = tuple(s for s in UNCOMPRESSED if s not in syntaxes)
        if fallback:
            contexts.append((sop_class, fallback))
    if len(contexts) > MAX_CONTEXTS:
        raise TooManyContexts(
            f"the job needs {len(contexts)} presentation contexts for {len(by_class)} SOP "
            f"classes; one association carries at most {MAX_CONTEXTS}: split the job"
        )
    return contexts


class StoreSession:
    """One association for a whole job: `with StoreSession(peer, files) as s: s.store(f)`.

    Leaving the block normally releases the association; leaving it by an exception aborts it.
    A `PeerError` from `store()` means the association is gone; `InstanceNotSendable` means
    only that instance could not go, and the session can go on.
    """

    def __init__(
        self, peer: DicomPeer, files: Sequence[Path], *, only_syntax: str | None = None
    ) -> None:
        self.peer = peer
        self._instances: dict[Path, Instance | InstanceNotSendable] = {}
        for path in files:
            try:
                self._instances[path] = read_instance(path)
            except InstanceNotSendable as exc:
                self._instances[path] = exc
        readable = [i for i in self._instances.values() if isinstance(i, Instance)]
        self._proposed = propose(readable, only_syntax)
        self._association: Association | None = None

    def __enter__(self) -> StoreSession:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None or issubclass(exc_type, InstanceNotSendable):
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        """Connect and negotiate; raises PeerUnreachable, PeerRefused, PeerAborted."""
        if self._association is None:
            self._association = Association.request(self.peer, self._proposed)

    def close(self) -> None:
        """Release the association (A-RELEASE); quietly closes if the peer is already gone."""
        association, self._association = self._association, None
        if association is not None:
            association.release()

    def abort(self) -> None:
        """Abort the association (A-ABORT) and close the connection."""
        association, self._association = self._association, None
        if association is not None:
            association.abort()

    def store(self, path: Path) -> int:
        """Send one instance; returns the peer's C-STORE status (see `status_category`)."""
        if self._association is None:
            self.open()
        association = self._association
        assert association is not None
        instance = self._instance(path)
        context_id, syntax = self._context_for(association, instance)
        command = encode_store_rq(
            association.next_message_id(),
            instance.sop_class.encode("ascii"),
            instance.sop_instance.encode("ascii"),
        )
        if syntax == instance.transfer_syntax:
            try:
                with open_plain_file(instance.path) as file:
                    file.seek(instance.offset)
                    association.send_message(context_id, command, file, instance.dataset_length)
            except (LocalReadError, OSError) as exc:
                if isinstance(exc, LocalReadError):  # aborted mid-message: reconnect next time
                    self._association = None
                raise InstanceNotSendable(path, str(exc)) from exc
        else:
            data = encode(instance, syntax)
            log.debug("sending %s converted to %s", instance.sop_instance, _uid_name(syntax))
            association.send_message(context_id, command, memoryview(data), len(data))
        return association.receive_response(C_STORE_RSP)

    def _instance(self, path: Path) -> Instance:
        known = self._instances.get(path)
        if known is None:
            known = read_instance(path)  # not announced: fine if its contexts exist anyway
            self._instances[path] = known
        if isinstance(known, InstanceNotSendable):
            raise known
        return known

    def _context_for(self, association: Association, instance: Instance) -> tuple[int, str]:
        accepted = association.accepted(instance.sop_class)
        syntax = usable_syntax(instance, list(accepted))
        if syntax is not None:
            return accepted[syntax], syntax
        name = _uid_name(instance.sop_class)
        if not association.proposed(instance.sop_class):
            reason = f"SOP class {name} was not proposed on this association"
        elif accepted:
            reason = (
                f"peer accepts {name} only in {', '.join(_uid_name(s) for s in accepted)}, "
                f"which mercli cannot convert {_uid_name(instance.transfer_syntax)} to"
            )
        else:
            results = association.rejections(instance.sop_class)
            words = sorted({_CONTEXT_RESULTS.get(r, f"result {r}") for r in results})
            reason = f"{name}: {'; '.join(words)}"
        raise InstanceNotSendable(instance.path, reason)


def _uid_name(uid: str) -> str:
    """The UID's name from pydicom's dictionary (the UID itself if unknown), for messages;
    pydicom is imported here, not at start-up, since only failures and conversions need it."""
    from pydicom.uid import UID

    return str(UID(uid).name)


def echo(peer: DicomPeer) -> int:
    """C-ECHO the peer on a fresh association; returns the response status (0 = alive)."""
    association = Association.request(peer, [(VERIFICATION, UNCOMPRESSED)])
    try:
        accepted = association.accepted(VERIFICATION)
        if not accepted:
            raise PeerRefused(f"{peer.called_aet} does not accept the Verification SOP class")
        status = association.echo(next(iter(accepted.values())))
    except BaseException:
        association.abort()
        raise
    association.release()
    return status
