"""Association negotiation for the receiving upper layer: the A-ASSOCIATE PDUs it reads and writes.

Split out of `mercli.dicom.scp.listener` so the per-connection state machine
(`mercli.dicom.scp.connection`) only moves bytes and keeps no PDU details. pynetdicom does the
work it does well here: decoding the A-ASSOCIATE-RQ, encoding A-ASSOCIATE-AC/RJ
(`pynetdicom.pdu`) and negotiating presentation contexts with `negotiate_unrestricted`: every
storage SOP class, private ones too, in the first transfer syntax the sender proposes, so
nothing is ever transcoded. (The requesting side has its own pynetdicom-free codec,
`mercli.dicom.scu.acse`, because dispatch start-up time matters there; receive is long-running.)

Before pynetdicom sees a request, `scan_associate_rq` reads its AE titles and counts its
presentation contexts by hand: admission (AE titles, then at most `MAX_CONTEXTS` distinct
contexts) costs microseconds whatever the peer stuffed into the request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

from mercli.dicom import part10
from mercli.dicom.dimse import ProtocolError
from mercli.dicom.sender import Sender
from mercli.names import printable

IMPLEMENTATION_CLASS_UID = part10.IMPLEMENTATION_CLASS_UID.decode()
IMPLEMENTATION_VERSION = part10.IMPLEMENTATION_VERSION.decode()
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PERMANENT = (0x01, 0x01, 0x01)  # no reason given: too many or duplicate contexts
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient: local limit exceeded

# Limits on what a peer may make us read or decode (SPEC §9).
MAX_ASSOCIATE_RQ = 128 << 10  # bytes: 128 contexts x 20 transfer syntaxes is ~70 KiB
MAX_CONTEXTS = 128  # presentation contexts: their ids are the odd numbers 1-255
MAX_PDU = 1 << 20  # the longest P-DATA-TF we announce and accept (DCMTK sends 128 KiB)
_FIXED = 74  # PDU header (6) and the fixed fields of an A-ASSOCIATE-RQ (68)


@dataclass(frozen=True)
class AssociationInfo(Sender):
    """The `Sender` of an association plus what negotiation agreed, as the handler needs it."""

    port: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (SOP, TS)


@dataclass(frozen=True)
class RequestSummary:
    """What admission needs from an A-ASSOCIATE-RQ, read by hand before pynetdicom decodes it.

    `called`/`calling` are None when the 16 bytes are not an AE title; `raw_called` and
    `raw_calling` keep them (for an escaped log line). `contexts` stops counting past
    `MAX_CONTEXTS`. `pdu` is the request with NUL padding of the AE titles turned into spaces.
    """

    pdu: bytes
    called: str | None
    calling: str | None
    raw_called: str
    raw_calling: str
    contexts: int
    duplicate_context: int | None


def ae_title(raw: bytes) -> str | None:
    """The AE title in a 16-byte field, or None if it is none (PS3.5 6.2: ISO 646 without
    backslash and control characters, not all spaces). Trailing NULs count as padding: some
    devices pad with them, and pynetdicom would refuse them."""
    text = raw.rstrip(b"\x00 ").lstrip(b" ")
    if not text or any(byte < 0x20 or byte > 0x7E or byte == 0x5C for byte in text):
        return None
    return text.decode("ascii")


def scan_associate_rq(pdu: bytes) -> RequestSummary:
    """AE titles and presentation context ids of a whole A-ASSOCIATE-RQ PDU, without decoding.

    Linear in the number of items and stops counting contexts past `MAX_CONTEXTS`, so a request
    stuffed with thousands of them costs microseconds, not the second pynetdicom would spend.
    Raises `ProtocolError` when the items do not tile the PDU.
    """
    if len(pdu) < _FIXED:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {len(pdu)} bytes: too short")
    called, calling = ae_title(pdu[10:26]), ae_title(pdu[26:42])
    ids: set[int] = set()
    count, duplicate = 0, None
    offset = _FIXED
    while offset < len(pdu) and count <= MAX_CONTEXTS:
        if offset + 4 > len(pdu):
            raise ProtocolError("A-ASSOCIATE-RQ ends inside an item header")
        kind, length = pdu[offset], struct.unpack_from(">H", pdu, offset + 2)[0]
        if offset + 4 + length > len(pdu):
            raise ProtocolError(f"A-ASSOCIATE-RQ item 0x{kind:02X} longer than the PDU")
        if kind == 0x20:
            if length < 4:
                raise ProtocolError("presentation context item too short")
            count += 1
            context_id = pdu[offset + 4]
            if context_id in ids and duplicate is None:
                duplicate = context_id
            ids.add(context_id)
        offset += 4 + length
    padded = [(name or "").encode("ascii").ljust(16) for name in (called, calling)]
    return RequestSummary(
        pdu=pdu[:10] + padded[0] + padded[1] + pdu[42:],
        called=called,
        calling=calling,
        raw_called=pdu[10:26].rstrip(b"\x00 ").decode("latin-1"),
        raw_calling=pdu[26:42].rstrip(b"\x00 ").decode("latin-1"),
        contexts=count,
        duplicate_context=duplicate,
    )


def title_refusal(summary: RequestSummary) -> tuple[tuple[int, int, int], str] | None:
    """A rejection (and why) for a request whose AE title fields hold no AE title."""
    if summary.calling is None:
        return REJECT_CALLING_AE, f"calling AE title {printable(summary.raw_calling)} is invalid"
    if summary.called is None:
        return REJECT_CALLED_AE, f"called AE title {printable(summary.raw_called)} is invalid"
    return None


def context_refusal(summary: RequestSummary) -> tuple[tuple[int, int, int], str] | None:
    """A permanent rejection (and why) for more than `MAX_CONTEXTS` or duplicate context ids:
    PS3.8 allows neither, and decoding thousands of them is what an attacker would want."""
    if summary.contexts > MAX_CONTEXTS:
        return REJECT_PERMANENT, f"more than {MAX_CONTEXTS} presentation contexts"
    if summary.duplicate_context is not None:
        return REJECT_PERMANENT, f"presentation context id {summary.duplicate_context} twice"
    return None


def _negotiation_contexts() -> list[PresentationContext]:
    verification = PresentationContext()
    verification.abstract_syntax = UID("1.2.840.10008.1.1")  # Verification SOP Class
    verification.transfer_syntax = [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
    ]
    return [verification]


_SUPPORTED = _negotiation_contexts()


def decode_associate_rq(encoded: bytes) -> A_ASSOCIATE:
    """Decode a whole A-ASSOCIATE-RQ PDU; garbage of any kind becomes a `ProtocolError`."""
    request = A_ASSOCIATE_RQ()
    try:
        request.decode(encoded)
        return request.to_primitive()
    except Exception as exc:  # pynetdicom's decoder raises many kinds on garbage
        raise ProtocolError(f"malformed A-ASSOCIATE-RQ: {exc}") from exc


def negotiate_contexts(
    request: A_ASSOCIATE, info: AssociationInfo
) -> tuple[list[PresentationContext], list[Any]]:
    """Accept what can be accepted, recording each accepted context in `info.contexts`.

    Returns the presentation context results and the SCP/SCU role replies for the AC.
    """
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in _role_items(request)}
    results, reply_roles = negotiate_unrestricted(
        request.presentation_context_definition_list, _SUPPORTED, roles
    )
    for context in results:
        if context.result == 0x00 and context.context_id is not None:
            info.contexts[context.context_id] = (
                str(context.abstract_syntax),
                str(context.transfer_syntax[0]),
            )
    return results, reply_roles


def encode_associate_rj(reason: tuple[int, int, int]) -> bytes:
    """The A-ASSOCIATE-RJ PDU for a (result, source, reason) triple such as `REJECT_BUSY`."""
    primitive = A_ASSOCIATE()
    primitive.result, primitive.result_source, primitive.diagnostic = reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def encode_associate_ac(
    request: A_ASSOCIATE, results: list[PresentationContext], roles: list[Any]
) -> bytes:
    """The A-ASSOCIATE-AC PDU answering `request` with the negotiated contexts and roles."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = request.calling_ae_title
    primitive.called_ae_title = request.called_ae_title
    primitive.result, primitive.result_source = 0x00, 0x01
    primitive.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = MAX_PDU  # large enough for speed, bounded per PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    primitive.user_information = [maximum, implementation, version, *roles]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _role_items(primitive: A_ASSOCIATE) -> list[Any]:
    return [
        item
        for item in primitive.user_information
        if hasattr(item, "scu_role") and hasattr(item, "sop_class_uid")
    ]
