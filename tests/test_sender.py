"""The C-STORE SCU against real peers on loopback: DCMTK storescp and pynetdicom AEs."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit
from pynetdicom import AE, StoragePresentationContexts, evt

from mercli.dicom.dimse import status_category
from mercli.dicom.scu.session import (
    DicomPeer,
    InstanceNotSendable,
    PeerAborted,
    PeerRefused,
    PeerTimeout,
    PeerUnreachable,
    StoreSession,
    TooManyContexts,
    echo,
    propose,
)
from mercli.dicom.scu.transcode import EXPLICIT_LE, IMPLICIT_LE, Instance, read_instance
from tests.dicomfiles import CORPUS, PYDICOM_DATA, dataset_bytes, make_instance
from tests.netkit import DCMTK_ENV, free_port, port_open, wait_until

MR = PYDICOM_DATA / "test_files"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[DicomPeer, Path, subprocess.Popen[bytes]]]:
    """DCMTK storescp, bit-preserving, accepting every syntax and SOP class it knows."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "+B", "+xa", "-pm", "-dhl", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), what="storescp")
        yield DicomPeer("127.0.0.1", port, "STORESCP", timeout=30), out, process
    finally:
        process.kill()
        process.wait(timeout=30)


class Scp:
    """A pynetdicom AE SCP on a free port, recording what it stored."""

    def __init__(
        self,
        syntaxes: list[str],
        status: Callable[[Any], int] = lambda event: 0x0000,
        sop_classes: list[str] | None = None,
    ) -> None:
        self.received: list[tuple[str, Any]] = []  # (transfer syntax, dataset)
        self.status = status
        ae = AE(ae_title="PYSCP")
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0
        for context in StoragePresentationContexts:
            if sop_classes is None or context.abstract_syntax in sop_classes:
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context("1.2.840.10008.1.1", syntaxes)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.peer = DicomPeer("127.0.0.1", self.port, "PYSCP", timeout=10)

    def _store(self, event: Any) -> int:
        self.received.append((str(event.context.transfer_syntax), event.dataset))
        return self.status(event)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp_factory() -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(*args: Any, **kwargs: Any) -> Scp:
        started.append(Scp(*args, **kwargs))
        return started[-1]

    yield start
    for scp in started:
        scp.close()


def sendable_corpus() -> list[Path]:
    usable = []
    for path in CORPUS:
        try:
            read_instance(path)
        except InstanceNotSendable:
            continue
        usable.append(path)
    return usable


def test_series_reaches_storescp_byte_for_byte(
    tmp_path: Path, storescp: tuple[DicomPeer, Path, subprocess.Popen[bytes]]
) -> None:
    peer, out, _ = storescp
    files = [make_instance(tmp_path, series="1.2.3", number=n) for n in range(20)]
    files.append(make_instance(tmp_path, rows=1024, columns=1024, number=99))  # many PDUs
    with StoreSession(peer, files) as session:
        assert [session.store(path) for path in files] == [0] * len(files)
    received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(received[uid]) == dataset_bytes(path)
    assert echo(peer) == 0


def test_pydicom_corpus_reaches_storescp_byte_for_byte(
    storescp: tuple[DicomPeer, Path, subprocess.Popen[bytes]],
) -> None:
    """Each corpus file that went in its own syntax arrives bit for bit as it was on disk."""
    peer, out, _ = storescp
    files = sendable_corpus()
    assert len(files) > 60
    compared = converted = 0
    for batch in (files[n : n + 25] for n in range(0, len(files), 25)):
        with StoreSession(peer, batch) as session:
            for path in batch:
                status = session.store(path)
                assert status_category(status) != "failure", (path.name, hex(status))
                (landed,) = out.iterdir()
                syntax = dcmread(landed, stop_before_pixels=True).file_meta.TransferSyntaxUID
                if syntax == read_instance(path).transfer_syntax:
                    sent = dataset_bytes(path)
                    sent += b"\x00" * (len(sent) % 2)  # odd datasets are padded (PS3.5 A.5)
                    assert dataset_bytes(landed) == sent, path.name
                    compared += 1
                else:
                    converted += 1
                landed.unlink()
    assert compared > 60 and compared + converted == len(files)


def test_statuses_are_returned_and_categorised(
    tmp_path: Path, scp_factory: Callable[..., Scp]
) -> None:
    files = [make_instance(tmp_path, number=n) for n in range(5)]
    wanted = {1: 0xA700, 2: 0xC000, 3: 0xB000}
    scp = scp_factory(
        [EXPLICIT_LE, IMPLICIT_LE], status=lambda event: wanted.get(event.dataset.InstanceNumber, 0)
    )
    with StoreSession(scp.peer, files) as session:
        statuses = [session.store(path) for path in files]
    assert statuses == [0, 0xA700, 0xC000, 0xB000, 0]
    assert [status_category(s) for s in statuses] == [
        "success",
        "failure",
        "failure",
        "warning",
        "success",
    ]
    assert len(scp.received) == 5


