"""`type = "dicom"` targets with `tls = true`: mercli dispatch -> DCMTK `storescp +tls` and
Orthanc with DICOM TLS, on loopback, with certificates made by the test (tests/certs.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from mercli.dicom.scu.association import DicomPeer, PeerTlsError
from mercli.dicom.scu.session import StoreSession
from mercli.dicom.tls import client_context
from mercli.spool import ERROR, SUCCESS, Spool
from tests.certs import Pki, make_pki
from tests.dicomfiles import dataset_bytes
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until
from tests.orthanckit import orthanc
from tests.test_dispatch import dicom_target, dispatch_once, routed, rules_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_storescp(out: Path, pki: Pki, *options: str, cert: Path | None = None) -> Iterator[int]:
    """DCMTK's storescp with TLS on a free port, writing what it gets to `out`."""
    out.mkdir(exist_ok=True)
    port = free_port()
    key, certificate = (
        (pki.other_key, pki.other_cert) if cert else (pki.server_key, pki.server_cert)
    )
    command = ["storescp", "+B", "+xa", "-pm", "-od", str(out)]
    command += ["+tls", str(key), str(certificate), "+cf", str(pki.ca), *options, str(port)]
    process = subprocess.Popen(
        command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: port_open(port), what="storescp +tls")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        assert process.stderr is not None
        process.stderr.close()


def tls_options(pki: Pki, *, client: bool = False, ca: Path | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"tls": True, "tls_ca": str(ca or pki.ca), "max_attempts": 1}
    if client:
        options |= {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    return options


def assert_byte_equal(out: Path, files: Sequence[Path]) -> None:
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    assert len(received) == len(files)
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(path)


def error_reason(spool: Spool) -> str:
    (item,) = spool.items(ERROR)
    return str(json.loads((item.path / "error.json").read_text())["reason"])


def test_series_reaches_storescp_over_tls_byte_for_byte(
    tmp_path: Path, spool: Spool, pki: Pki
) -> None:
    with tls_storescp(tmp_path / "out", pki, "-ic") as port:
        target = dicom_target("pacs", port, host="localhost", **tls_options(pki))
        files = routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.10": 12})
        result = dispatch_once(spool)
    assert result.returncode == 0, result.stderr
    assert len(spool.items(SUCCESS)) == 1
    assert_byte_equal(tmp_path / "out", files)


def test_mutual_tls_with_the_client_certificate_and_refused_without(
    tmp_path: Path, spool: Spool, pki: Pki
) -> None:
    with tls_storescp(tmp_path / "out", pki, "-rc") as port:  # client certificate required
        target = dicom_target("pacs", port, **tls_options(pki))
        routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.11": 2})
        started = time.monotonic()
        assert dispatch_once(spool).returncode == 1  # the job failed for good
        assert time.monotonic() - started < 30  # a refused handshake never hangs
        reason = error_reason(spool)
        assert "TLS" in reason and f"127.0.0.1:{port}" in reason, reason
        assert "client certificate" in reason
        assert not list((tmp_path / "out").iterdir())
    other = tmp_path / "second"
    spool2 = Spool.open(other / "spool")
    with tls_storescp(other / "out", pki, "-rc") as port:
        target = dicom_target("pacs", port, **tls_options(pki, client=True))
        files = routed(other, spool2, rules_for(other, target, '"pacs"'), {"1.2.12": 3})
        assert dispatch_once(spool2).returncode == 0
    assert len(spool2.items(SUCCESS)) == 1
    assert_byte_equal(other / "out", files)


def test_a_server_certificate_from_another_ca_is_refused(
    tmp_path: Path, spool: Spool, pki: Pki
) -> None:
    with tls_storescp(tmp_path / "out", pki, "-ic", cert=pki.other_cert) as port:
        target = dicom_target("pacs", port, **tls_options(pki))
        routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.13": 2})
        assert dispatch_once(spool).returncode == 1
    reason = error_reason(spool)
    assert "certificate not accepted" in reason and "local issuer" in reason, reason
    assert not list((tmp_path / "out").iterdir())


def test_a_server_certificate_for_another_host_name_is_refused(tmp_path: Path, pki: Pki) -> None:
    """The certificate is for localhost and 127.0.0.1; 127.0.0.2 is the same server, but not
    the name the certificate vouches for."""
    with tls_storescp(tmp_path / "out", pki, "-ic") as port:
        peer = DicomPeer("127.0.0.2", port, "ANY", tls=client_context(str(pki.ca)))
        with pytest.raises(PeerTlsError, match=r"127\.0\.0\.2"), StoreSession(peer, []):
            pass


def test_tls_to_a_plain_server_fails_fast_with_the_reason(
    tmp_path: Path, spool: Spool, pki: Pki
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    plain = subprocess.Popen(
        ["storescp", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), what="storescp")
        target = dicom_target("pacs", port, timeout="10s", **tls_options(pki))
        routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.14": 1})
        started = time.monotonic()
        assert dispatch_once(spool).returncode == 1
        assert time.monotonic() - started < 30
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    assert "TLS" in error_reason(spool)


def test_a_missing_ca_file_fails_the_job_naming_the_file(
    tmp_path: Path, spool: Spool, pki: Pki
) -> None:
    missing = tmp_path / "no-such-ca.pem"
    target = dicom_target("pacs", free_port(), **tls_options(pki, ca=missing))
    routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.15": 1})
    assert dispatch_once(spool).returncode == 1
    assert error_reason(spool) == f"TLS CA file {missing}: no such file"


def test_orthanc_with_dicom_tls_receives_the_series(tmp_path: Path, spool: Spool, pki: Pki) -> None:
    config = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.server_cert),
        "DicomTlsPrivateKey": str(pki.server_key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    with orthanc(tmp_path / "orthanc", config=config) as server:
        target = dicom_target(
            "pacs", server.dicom_port, called_aet=server.aet, **tls_options(pki, client=True)
        )
        files = routed(tmp_path, spool, rules_for(tmp_path, target, '"pacs"'), {"1.2.16": 5})
        result = dispatch_once(spool)
        assert result.returncode == 0, result.stderr
        assert len(spool.items(SUCCESS)) == 1, result.stderr
        for path in files:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            stored = tmp_path / "stored.dcm"
            stored.write_bytes(server.file_of(uid))
            assert dataset_bytes(stored) == dataset_bytes(path)


def test_an_encrypted_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    """A service has no terminal: OpenSSL must not ask for the key's password."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mercli.dicom.tls import TlsConfigError, server_context

    pki = make_pki(tmp_path / "pki")
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsConfigError, match="is encrypted: give an unencrypted key"):
        server_context(str(pki.server_cert), str(encrypted))
    with pytest.raises(TlsConfigError, match="is encrypted"):
        client_context(str(pki.ca), str(pki.client_cert), str(encrypted))
