"""A DICOM upper-layer client written by hand, byte by byte, so a test can do what no well-
behaved library would: send P-DATA after being rejected, or without associating at all."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _uid(value: str | bytes) -> bytes:
    """A UID padded with NUL to an even length; bytes are sent exactly as given."""
    if isinstance(value, bytes):
        return value
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def header(kind: int, length: int) -> bytes:
    """A PDU header alone, announcing `length` bytes that may never come."""
    return struct.pack(">BBL", kind, 0, length)


def associate_rq(
    calling: str | bytes,
    called: str | bytes,
    sop_class: str,
    syntax: str,
    context_ids: Sequence[int] = (1,),
) -> bytes:
    """An A-ASSOCIATE-RQ proposing `sop_class` in `syntax` once per id in `context_ids`
    (duplicates and more than 128 included: nothing is checked). AE titles given as bytes are
    sent as they are, control characters and all."""
    contexts = b"".join(
        _item(
            0x20,
            struct.pack(">BBBB", cid, 0, 0, 0)
            + _item(0x30, sop_class.encode())
            + _item(0x40, syntax.encode()),
        )
        for cid in context_ids
    )
    titles = [t if isinstance(t, bytes) else t.encode() for t in (called, calling)]
    user = _item(0x51, struct.pack(">L", 16384))
    body = struct.pack(">HH", 1, 0) + titles[0].ljust(16)[:16] + titles[1].ljust(16)[:16]
    body += bytes(32) + _item(0x10, APPLICATION_CONTEXT) + contexts + _item(0x50, user)
    return header(ASSOCIATE_RQ, len(body)) + body


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def c_store_rq(sop_class: str | bytes, sop_instance: str | bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, group 0000); UIDs given as bytes
    are sent exactly as they are (padding, garbage)."""
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


def store_pdus(
    sop_class: str | bytes, sop_instance: str | bytes, dataset: bytes, message_id: int = 1
) -> bytes:
    """Command (last fragment) then the whole data set (last fragment), context id 1."""
    command = c_store_rq(sop_class, sop_instance, message_id)
    return p_data(1, 0x03, command) + p_data(1, 0x02, dataset)


def associate(
    port: int, calling: str = "RAWSCU", sop_class: str = "1.2.840.10008.5.1.4.1.1.2"
) -> socket.socket:
    """A connected socket whose association (context 1, explicit VR little endian) was
    accepted; AssertionError with the answer otherwise."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(associate_rq(calling, "MERCLI", sop_class, "1.2.840.10008.1.2.1"))
    answer = read_pdu(sock)
    if answer is None or answer[0] != ASSOCIATE_AC:
        sock.close()
        raise AssertionError(f"association refused: {answer!r}")
    return sock


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
