"""`mercli.dicom.convert`: transcoding for a target's `transfer_syntax`, on pydicom's corpus.

Every corpus file is put in one bucket and the buckets are counted, so a codec that goes
missing or a file that stops converting fails a test instead of skipping quietly.
"""

from __future__ import annotations

import struct
import subprocess
import time
import tracemalloc
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pydicom
import pytest
from pydicom.encaps import generate_fragments

from mercli.dicom.convert import (
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    RLE_LOSSLESS,
    ImplausibleImage,
    Limits,
    LossyNotAllowed,
    NoCodec,
    TranscodeError,
    UnsupportedImage,
    UnsupportedTarget,
    transcode_file,
)
from mercli.dicom.scu.association import DicomPeer
from mercli.dicom.scu.session import StoreSession
from mercli.dicom.scu.transcode import InstanceNotSendable
from tests.dicomfiles import CORPUS, PYDICOM_DATA, make_instance
from tests.netkit import DCMTK_ENV, dcmtk, free_port, port_open, wait_until

FILES = PYDICOM_DATA / "test_files"
COMPRESSED = [RLE_LOSSLESS, JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS]
# Corpus files that cannot be converted to anything, and why (pydicom cannot decode them
# either: a broken codestream, truncated or unparsable pixel attributes, no SOP UIDs).
BROKEN = {
    "JPEG2000-embedded-sequence-delimiter.dcm": NoCodec,
    "MR_truncated.dcm": ImplausibleImage,
    "badVR.dcm": ImplausibleImage,
    "meta_missing_tsyntax.dcm": TranscodeError,
    "nested_priv_SQ.dcm": TranscodeError,
    "empty_charset_LEI.dcm": TranscodeError,
}
# What only DCMTK decodes (pydicom's libjpeg plugin refuses its odd scan header).
DCMTK_ONLY = {"JPEG-lossy.dcm"}
# What each lossless codec refuses from the corpus, by reason: 32- and 1-bit data, 4:2:2
# uncompressed colour, and images the codec library fails on (3x3 colour; OpenJPEG on the two
# near-lossless JPEG-LS images).
BIT_DEPTH = {
    "SC_rgb_rle_32bit.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "liver_1frame.dcm",
    "liver_expb_1frame.dcm",
    "rtdose.dcm",
    "rtdose_1frame.dcm",
    "rtdose_expb.dcm",
    "rtdose_expb_1frame.dcm",
    "rtdose_rle.dcm",
    "rtdose_rle_1frame.dcm",
}
SMALL_ODD = {"SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd_jpeg.dcm"}
YBR_422 = "SC_ybr_full_422_uncompressed.dcm"
REFUSED = {
    RLE_LOSSLESS: BIT_DEPTH | {YBR_422},
    JPEG_LS_LOSSLESS: BIT_DEPTH | SMALL_ODD | {YBR_422},
    JPEG_2000_LOSSLESS: BIT_DEPTH
    | SMALL_ODD
    | {YBR_422, "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm"},
}


