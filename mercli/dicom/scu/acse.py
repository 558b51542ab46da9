"""A-ASSOCIATE-RQ encoding and A-ASSOCIATE-AC decoding (PS3.8 9.3.2, 9.3.3), by hand.

Only what the requesting side of `mercli.dicom.scu.association` needs, so that sending does not
import pynetdicom (and through it pydicom) at start-up. The RQ carries the application context, one
presentation context per proposed (abstract syntax, transfer syntaxes) with odd ids 1, 3, 5..., and
user information with maximum length, implementation class UID and version name. The AC decoder
returns each presentation context's id, result and transfer syntax plus the peer's maximum length;
anything malformed raises `ProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from mercli.dicom.dimse import ProtocolError

A_ASSOCIATE_RQ_TYPE = 0x01
PROTOCOL_VERSION = 0x0001
APPLICATION_CONTEXT_ITEM = 0x10
PRESENTATION_CONTEXT_RQ_ITEM = 0x20
PRESENTATION_CONTEXT_AC_ITEM = 0x21
ABSTRACT_SYNTAX_ITEM = 0x30
TRANSFER_SYNTAX_ITEM = 0x40
USER_INFORMATION_ITEM = 0x50
MAXIMUM_LENGTH_ITEM = 0x51
IMPLEMENTATION_CLASS_UID_ITEM = 0x52
IMPLEMENTATION_VERSION_ITEM = 0x55
_FIXED = 68  # protocol version, reserved, called AE, calling AE, 32 reserved bytes


@dataclass(frozen=True)
class ContextResult:
    """One presentation context item of an A-ASSOCIATE-AC."""

    context_id: int
    result: int  # 0 acceptance, 1 user rejection, 2 no reason, 3 abstract / 4 transfer syntax
    transfer_syntax: str  # "" when the acceptor sent none


@dataclass(frozen=True)
class AssociateAC:
    """What the requestor needs from an A-ASSOCIATE-AC (PDU body after the 6-byte header)."""

    contexts: tuple[ContextResult, ...]
    maximum_length: int | None  # None when the peer sent no maximum length sub-item


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} of {len(value)} bytes is too long")
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ascii(text: str) -> bytes:
    return text.encode("ascii")


def encode_associate_rq(
    called_aet: str,
    calling_aet: str,
    application_context: str,
    proposed: Sequence[tuple[str, Sequence[str]]],
    maximum_length: int,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """The whole A-ASSOCIATE-RQ PDU, header included; context ids are 1, 3, 5..."""
    parts = [
        struct.pack(">HH", PROTOCOL_VERSION, 0),
        _ascii(called_aet)[:16].ljust(16),
        _ascii(calling_aet)[:16].ljust(16),
        bytes(32),
        _item(APPLICATION_CONTEXT_ITEM, _ascii(application_context)),
    ]
    for n, (abstract, syntaxes) in enumerate(proposed):
        value = struct.pack(">BBBB", 2 * n + 1, 0, 0, 0) + _item(
            ABSTRACT_SYNTAX_ITEM, _ascii(abstract)
        )
        value += b"".join(_item(TRANSFER_SYNTAX_ITEM, _ascii(syntax)) for syntax in syntaxes)
        parts.append(_item(PRESENTATION_CONTEXT_RQ_ITEM, value))
    user = _item(MAXIMUM_LENGTH_ITEM, struct.pack(">I", maximum_length))
    user += _item(IMPLEMENTATION_CLASS_UID_ITEM, _ascii(implementation_class_uid))
    if implementation_version:
        user += _item(IMPLEMENTATION_VERSION_ITEM, _ascii(implementation_version))
    parts.append(_item(USER_INFORMATION_ITEM, user))
    body = b"".join(parts)
    return struct.pack(">BBI", A_ASSOCIATE_RQ_TYPE, 0, len(body)) + body


def _items(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """(type, value) of each item in `data`; ProtocolError when one overruns it."""
    items: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError(f"malformed A-ASSOCIATE-AC: truncated item header in {what}")
        item_type, length = data[offset], struct.unpack_from(">H", data, offset + 2)[0]
        end = offset + 4 + length
        if end > len(data):
            raise ProtocolError(f"malformed A-ASSOCIATE-AC: item 0x{item_type:02X} overruns {what}")
        items.append((item_type, data[offset + 4 : end]))
        offset = end
    return items


def _uid(value: bytes) -> str:
    try:
        return value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed A-ASSOCIATE-AC: a UID that is not ASCII") from None


def decode_associate_ac(body: bytes) -> AssociateAC:
    """Parse the body (after type, reserved and length) of an A-ASSOCIATE-AC PDU.

    Items and sub-items of types the requestor has no use for are skipped.
    """
    if len(body) < _FIXED:
        raise ProtocolError(f"malformed A-ASSOCIATE-AC: {len(body)} bytes is too short")
    contexts: list[ContextResult] = []
    maximum: int | None = None
    for item_type, value in _items(body[_FIXED:], "the PDU"):
        if item_type == PRESENTATION_CONTEXT_AC_ITEM:
            if len(value) < 4:
                raise ProtocolError("malformed A-ASSOCIATE-AC: short presentation context item")
            syntaxes = [
                sub
                for kind, sub in _items(value[4:], "a presentation context")
                if kind == TRANSFER_SYNTAX_ITEM
            ]
            syntax = _uid(syntaxes[0]) if syntaxes else ""
            contexts.append(ContextResult(value[0], value[2], syntax))
        elif item_type == USER_INFORMATION_ITEM:
            for kind, sub in _items(value, "user information"):
                if kind == MAXIMUM_LENGTH_ITEM:
                    if len(sub) != 4:
                        raise ProtocolError(
                            "malformed A-ASSOCIATE-AC: maximum length sub-item is not 4 bytes"
                        )
                    maximum = struct.unpack(">I", sub)[0]
    return AssociateAC(tuple(contexts), maximum)