@pytest.mark.parametrize(
    ("status", "category"),
    [
        *[(0x0000, "success"), (0x0001, "warning"), (0x0107, "warning"), (0x0116, "warning")],
        *[(0xB000, "warning"), (0xB006, "warning"), (0xB007, "warning"), (0xA7FF, "failure")],
        *[(0xA900, "failure"), (0xC123, "failure"), (0x0122, "failure"), (0x0124, "failure")],
        *[(0x0211, "failure"), (0xFF00, "failure")],
    ],
)
def test_status_category(status: int, category: str) -> None:
    assert status_category(status) == category


def test_wrong_called_aet_is_refused_in_words(scp_factory: Callable[..., Scp]) -> None:
    scp = scp_factory([EXPLICIT_LE])
    peer = DicomPeer("127.0.0.1", scp.port, "NOT_PYSCP", timeout=10)
    with pytest.raises(PeerRefused, match="called AE title not recognised") as raised:
        echo(peer)
    assert raised.value.transient is False and raised.value.exit_code == 5


@pytest.mark.parametrize("syntax", [IMPLICIT_LE, EXPLICIT_LE])
def test_originals_the_peer_refuses_are_converted(
    scp_factory: Callable[..., Scp], syntax: str
) -> None:
    """RLE decoded, big endian swapped, deflate inflated: the peer gets the same values."""
    scp = scp_factory([syntax])
    reference = dcmread(MR / "MR_small.dcm")
    files = [MR / "MR_small_RLE.dcm", MR / "MR_small_bigendian.dcm", MR / "MR_small_expb.dcm"]
    deflated = MR / "image_dfl.dcm"
    with StoreSession(scp.peer, [*files, deflated]) as session:
        assert [session.store(path) for path in [*files, deflated]] == [0] * 4
    assert [received for received, _ in scp.received] == [syntax] * 4
    for _, ds in scp.received[:3]:
        assert ds.PixelData == reference.PixelData
        assert ds.SOPInstanceUID == reference.SOPInstanceUID  # identity kept
        assert ds.Rows == reference.Rows and ds.PatientName == reference.PatientName
    original = dcmread(deflated)
    assert scp.received[3][1].PixelData == original.PixelData
    assert scp.received[3][1].SOPInstanceUID == original.SOPInstanceUID


def received_images(scp: Scp) -> list[Any]:
    """What the peer stored, each able to decode its pixels in the syntax it came in."""
    images = []
    for syntax, ds in scp.received:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        images.append(ds)
    return images


@pytest.mark.parametrize("syntax", [IMPLICIT_LE, EXPLICIT_LE])
def test_big_endian_32_bit_pixels_are_swapped_a_pixel_at_a_time(
    scp_factory: Callable[..., Scp], syntax: str
) -> None:
    """RT doses with 32 bits allocated, OW on the wire: each 4-byte value is reversed whole,
    so the peer gets the values of the big endian file and of its little endian twin."""
    scp = scp_factory([syntax])
    pairs = {"rtdose_expb_1frame.dcm": "rtdose_1frame.dcm", "rtdose_expb.dcm": "rtdose.dcm"}
    files = [MR / name for name in pairs]
    with StoreSession(scp.peer, files) as session:
        assert [session.store(path) for path in files] == [0, 0]
    for ds, (big, little) in zip(received_images(scp), pairs.items(), strict=True):
        assert ds.BitsAllocated == 32 and ds.SOPInstanceUID == dcmread(MR / big).SOPInstanceUID
        assert numpy.array_equal(ds.pixel_array, dcmread(MR / big).pixel_array), big
        assert numpy.array_equal(ds.pixel_array, dcmread(MR / little).pixel_array), little
        assert ds.PixelData == dcmread(MR / little).PixelData


@pytest.mark.parametrize("syntax", [IMPLICIT_LE, EXPLICIT_LE])
def test_jpeg_ybr_full_422_is_sent_labelled_as_the_decoder_left_it(
    scp_factory: Callable[..., Scp], syntax: str
) -> None:
    """pydicom's JPEG decoders upsample 4:2:2 chroma and keep YBR: the native copy is YBR_FULL,
    colour by pixel (native YBR_FULL_422 would mean the subsampled layout, a third smaller)."""
    assert get_decoder(JPEGBaseline8Bit).is_available
    scp = scp_factory([syntax])
    names = ["SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", "examples_ybr_color.dcm"]
    files = [MR / name for name in names]
    with StoreSession(scp.peer, files) as session:
        assert [session.store(path) for path in files] == [0] * 3
    for ds, path in zip(received_images(scp), files, strict=True):
        source = dcmread(path)
        assert source.PhotometricInterpretation == "YBR_FULL_422", path.name
        assert ds.PhotometricInterpretation == "YBR_FULL" and ds.PlanarConfiguration == 0
        frames = int(source.get("NumberOfFrames") or 1)
        assert len(ds.PixelData) == frames * source.Rows * source.Columns * 3
        assert numpy.array_equal(ds.pixel_array, source.pixel_array), path.name  # both RGB
        ds.pixel_array_options(as_rgb=False)
        source.pixel_array_options(as_rgb=False)
        assert numpy.array_equal(ds.pixel_array, source.pixel_array), path.name  # both YBR