def reference(path: Path) -> tuple[Any, Any]:
    """(dataset, pixels as pydicom decodes them) or (None, None) if pydicom cannot read it;
    pixels is None without pixel data and an exception if pydicom cannot decode them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            return None, None
        if "PixelData" not in ds:
            return ds, None
        try:
            return ds, ds.pixel_array
        except Exception as exc:
            return ds, exc


def decoded(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path).pixel_array


def convert_corpus(tmp_path: Path, target: str, **options: Any) -> Iterator[tuple[str, Any]]:
    """(bucket, detail) for every corpus file converted to `target`."""
    for path in CORPUS:
        ds, pixels = reference(path)
        if ds is None:
            yield "not dicom", path.name
            continue
        out = tmp_path / path.name
        try:
            transcode_file(path, out, target, **options)
        except TranscodeError as exc:
            assert not out.exists()
            assert exc.path == path and path.name in str(exc)
            yield "refused", (path.name, exc)
            continue
        check_file_meta(out, target)
        if path.name in DCMTK_ONLY:
            assert isinstance(pixels, Exception)  # still true? else move it to the others
            yield "dcmtk only", path.name
            continue
        assert isinstance(pixels, numpy.ndarray | None), f"{path.name}: converted undecodable"
        if pixels is None:
            yield "no pixels", path.name
        elif numpy.array_equal(decoded(out), pixels):
            yield "equal", path.name
        else:
            yield "different", path.name


def check_file_meta(path: Path, target: str) -> None:
    """Group length, syntax, SOP UIDs; encapsulated: one fragment per frame, offsets right."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    group_end = 144 + struct.unpack_from("<I", data, 140)[0]
    offset = 144  # walk the group's elements: they must end exactly where its length says
    while offset < group_end:
        assert struct.unpack_from("<H", data, offset)[0] == 0x0002
        if data[offset + 4 : offset + 6] in (b"OB", b"UN", b"UT", b"SQ"):
            offset += 12 + struct.unpack_from("<I", data, offset + 8)[0]
        else:
            offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]
    assert offset == group_end and struct.unpack_from("<H", data, offset)[0] != 0x0002
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == target
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.get(
        "SOPInstanceUID", ds.file_meta.MediaStorageSOPInstanceUID
    )
    assert not [e for e in ds.iterall() if e.tag.element == 0 and e.tag.group != 2]
    if (
        target in [*COMPRESSED, JPEG_2000, JPEG_LS_NEAR_LOSSLESS, JPEG_BASELINE]
        and "PixelData" in ds
    ):
        value = ds.PixelData
        frames = int(ds.get("NumberOfFrames") or 1)
        table_length = struct.unpack_from("<I", value, 4)[0]
        offsets = struct.unpack_from(f"<{table_length // 4}I", value, 8)
        fragments = list(generate_fragments(value))
        assert len(offsets) == frames and len(fragments) == frames + 1  # + the table item
        position, expected = 0, []
        for fragment in fragments[1:]:
            expected.append(position)
            position += 8 + len(fragment)
        assert list(offsets) == expected


