"""DIMSE command sets and PDU framing shared by both sides of mercli's DICOM network code.

Command sets are always implicit VR little endian (PS3.7 6.3.1), small and flat, so they are encoded
and parsed by hand here rather than through pydicom: a C-STORE costs two of them, and at thousands
of instances per second that overhead matters. The receiving upper layer
(`mercli.dicom.scp.listener`) and the sending one (`mercli.dicom.scu.session`) both use these
helpers, so the two sides cannot drift apart.
"""

from __future__ import annotations

import struct
from typing import Literal

from mercli.names import is_safe_uid

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x04, 0x05, 0x06, 0x07
A_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"  # from the service provider, no reason
CONTROL_PDU_LENGTH = 4  # the body of A-RELEASE-RQ/RP and A-ABORT (PS3.8 9.3.6-9.3.8)
MAX_COMMAND = 64 << 10  # bytes a command set may take; a C-STORE-RQ needs about 200

# DIMSE command fields and values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET, HAS_DATASET = 0x0101, 0x0000
PRIORITY_MEDIUM = 0x0000
STATUS_UNRECOGNISED = 0x0211
STATUS_INVALID_UID = 0xC213  # cannot understand: a UID of the command set is no UID

# Command set tags
COMMAND_GROUP_LENGTH = 0x00000000
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_RESPONDED = 0x00000120
PRIORITY = 0x00000700
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
AFFECTED_SOP_INSTANCE = 0x00001000

# PDV message control header bits (PS3.8 E.2)
PDV_COMMAND, PDV_LAST = 0x01, 0x02

# C-STORE warning statuses (PS3.4 B.2.3, PS3.7 C): coercion, elements discarded, ...
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


def command_uid(value: bytes) -> bytes | None:
    """A UID of a command set with its padding removed, or None if it is no UID.

    Digits and dots, at most 64 characters, no empty component (PS3.5 9.1). Trailing NULs
    and spaces are padding that real devices send, so they are forgiven; nothing else is.
    """
    uid = value.rstrip(b"\x00 ")
    return uid if uid.isascii() and is_safe_uid(uid.decode("ascii")) else None


def us(value: bytes | None) -> int:
    """An unsigned short command element value (0 when absent)."""
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else 0


def parse_command(data: bytes) -> dict[int, bytes]:
    """A DIMSE command set (implicit VR little endian) as {tag: raw value}."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if length > len(data) - offset:
            raise ProtocolError("command element longer than its command set")
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return elements


def element(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element; UIDs are padded with NUL to an even length."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _with_group_length(body: bytes) -> bytes:
    return element(COMMAND_GROUP_LENGTH, struct.pack("<I", len(body))) + body


def encode_response(
    command_field: int, message_id: int, status: int, sop_class: bytes, sop_instance: bytes | None
) -> bytes:
    """A C-xxx-RSP command set, elements in ascending tag order, with its group length."""
    body = b"".join(
        [
            element(AFFECTED_SOP_CLASS, sop_class) if sop_class else b"",
            element(COMMAND_FIELD, struct.pack("<H", command_field)),
            element(MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)),
            element(DATASET_TYPE, struct.pack("<H", NO_DATASET)),
            element(STATUS, struct.pack("<H", status)),
            element(AFFECTED_SOP_INSTANCE, sop_instance) if sop_instance else b"",
        ]
    )
    return _with_group_length(body)


def encode_store_rq(message_id: int, sop_class: bytes, sop_instance: bytes) -> bytes:
    """A C-STORE-RQ command set announcing a dataset (medium priority, no move originator)."""
    body = b"".join(
        [
            element(AFFECTED_SOP_CLASS, sop_class),
            element(COMMAND_FIELD, struct.pack("<H", C_STORE_RQ)),
            element(MESSAGE_ID, struct.pack("<H", message_id)),
            element(PRIORITY, struct.pack("<H", PRIORITY_MEDIUM)),
            element(DATASET_TYPE, struct.pack("<H", HAS_DATASET)),
            element(AFFECTED_SOP_INSTANCE, sop_instance),
        ]
    )
    return _with_group_length(body)


def encode_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (Verification SOP Class)."""
    body = b"".join(
        [
            element(AFFECTED_SOP_CLASS, b"1.2.840.10008.1.1"),
            element(COMMAND_FIELD, struct.pack("<H", C_ECHO_RQ)),
            element(MESSAGE_ID, struct.pack("<H", message_id)),
            element(DATASET_TYPE, struct.pack("<H", NO_DATASET)),
        ]
    )
    return _with_group_length(body)


def command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one whole command set in a single last fragment."""
    pdv = struct.pack(">IBB", len(command) + 2, context_id, PDV_COMMAND | PDV_LAST) + command
    return struct.pack(">BBI", P_DATA_TYPE, 0, len(pdv)) + pdv


def status_category(status: int) -> Literal["success", "warning", "failure"]:
    """How a C-STORE response status counts (PS3.4 Annex B.2.3, PS3.7 Annex C).

    Warning (delivered, but the peer changed or dropped something): 0x0001, 0x0107, 0x0116,
    0xB000, 0xB006, 0xB007. Everything else but 0x0000 is a failure: 0xA7xx out of resources,
    0xA9xx data set does not match, 0xCxxx cannot understand, 0x0122 SOP class not supported,
    0x0124 not authorised, 0x0210-0x0213 and any status nobody documented. Pending (0xFF00)
    makes no sense for C-STORE and counts as failure too.
    """
    if status == 0x0000:
        return "success"
    if status in _WARNINGS:
        return "warning"
    return "failure"
