"""A DICOM upper-layer client written by hand, byte by byte, so a test can do what no well-
behaved library would: send P-DATA after being rejected, or without associating at all."""

from __future__ import annotations

import socket
import struct

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def associate_rq(calling: str, called: str, sop_class: str, syntax: str) -> bytes:
    context = struct.pack(">BBBB", 1, 0, 0, 0)  # presentation context id 1
    context += _item(0x30, sop_class.encode()) + _item(0x40, syntax.encode())
    user = _item(0x51, struct.pack(">L", 16384))
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
    body += bytes(32) + _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, group 0000)."""
    body = _element(0, 0x0002, _uid(sop_class))
    body += _element(0, 0x0100, struct.pack("<H", 0x0001))
    body += _element(0, 0x0110, struct.pack("<H", message_id))
    body += _element(0, 0x0700, struct.pack("<H", 0))
    body += _element(0, 0x0800, struct.pack("<H", 0x0000))  # a data set follows
    body += _element(0, 0x1000, _uid(sop_instance))
    return _element(0, 0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def store_pdus(sop_class: str, sop_instance: str, dataset: bytes) -> bytes:
    """Command (last fragment) then the whole data set (last fragment), context id 1."""
    return p_data(1, 0x03, c_store_rq(sop_class, sop_instance)) + p_data(1, 0x02, dataset)


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """One PDU (type, body), or None when the peer closed the connection."""
    header = _read_exactly(sock, 6)
    if header is None:
        return None
    kind, _, length = struct.unpack(">BBL", header)
    body = _read_exactly(sock, length)
    return None if body is None else (kind, body)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def status_of(body: bytes) -> int | None:
    """The Status (0000,0900) of a P-DATA body carrying a command, if there is one."""
    marker = struct.pack("<HHL", 0, 0x0900, 2)
    at = body.find(marker)
    return None if at < 0 else int(struct.unpack_from("<H", body, at + 8)[0])
