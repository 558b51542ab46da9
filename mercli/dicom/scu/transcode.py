"""What a stored instance looks like to the sender, and how it is re-encoded when it must be.

The sender reads only a file's meta header (group 0002) and then streams the dataset bytes
exactly as they lie on disk, so a routed instance reaches its target bit for bit as it was
received. Only when the peer accepted none of the instance's own transfer syntax does pydicom
get involved, to decode it and write it again in a syntax the peer did accept:

- deflated -> explicit VR little endian: the inflated stream already is that encoding;
- compressed pixel data -> uncompressed: pydicom's decoders (`as_buffer`, which needs no
  NumPy; RLE is native, JPEG family needs pylibjpeg/GDCM plugins, else the instance is not
  sendable); the SOP Instance UID is kept, the values did not change; the Image Pixel
  attributes are made to describe the decoded frames (a JPEG's YBR_FULL_422 comes out of the
  decoder upsampled, colour by pixel: YBR_FULL, Planar Configuration 0);
- big endian -> little endian: pydicom re-encodes the element values but not the raw words of
  OW/OF/OL/OD/OV values (it documents that it does not swap), so those are swapped here, Pixel
  Data in units of its Bits Allocated when those are wider than an OW word;
- explicit <-> implicit VR little endian: plain pydicom re-encoding.

Never the other way round: mercli does not compress on the way out.
"""

from __future__ import annotations

import array
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mercli.errors import MercliError
from mercli.fsutil import open_plain_file

if TYPE_CHECKING:  # pydicom is imported by the functions that convert, not at start-up
    from pydicom.dataset import Dataset

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)  # what we fall back to, in order of preference

_META_READ = 64 * 1024  # meta headers are a few hundred bytes; this is plenty
_LONG_VRS = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()  # 4-byte length after 2 reserved bytes
)
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_ARRAY_CODE = {2: "H", 4: "I", 8: "Q"}
_PIXEL_DATA = 0x7FE00010


class InstanceNotSendable(MercliError):
    """This one instance cannot be delivered to this peer; the association goes on."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{reason} ({path.name})")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Instance:
    """A Part 10 file as the sender needs it: its UIDs and where its dataset starts."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    offset: int  # first byte of the dataset, after preamble and file meta
    size: int  # file size: the dataset is size - offset bytes

    @property
    def dataset_length(self) -> int:
        return self.size - self.offset


def read_instance(path: Path) -> Instance:
    """Parse the file meta header by hand (explicit VR little endian, PS3.10 7.1)."""
    try:
        with open_plain_file(path) as file:
            head = file.read(_META_READ)
            size = path.stat().st_size
    except OSError as exc:
        raise InstanceNotSendable(path, f"cannot read the file: {exc.strerror}") from exc
    if head[128:132] != b"DICM":
        raise InstanceNotSendable(path, "not a DICOM Part 10 file (no DICM prefix)")
    values, offset = _meta_elements(path, head)
    missing = [name for name, tag in _META_TAGS.items() if not values.get(tag)]
    if missing:
        raise InstanceNotSendable(path, f"file meta lacks {', '.join(missing)}")
    return Instance(
        path=path,
        sop_class=values[0x0002],
        sop_instance=values[0x0003],
        transfer_syntax=values[0x0010],
        offset=offset,
        size=size,
    )


_META_TAGS = {
    "MediaStorageSOPClassUID": 0x0002,
    "MediaStorageSOPInstanceUID": 0x0003,
    "TransferSyntaxUID": 0x0010,
}


