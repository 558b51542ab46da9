"""The hand-written A-ASSOCIATE-RQ encoder and A-ASSOCIATE-AC decoder, against pynetdicom."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from mercli.dicom import part10
from mercli.dicom.dimse import ProtocolError
from mercli.dicom.scu.acse import ContextResult, decode_associate_ac, encode_associate_rq
from mercli.dicom.scu.association import APPLICATION_CONTEXT, OUR_MAX_PDU, _request_pdu
from mercli.dicom.scu.session import DicomPeer

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG = "1.2.840.10008.1.2.4.50"
PROPOSED = [(CT, (JPEG,)), (CT, (EXPLICIT, IMPLICIT)), (MR, (EXPLICIT, IMPLICIT))]


def _decoded_rq(data: bytes) -> A_ASSOCIATE_RQ:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(data)
    return pdu


def test_request_decodes_in_pynetdicom() -> None:
    peer = DicomPeer("localhost", 104, "STORESCP", "ABCDEFGHIJKLMNOP")
    data = _request_pdu(peer, PROPOSED)
    pdu = _decoded_rq(data)
    assert data[0] == 0x01 and struct.unpack(">I", data[2:6])[0] == len(data) - 6
    assert pdu.protocol_version == 1
    assert pdu.called_ae_title.strip() == "STORESCP"
    assert pdu.calling_ae_title == "ABCDEFGHIJKLMNOP"
    assert data[10:26] == b"STORESCP        "
    assert str(pdu.application_context_name) == APPLICATION_CONTEXT
    contexts = [
        (item.context_id, str(item.abstract_syntax), tuple(str(s) for s in item.transfer_syntax))
        for item in pdu.presentation_context
    ]
    assert contexts == [
        (2 * n + 1, abstract, syntaxes) for n, (abstract, syntaxes) in enumerate(PROPOSED)
    ]
    user = pdu.user_information
    assert user.maximum_length == OUR_MAX_PDU == 1 << 20
    assert user.implementation_class_uid == part10.IMPLEMENTATION_CLASS_UID.decode()
    assert user.implementation_version_name == part10.IMPLEMENTATION_VERSION.decode()


def test_request_matches_pynetdicoms_encoding_byte_for_byte() -> None:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = "MERCLI"
    primitive.called_ae_title = "STORESCP"
    for n, (abstract, syntaxes) in enumerate(PROPOSED):
        context = PresentationContext()
        context.context_id = 2 * n + 1
        context.abstract_syntax = UID(abstract)
        context.transfer_syntax = [UID(syntax) for syntax in syntaxes]
        primitive.presentation_context_definition_list.append(context)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 1 << 20
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID("1.2.3.4.5")
    primitive.user_information = [maximum, implementation]
    theirs = A_ASSOCIATE_RQ()
    theirs.from_primitive(primitive)
    ours = encode_associate_rq(
        "STORESCP", "MERCLI", APPLICATION_CONTEXT, PROPOSED, 1 << 20, "1.2.3.4.5", ""
    )
    assert ours == theirs.encode()


def _pynetdicom_ac(results: list[tuple[int, int, str]], maximum: int | None) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title = "MERCLI"
    primitive.called_ae_title = "STORESCP"
    primitive.result = 0
    for context_id, result, syntax in results:
        context = PresentationContext()
        context.context_id = context_id
        context.result = result
        context.transfer_syntax = [UID(syntax)]
        primitive.presentation_context_definition_results_list.append(context)
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.2.0")
    items: list[object] = [implementation]
    if maximum is not None:
        length = MaximumLengthNotification()
        length.maximum_length_received = maximum
        items.insert(0, length)
    primitive.user_information = items
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    data: bytes = pdu.encode()
    return data


def test_accept_from_pynetdicom_with_accepted_and_rejected_contexts() -> None:
    data = _pynetdicom_ac(
        [(1, 0, JPEG), (3, 4, EXPLICIT), (5, 3, IMPLICIT), (7, 1, EXPLICIT)], 16384
    )
    decoded = decode_associate_ac(data[6:])
    assert decoded.maximum_length == 16384
    assert decoded.contexts == (
        ContextResult(1, 0, JPEG),
        ContextResult(3, 4, EXPLICIT),
        ContextResult(5, 3, IMPLICIT),
        ContextResult(7, 1, EXPLICIT),
    )


def test_accept_without_maximum_length() -> None:
    decoded = decode_associate_ac(_pynetdicom_ac([(1, 0, EXPLICIT)], None)[6:])
    assert decoded.maximum_length is None
    assert decoded.contexts == (ContextResult(1, 0, EXPLICIT),)


def test_padded_uids_and_empty_or_missing_syntaxes() -> None:
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    body = bytes(68) + item(0x10, APPLICATION_CONTEXT.encode() + b"\x00")
    body += item(0x21, bytes([1, 0, 0, 0]) + item(0x40, IMPLICIT.encode() + b"\x00"))
    body += item(0x21, bytes([3, 0, 3, 0]) + item(0x40, b""))
    body += item(0x21, bytes([5, 0, 4, 0]))
    body += item(0x99, b"whatever")  # an item type we do not know is skipped
    body += item(0x50, item(0x51, struct.pack(">I", 0)) + item(0x52, b"1.2 "))
    decoded = decode_associate_ac(body)
    assert decoded.contexts == (
        ContextResult(1, 0, IMPLICIT),
        ContextResult(3, 3, ""),
        ContextResult(5, 4, ""),
    )
    assert decoded.maximum_length == 0


@pytest.mark.parametrize(
    "body",
    [
        b"",
        bytes(67),
        bytes(68) + b"\x21\x00",  # truncated item header
        bytes(68) + b"\x21\x00\x00\x10\x01",  # item longer than the PDU
        bytes(68) + b"\x21\x00\x00\x02\x01\x00",  # presentation context item too short
        bytes(68) + b"\x21\x00\x00\x08\x01\x00\x00\x00\x40\x00\x00\x09",  # sub-item overrun
        bytes(68) + b"\x21\x00\x00\x09\x01\x00\x00\x00\x40\x00\x00\x01\xff",  # non-ASCII UID
        bytes(68) + b"\x50\x00\x00\x06\x51\x00\x00\x02\x00\x01",  # 2-byte maximum length
    ],
)
def test_malformed_accept_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed A-ASSOCIATE-AC"):
        decode_associate_ac(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(garbage: bytes) -> None:
    for body in (garbage, bytes(68) + garbage):
        with contextlib.suppress(ProtocolError):
            decode_associate_ac(body)


def test_dispatch_help_imports_neither_pydicom_nor_pynetdicom() -> None:
    script = (
        "import sys\n"
        "from mercli.cli import cli\n"
        "try:\n"
        "    cli.main(['dispatch', '--help'], prog_name='mercli')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import mercli.dispatch.dispatcher, mercli.dicom.scu.session, mercli.rules.config\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('pydicom', 'pynetdicom')]\n"
        "print('LOADED', sorted(loaded))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout
