"""Association negotiation for the receiving upper layer: the A-ASSOCIATE PDUs it reads and writes.

Split out of `mercli.dicom.scp.listener` so the per-connection state machine
(`mercli.dicom.scp.connection`) only moves bytes and keeps no PDU details. pynetdicom does the
work it does well here: decoding the A-ASSOCIATE-RQ, encoding A-ASSOCIATE-AC/RJ
(`pynetdicom.pdu`) and negotiating presentation contexts with `negotiate_unrestricted`: every
storage SOP class, private ones too, in the first transfer syntax the sender proposes, so
nothing is ever transcoded. (The requesting side has its own pynetdicom-free codec,
`mercli.dicom.scu.acse`, because dispatch start-up time matters there; receive is long-running.)
"""

from __future__ import annotations

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

IMPLEMENTATION_CLASS_UID = part10.IMPLEMENTATION_CLASS_UID.decode()
IMPLEMENTATION_VERSION = part10.IMPLEMENTATION_VERSION.decode()
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient: local limit exceeded


@dataclass(frozen=True)
class AssociationInfo(Sender):
    """The `Sender` of an association plus what negotiation agreed, as the handler needs it."""

    port: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (SOP, TS)


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


def association_info(request: A_ASSOCIATE, peer: Any) -> AssociationInfo:
    """The AE titles of the request and the peer's address, before any context is accepted."""
    return AssociationInfo(
        calling_aet=str(request.calling_ae_title).strip(),
        called_aet=str(request.called_ae_title).strip(),
        address=str(peer[0]),
        port=int(peer[1]),
    )


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
    maximum.maximum_length_received = 0  # unlimited: fewer, larger PDUs
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