def _meta_elements(path: Path, head: bytes) -> tuple[dict[int, str], int]:
    """The UI values of group 0002 by element number, and the offset just past the group."""
    values: dict[int, str] = {}
    offset = 132
    while offset + 8 <= len(head):
        group, number = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return values, offset
        vr = head[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", head, offset + 8)[0]
            start = offset + 12
        else:
            length = struct.unpack_from("<H", head, offset + 6)[0]
            start = offset + 8
        if vr == b"UI":
            values[number] = (
                head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
            )
        offset = start + length
    raise InstanceNotSendable(path, "file meta header is truncated or too long")


def usable_syntax(instance: Instance, accepted: list[str]) -> str | None:
    """Which of the peer's accepted syntaxes this instance goes in: its own, else one we can
    losslessly convert it to (explicit VR LE first: it keeps the VRs), else None."""
    if instance.transfer_syntax in accepted:
        return instance.transfer_syntax
    for syntax in UNCOMPRESSED:
        if syntax in accepted:
            return syntax
    return None


def encode(instance: Instance, syntax: str) -> bytes:
    """The instance's dataset re-encoded in `syntax` (little endian, uncompressed)."""
    source = instance.transfer_syntax
    if source == DEFLATED_LE and syntax == EXPLICIT_LE:
        return _inflate(instance)
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    try:
        ds = dcmread(instance.path, force=True)
    except Exception as exc:  # pydicom raises many kinds on a broken file
        raise InstanceNotSendable(instance.path, f"cannot parse the dataset: {exc}") from exc
    if UID(source).is_compressed and "PixelData" in ds:
        _decompress(instance, ds)
    if source == EXPLICIT_BE:
        _swap_words(ds)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, syntax == IMPLICIT_LE
    try:
        write_dataset(out, ds)
    except Exception as exc:
        raise InstanceNotSendable(instance.path, f"cannot re-encode the dataset: {exc}") from exc
    return out.getvalue()


def _inflate(instance: Instance) -> bytes:
    with open_plain_file(instance.path) as file:
        file.seek(instance.offset)
        try:
            return zlib.decompress(file.read(), -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise InstanceNotSendable(instance.path, f"broken deflate stream: {exc}") from exc


def _decompress(instance: Instance, ds: Dataset) -> None:
    """Replace encapsulated Pixel Data by its decoded frames, as `Dataset.decompress` would."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    name = UID(instance.transfer_syntax).name
    try:
        pixels, image = get_decoder(UID(instance.transfer_syntax)).as_buffer(ds)
    except Exception as exc:  # no decoder, all plugins missing, or a broken codestream
        raise InstanceNotSendable(
            instance.path,
            f"peer does not accept {name} and it cannot be decompressed here: {exc}",
        ) from exc
    data = bytes(pixels)
    element = ds["PixelData"]
    element.value = data + b"\x00" if len(data) % 2 else data
    element.is_undefined_length = False
    element.VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds.PhotometricInterpretation = _decoded_photometric(image, len(data))
    if int(image.get("samples_per_pixel", 1)) > 1:
        ds.PlanarConfiguration = int(image.get("planar_configuration") or 0)


def _decoded_photometric(image: dict[str, Any], length: int) -> str:
    """The Photometric Interpretation of `length` decoded bytes described by `image`.

    The decoder says what it did: RGB if it converted the colour. But pydicom 3.0 passes a
    JPEG's YBR_FULL_422 on unchanged although its JPEG decoders upsample the chroma, and native
    YBR_FULL_422 means the subsampled layout (PS3.3 C.7.6.3.1.2): frames of full size are
    YBR_FULL.
    """
    photometric = str(image["photometric_interpretation"])
    if photometric != "YBR_FULL_422":
        return photometric
    full = (
        int(image["rows"])
        * int(image["columns"])
        * int(image.get("samples_per_pixel") or 1)
        * int(image.get("number_of_frames") or 1)
        * ((int(image["bits_allocated"]) + 7) // 8)
    )
    return "YBR_FULL" if length >= full else photometric


def _swap_words(ds: Dataset) -> None:
    """Turn the raw big endian words of OW/OF/OL/OD/OV values into little endian ones.

    Pixel Data of 32 or 64 bits allocated may be OW on the wire, but its values are as wide as
    its pixels (so pydicom and DCMTK read it): those are swapped whole, by the Bits Allocated of
    their own dataset (an icon in a sequence has its own).
    """
    bits = ds.get("BitsAllocated")
    pixel_width = int(bits) // 8 if isinstance(bits, int) and bits > 16 else 0
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                _swap_words(item)
            continue
        width = _SWAP_WIDTH.get(str(element.VR))
        if width == 2 and element.tag == _PIXEL_DATA and pixel_width in _ARRAY_CODE:
            width = pixel_width
        value = element.value
        if width and isinstance(value, bytes) and value and len(value) % width == 0:
            words = array.array(_ARRAY_CODE[width], value)
            words.byteswap()
            element.value = words.tobytes()