def test_undecodable_or_rejected_instances_fail_alone(
    tmp_path: Path, scp_factory: Callable[..., Scp]
) -> None:
    mr_image = "1.2.840.10008.5.1.4.1.1.4"
    scp = scp_factory([IMPLICIT_LE], sop_classes=[mr_image])
    j2k = MR / "MR_small_jp2klossless.dcm"
    ct = make_instance(tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    with StoreSession(scp.peer, [j2k, ct, broken, MR / "MR_small.dcm"]) as session:
        if not get_decoder(JPEG2000Lossless).is_available:
            with pytest.raises(InstanceNotSendable, match="cannot be decompressed"):
                session.store(j2k)
        with pytest.raises(InstanceNotSendable, match="SOP class not supported"):
            session.store(ct)
        with pytest.raises(InstanceNotSendable, match="not a DICOM Part 10 file"):
            session.store(broken)
        assert session.store(MR / "MR_small.dcm") == 0  # the association goes on
    assert scp.received[-1][1].SOPInstanceUID == dcmread(MR / "MR_small.dcm").SOPInstanceUID


def test_peer_abort_mid_job(tmp_path: Path, scp_factory: Callable[..., Scp]) -> None:
    def status(event: Any) -> int:
        if event.dataset.InstanceNumber == 3:
            event.assoc.abort()
        return 0

    scp = scp_factory([EXPLICIT_LE], status=status)
    files = [make_instance(tmp_path, number=n) for n in range(6)]
    delivered = []
    with pytest.raises(PeerAborted, match="aborted"), StoreSession(scp.peer, files) as session:
        for path in files:
            delivered.append(session.store(path))
    assert delivered == [0, 0, 0]


def test_peer_killed_mid_job(
    tmp_path: Path, storescp: tuple[DicomPeer, Path, subprocess.Popen[bytes]]
) -> None:
    peer, out, process = storescp
    files = [make_instance(tmp_path, number=n, rows=256, columns=256) for n in range(50)]
    with pytest.raises(PeerAborted, match=r"lost|closed"), StoreSession(peer, files) as session:
        for n, path in enumerate(files):
            session.store(path)
            if n == 5:
                process.kill()
    assert len(list(out.iterdir())) >= 6


def test_unreachable_port_fails_fast() -> None:
    started = time.monotonic()
    peer = DicomPeer("127.0.0.1", free_port(), "NOBODY", timeout=5)
    with pytest.raises(PeerUnreachable, match="connection refused"), StoreSession(peer, []):
        pass
    assert time.monotonic() - started < 2


def test_silent_peer_times_out(tmp_path: Path) -> None:
    """A socket that accepts TCP (the kernel does, from the backlog) but never speaks."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        peer = DicomPeer("127.0.0.1", listener.getsockname()[1], "SILENT", timeout=1)
        started = time.monotonic()
        with pytest.raises(PeerTimeout, match="did not answer within 1s") as raised:
            StoreSession(peer, [make_instance(tmp_path)]).open()
        assert 0.9 < time.monotonic() - started < 5
        assert isinstance(raised.value, PeerUnreachable)


def test_too_many_contexts_is_refused_before_connecting(tmp_path: Path) -> None:
    instances = [
        Instance(tmp_path / f"{n}.dcm", f"1.2.3.{n}", f"1.2.4.{n}", EXPLICIT_LE, 0, 0)
        for n in range(65)
    ]
    assert len(propose(instances[:64])) == 128
    with pytest.raises(TooManyContexts, match="130 presentation contexts"):
        propose(instances)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:7.0f} img/s"


@pytest.mark.parametrize(
    ("label", "count", "size"), [("12 KB", 2000, 76), ("512x512 CT", 200, 512)]
)
def test_throughput_against_storescu(
    tmp_path: Path,
    storescp: tuple[DicomPeer, Path, subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
    label: str,
    count: int,
    size: int,
) -> None:
    """Printed, never asserted (SPEC §6): the same files to storescp -od, mercli vs storescu."""
    peer, out, _ = storescp
    source = tmp_path / "source"
    source.mkdir()
    files = [
        make_instance(source, series="1.2.9", number=n, rows=size, columns=size)
        for n in range(count)
    ]
    started = time.monotonic()
    with StoreSession(peer, files) as session:
        assert all(session.store(path) == 0 for path in files)
    ours = time.monotonic() - started
    started = time.monotonic()
    result = subprocess.run(
        ["storescu", "+sd", "-aec", "STORESCP", "127.0.0.1", str(peer.port), str(source)],
        env=DCMTK_ENV,
        capture_output=True,
        check=False,
    )
    theirs = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == count
    with capsys.disabled():
        print(
            f"\n{label}: mercli {_rate(count, ours)}, storescu {_rate(count, theirs)}, "
            f"ratio {theirs / ours:.2f}"
        )