def buckets(results: list[tuple[str, Any]]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for bucket, detail in results:
        grouped.setdefault(bucket, []).append(detail)
    return grouped


def test_corpus_is_what_these_tests_count() -> None:
    readable = Counter(reference(p)[0] is not None for p in CORPUS)
    assert readable[True] >= 91 and readable[False] <= 12  # text, JSON, no-meta files


@pytest.mark.parametrize("target", [EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE])
def test_every_decodable_file_converts_to_uncompressed_with_equal_pixels(
    tmp_path: Path, target: str
) -> None:
    found = buckets(list(convert_corpus(tmp_path, target)))
    refused = {name: type(exc) for name, exc in found["refused"]}
    assert set(refused) == set(BROKEN)
    for name, kind in BROKEN.items():
        assert issubclass(refused[name], kind), name
    assert "different" not in found and found["dcmtk only"] == sorted(DCMTK_ONLY)
    assert len(found["equal"]) >= 70 and len(found["no pixels"]) >= 14
    assert len(found["not dicom"]) <= 12


@pytest.mark.parametrize("target", COMPRESSED)
def test_every_decodable_file_converts_losslessly_or_is_refused_in_words(
    tmp_path: Path, target: str
) -> None:
    found = buckets(list(convert_corpus(tmp_path, target)))
    refused = {name: exc for name, exc in found["refused"]}
    assert set(refused) == set(BROKEN) | REFUSED[target]
    for name in BIT_DEPTH:
        assert isinstance(refused[name], UnsupportedImage), name
        assert "bits allocated" in str(refused[name])
    assert isinstance(refused[YBR_422], UnsupportedImage)
    assert "cannot encode YBR_FULL_422" in str(refused[YBR_422])
    assert "different" not in found and found["dcmtk only"] == sorted(DCMTK_ONLY)
    assert len(found["equal"]) >= 54 and len(found["no pixels"]) >= 14


def synthetic(folder: Path) -> dict[str, Path]:
    """Uncompressed images the corpus lacks: multi-frame 12-in-16 bit, signed 16 bit, and
    8-bit RGB stored colour-by-plane."""
    rgb = bytes(range(256)) * 48  # 64 x 64 x 3
    return {
        "multiframe": make_instance(
            folder,
            filename="multiframe.dcm",
            NumberOfFrames=3,
            PixelData=b"".join(struct.pack("<H", (7 * i) % 4096) for i in range(3 * 64 * 64)),
        ),
        "signed": make_instance(
            folder,
            filename="signed.dcm",
            PixelRepresentation=1,
            BitsStored=16,
            HighBit=15,
            PixelData=b"".join(struct.pack("<h", v) for v in range(-2048, 2048)),
        ),
        "rgb-by-plane": make_instance(
            folder,
            filename="rgb.dcm",
            SamplesPerPixel=3,
            PhotometricInterpretation="RGB",
            PlanarConfiguration=1,
            BitsAllocated=8,
            BitsStored=8,
            HighBit=7,
            PixelData=rgb,
        ),
    }


@pytest.mark.parametrize("target", COMPRESSED)
def test_round_trip_through_each_lossless_codec_gives_the_original_back(
    tmp_path: Path, target: str
) -> None:
    for name, original in synthetic(tmp_path).items():
        compressed, back = tmp_path / f"{name}.c.dcm", tmp_path / f"{name}.back.dcm"
        transcode_file(original, compressed, target)
        check_file_meta(compressed, target)
        transcode_file(compressed, back, EXPLICIT_LE)
        before, after = pydicom.dcmread(original), pydicom.dcmread(back)
        assert numpy.array_equal(after.pixel_array, before.pixel_array), name
        if name != "rgb-by-plane":  # that one comes back colour-by-pixel, same values
            assert after.PixelData == before.PixelData
        assert after.SOPInstanceUID == before.SOPInstanceUID
        assert "LossyImageCompression" not in after


@pytest.mark.parametrize(
    ("target", "tool"), [(RLE_LOSSLESS, "dcmdrle"), (JPEG_LS_LOSSLESS, "dcmdjpls")]
)
def test_dcmtk_decodes_what_we_encode_to_the_same_pixels(
    tmp_path: Path, target: str, tool: str
) -> None:
    """An independent decoder: DCMTK's, for the two codecs it has."""
    for name, original in synthetic(tmp_path).items():
        compressed, back = tmp_path / f"{name}.c.dcm", tmp_path / f"{name}.d.dcm"
        transcode_file(original, compressed, target)
        result = dcmtk([tool, str(compressed), str(back)], timeout=60)
        assert result.returncode == 0, result.stderr
        assert numpy.array_equal(decoded(back), decoded(original)), name


def test_lossy_targets_are_refused_unless_allowed(tmp_path: Path) -> None:
    source = FILES / "CT_small.dcm"
    for target in (JPEG_LS_NEAR_LOSSLESS, JPEG_2000, JPEG_BASELINE):
        with pytest.raises(LossyNotAllowed, match="lossy and allow_lossy is not set") as caught:
            transcode_file(source, tmp_path / "out.dcm", target)
        assert caught.value.path == source and "CT_small.dcm" in str(caught.value)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("target", "method", "error"),
    [(JPEG_LS_NEAR_LOSSLESS, "ISO_14495_1", 2), (JPEG_2000, "ISO_15444_1", None)],
)
def test_lossy_output_says_so(tmp_path: Path, target: str, method: str, error: int | None) -> None:
    source, out = FILES / "CT_small.dcm", tmp_path / "out.dcm"
    transcode_file(source, out, target, allow_lossy=True)
    check_file_meta(out, target)
    ds = pydicom.dcmread(out)
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == method
    assert float(ds.LossyImageCompressionRatio) > 1
    difference = numpy.abs(ds.pixel_array.astype(int) - decoded(source).astype(int))
    if error is not None:
        assert difference.max() <= error  # near-lossless keeps its promise


