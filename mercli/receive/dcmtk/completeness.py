"""Is a Part 10 file whole? A walk over its element lengths, without decoding a value.

Files that a receiving process was writing when it died (DCMTK's storescp streams a dataset
straight into its file) may end anywhere. Parsers stop at the pixel data or read short values
silently, so they cannot tell. This walk follows every length in the file: each element,
each sequence and item, each fragment of encapsulated pixel data must end at or before the
end of the file, and undefined lengths must be closed by their delimiters. It reads only
headers and seeks over values, so a 1 GB file costs a few reads.

What it cannot see: a file cut exactly at a top-level element boundary is indistinguishable
from a shorter dataset; callers use it only for files whose completeness nothing else proves.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import BinaryIO

EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
MAX_DEPTH = 64


class Truncated(Exception):
    """The file ends inside an element; the message says where."""


class _Reader:
    def __init__(self, fp: BinaryIO, size: int, *, little: bool, explicit: bool) -> None:
        self.fp, self.size = fp, size
        self.order = "<" if little else ">"
        self.explicit = explicit

    def at_end(self) -> bool:
        return self.fp.tell() >= self.size

    def read(self, count: int) -> bytes:
        data = self.fp.read(count)
        if len(data) != count:
            raise Truncated(f"file ends inside an element header at byte {self.fp.tell()}")
        return data

    def skip(self, count: int) -> None:
        position = self.fp.tell()
        if position + count > self.size:
            raise Truncated(
                f"value of {count} bytes at byte {position} runs past the end ({self.size})"
            )
        self.fp.seek(count, os.SEEK_CUR)

    def header(self) -> tuple[int, bytes, int]:
        group, element = struct.unpack(self.order + "HH", self.read(4))
        tag = group << 16 | element
        if group == 0xFFFE or not self.explicit:
            (length,) = struct.unpack(self.order + "I", self.read(4))
            return tag, b"", length
        vr = self.read(2)
        if vr in LONG_VRS:
            (length,) = struct.unpack(self.order + "I", self.read(6)[2:])
        else:
            (length,) = struct.unpack(self.order + "H", self.read(2))
        return tag, vr, length

    def dataset(self, until: int | None, depth: int) -> None:
        """Elements until the delimiter `until` (or the end of the file when None)."""
        if depth > MAX_DEPTH:
            raise Truncated(f"sequences nested deeper than {MAX_DEPTH}")
        while True:
            if until is None and self.at_end():
                return
            tag, vr, length = self.header()
            if tag == until:
                return
            if tag in (ITEM_END, SEQUENCE_END):
                raise Truncated(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length != UNDEFINED:
                self.skip(length)
            elif vr in (b"SQ", b"") or vr == b"UN":
                self.items(depth + 1, implicit_content=vr == b"UN")
            else:  # encapsulated pixel data: items of defined length
                self.items(depth + 1, implicit_content=False)

    def items(self, depth: int, *, implicit_content: bool) -> None:
        while True:
            tag, _, length = self.header()
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise Truncated(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length != UNDEFINED:
                self.skip(length)
                continue
            saved = self.explicit
            self.explicit = self.explicit and not implicit_content
            self.dataset(ITEM_END, depth)
            self.explicit = saved


def check_complete(path: str | os.PathLike[str]) -> str | None:
    """None when every length in the file closes inside it; else why it is incomplete."""
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if fp.read(132)[128:] != b"DICM":
                return "no DICM prefix: not a Part 10 file"
            meta = _Reader(fp, size, little=True, explicit=True)
            transfer_syntax = _meta_transfer_syntax(meta)
            if transfer_syntax in DEFLATED:
                return _check_deflated(fp, size)
            little = transfer_syntax != EXPLICIT_BE
            body = _Reader(fp, size, little=little, explicit=_looks_explicit(fp))
            body.dataset(None, 0)
    except Truncated as exc:
        return f"incomplete: {exc}"
    except (OSError, struct.error) as exc:
        return f"unreadable: {exc}"
    return None


def _meta_transfer_syntax(meta: _Reader) -> str:
    transfer_syntax = ""
    while not meta.at_end():
        position = meta.fp.tell()
        tag, _, length = meta.header()
        if tag >> 16 != 0x0002:
            meta.fp.seek(position)
            break
        if length == UNDEFINED:
            raise Truncated("undefined length in the file meta")
        if tag == 0x00020010:
            transfer_syntax = meta.read(length).rstrip(b"\x00 ").decode("ascii", "replace")
        else:
            meta.skip(length)
    return transfer_syntax


def _looks_explicit(fp: BinaryIO) -> bool:
    """Whether the first element carries a VR; as pydicom, trust the bytes over the meta."""
    position = fp.tell()
    vr = fp.read(6)[4:]
    fp.seek(position)
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _check_deflated(fp: BinaryIO, size: int) -> str | None:
    """A deflated dataset is whole when its zlib stream ends and what it holds walks clean."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        dataset = inflater.decompress(fp.read()) + inflater.flush()
    except zlib.error as exc:
        return f"incomplete: deflated stream is damaged ({exc})"
    if not inflater.eof:
        return f"incomplete: deflated stream ends early ({size} bytes)"
    body = _Reader(io.BytesIO(dataset), len(dataset), little=True, explicit=True)
    body.dataset(None, 0)
    return None