def test_jpeg_baseline_is_made_by_dcmtk_for_8_bit_images_only(tmp_path: Path) -> None:
    source, out = FILES / "SC_rgb_rle.dcm", tmp_path / "out.dcm"
    transcode_file(source, out, JPEG_BASELINE, allow_lossy=True)
    check_file_meta(out, JPEG_BASELINE)
    ds, original = pydicom.dcmread(out), pydicom.dcmread(source)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.LossyImageCompression == "01" and "ISO_10918_1" in str(ds.LossyImageCompressionMethod)
    difference = numpy.abs(ds.pixel_array.astype(int) - original.pixel_array.astype(int))
    assert difference.mean() < 3
    with pytest.raises(UnsupportedImage, match=r"JPEG Baseline .* holds 8 bits, not 16"):
        transcode_file(FILES / "CT_small.dcm", tmp_path / "ct.dcm", JPEG_BASELINE, allow_lossy=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]


def test_a_lossy_source_stays_marked_lossy(tmp_path: Path) -> None:
    out = tmp_path / "out.dcm"
    transcode_file(FILES / "SC_rgb_jpeg_dcmtk.dcm", out, JPEG_LS_LOSSLESS)
    ds = pydicom.dcmread(out)
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"


@pytest.mark.parametrize("target", ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.51", "1.2.3"])
def test_unsupported_targets_are_refused(tmp_path: Path, target: str) -> None:
    with pytest.raises(UnsupportedTarget, match="is not supported"):
        transcode_file(FILES / "CT_small.dcm", tmp_path / "out.dcm", target, allow_lossy=True)


def test_a_broken_codestream_fails_and_leaves_nothing(tmp_path: Path) -> None:
    data = bytearray((FILES / "MR_small_jp2klossless.dcm").read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ: the codestream
    data[start + 4 : start + 64] = b"\xff" * 60
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(data))
    out = tmp_path / "out" / "x.dcm"
    out.parent.mkdir()
    with pytest.raises(NoCodec, match=r"(?s)cannot decode JPEG 2000 .*\(broken.dcm\)"):
        transcode_file(broken, out, EXPLICIT_LE)
    assert list(out.parent.iterdir()) == []  # no half file, no temp file


def test_what_pydicom_cannot_decode_dcmtk_may(tmp_path: Path) -> None:
    source, out = FILES / "JPEG-lossy.dcm", tmp_path / "out.dcm"
    with pytest.raises(Exception, match="scan start must be zero"):
        decoded(source)
    transcode_file(source, out, EXPLICIT_LE)
    ds, original = pydicom.dcmread(out), pydicom.dcmread(source)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.LossyImageCompression == "01" and ds.pixel_array.shape == (1024, 256)
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]  # DCMTK's temporary is gone


def test_when_dcmtk_cannot_decode_either_both_reasons_are_given(tmp_path: Path) -> None:
    data = bytearray((FILES / "MR_small_jpeg_ls_lossless.dcm").read_bytes())
    start = data.find(b"\xff\xd8\xff")  # JPEG-LS SOI: the codestream
    data[start + 2 : start + 200] = b"\x00" * 198
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(data))
    with pytest.raises(NoCodec, match=r"(?s)cannot decode JPEG-LS.*dcmdjpls failed too.*\(broken"):
        transcode_file(broken, tmp_path / "out.dcm", RLE_LOSSLESS)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.dcm"]


def test_a_file_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(TranscodeError, match=r"not a readable DICOM file.*\(junk.dcm\)"):
        transcode_file(junk, tmp_path / "out.dcm", EXPLICIT_LE)


def hostile(folder: Path, compressed: bool) -> Path:
    """A header claiming 65535 x 65535 x 3 x 16 bit x 1000 frames over a few bytes of pixels."""
    claims = {"Rows": 65535, "Columns": 65535, "SamplesPerPixel": 3, "NumberOfFrames": 1000}
    if not compressed:
        return make_instance(folder, filename="hostile.dcm", **claims)
    ds = pydicom.dcmread(FILES / "MR_small_RLE.dcm")
    for keyword, value in claims.items():
        setattr(ds, keyword, value)
    path = folder / "hostile-rle.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("target", [EXPLICIT_LE, RLE_LOSSLESS])
def test_a_hostile_header_fails_fast_without_allocating(
    tmp_path: Path, compressed: bool, target: str
) -> None:
    path = hostile(tmp_path, compressed)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ImplausibleImage, match=r"header claims|cannot hold"):
            transcode_file(path, tmp_path / "out.dcm", target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2 and peak < 50 * 1024 * 1024


def test_plausible_claims_are_checked_against_the_data_and_the_limits(tmp_path: Path) -> None:
    ds = pydicom.dcmread(FILES / "MR_small_RLE.dcm")
    ds.NumberOfFrames = 2  # one fragment cannot hold two frames
    two = tmp_path / "two.dcm"
    ds.save_as(two)
    with pytest.raises(ImplausibleImage, match="1 pixel data fragments cannot hold 2 frames"):
        transcode_file(two, tmp_path / "out.dcm", EXPLICIT_LE)
    with pytest.raises(ImplausibleImage, match="header claims 8192 bytes"):
        transcode_file(
            FILES / "MR_small.dcm",
            tmp_path / "out.dcm",
            RLE_LOSSLESS,
            limits=Limits(max_frame_bytes=8191),
        )


STORESCP_CONFIG = """\
[[TransferSyntaxes]]
[Only]
TransferSyntax1 = {syntax}

[[PresentationContexts]]
[Contexts]
PresentationContext1 = 1.2.840.10008.5.1.4.1.1.4\\Only
PresentationContext2 = 1.2.840.10008.5.1.4.1.1.2\\Only

[[Profiles]]
[OnlyThis]
PresentationContexts = Contexts
"""


@pytest.fixture
def storescp_only(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[DicomPeer, Path]]:
    """DCMTK storescp accepting MR and CT in one transfer syntax only (-xf config profile)."""
    config = tmp_path / "storescp.cfg"
    config.write_text(STORESCP_CONFIG.format(syntax=request.param))
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "+B", "-xf", str(config), "OnlyThis", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port), what="storescp")
        yield DicomPeer("127.0.0.1", port, "STORESCP", timeout=30), out
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize("storescp_only", [JPEG_LS_LOSSLESS, RLE_LOSSLESS], indirect=True)
def test_a_peer_that_takes_only_the_target_syntax_gets_it(
    tmp_path: Path, storescp_only: tuple[DicomPeer, Path]
) -> None:
    peer, received = storescp_only
    target = (tmp_path / "storescp.cfg").read_text().split("TransferSyntax1 = ")[1].split()[0]
    sources = [
        FILES / name for name in ("CT_small.dcm", "MR_small_jp2klossless.dcm", "693_J2KI.dcm")
    ]
    converted = []
    for number, source in enumerate(sources):
        converted.append(tmp_path / f"{number}.dcm")
        transcode_file(source, converted[-1], target)
    with StoreSession(peer, [sources[0], *converted]) as session:  # CT_small: explicit LE
        with pytest.raises(InstanceNotSendable):  # the original: the peer takes nothing else
            session.store(sources[0])
        assert [session.store(path) for path in converted] == [0, 0, 0]
    files = sorted(received.iterdir())
    assert len(files) == 3
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == target
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in files}
    for source in sources:
        uid = pydicom.dcmread(source).SOPInstanceUID
        assert numpy.array_equal(decoded(by_uid[uid]), decoded(source))


def test_a_big_multiframe_is_converted_a_frame_at_a_time(tmp_path: Path) -> None:
    """200 frames of 256 x 256 x 16 bit (26 MB decoded): RLE -> explicit LE holds one frame."""
    ramp = numpy.repeat(numpy.arange(256, dtype="<u2")[:, None] * 16, 256, axis=1)  # by row
    frames = numpy.stack([(ramp + n) % 4096 for n in range(200)])
    native = make_instance(
        tmp_path,
        rows=256,
        columns=256,
        filename="big.dcm",
        NumberOfFrames=200,
        PixelData=frames.tobytes(),
    )
    rle, back = tmp_path / "big-rle.dcm", tmp_path / "big-back.dcm"
    transcode_file(native, rle, RLE_LOSSLESS)
    assert rle.stat().st_size < native.stat().st_size // 4
    tracemalloc.start()
    try:
        transcode_file(rle, back, EXPLICIT_LE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < rle.stat().st_size + 8 * 256 * 256 * 2  # the RLE data and a few frames
    assert pydicom.dcmread(back).PixelData == frames.tobytes()
