"""Sidecar tag extraction: the flat JSON object that sits next to every instance (SPEC §3).

Every instance `NAME.dcm` in the spool has a sidecar `NAME.tags`; rules are evaluated on it, so
routing never has to parse DICOM again. `read_tags` turns a DICOM file (`read_tags`) or a
dataset (`extract_tags`) into that object. `receive` adds its own metadata (SenderAET,
SenderAddress, ReceiverAET, ReceivedAt) on top; nothing here knows about it.

The format, value by value:

- Keys are DICOM keywords, in `SIDECAR_KEYWORDS` order, then the extra tags asked for. An extra
  tag with no keyword in the data dictionary (private tags, repeating groups such as 60xx) is
  keyed `GGGG,EEEE` in upper-case hex.
- Text VRs (AE AS CS DA DT LO LT PN SH ST TM UC UI UR UT) are strings, trimmed as pydicom
  trims them: trailing spaces and NULs of the whole value (AS CS DA DT TM UI, PN), of each value
  (LO SH UC), of the single value (LT ST UT, where a backslash is text); AE loses leading and
  trailing spaces; UR trailing whitespace. LO LT PN SH ST UC UT are decoded from (0008,0005)
  Specific Character Set. PN is its DICOM form `Family^Given^Middle`, ideographic and phonetic
  groups kept after `=` (trailing empty groups dropped). AT is `GGGG,EEEE`.
- Numbers: IS, US, UL, SS, SL, SV, UV are JSON integers. DS, FL and FD are JSON floats, always:
  a DS `5` is `5.0`, so a value's type never depends on how the modality happened to write it.
  FL is written as the shortest decimal that reads back to the same 32-bit float (`0.1`, not
  `0.10000000149011612`). A value that does not parse (IS `abc`, IS `1.5`) or is NaN or
  infinite (DS `NaN`, DS `1e999`) stays the string the file holds.
- Multi-valued elements are lists (each value converted as above; an empty value inside a list
  is `""`). A single value is a scalar.
- Missing elements are absent. Present-but-empty elements (zero length, only padding, or only
  empty values like `\\`) are absent too: rules read a missing keyword as `""`, so absence is
  what an empty value means to them, and the sidecar never holds `""` or `null` for a keyword.
- Sequences (SQ) and binary VRs (OB OD OF OL OV OW UN, and ambiguous VRs that may be binary)
  are skipped, also when asked for as extras; so is a binary number (US, FL, ...) whose length
  is not a whole number of values. `US or SS` (implicit VR) is read as US.

Character sets: decoding is pydicom's. A Specific Character Set pydicom does not know, or bytes
invalid in the declared one, do not fail: pydicom falls back to its default encoding or
replaces the bad bytes, and warns (the `tags` command hides those warnings unless `-v`).

Modules: `mercli.tags.read` reads files and builds sidecars (`read_tags`, `extract_tags`, the
pydicom path); `mercli.tags.spec` says which tags and how they are keyed (`SIDECAR_KEYWORDS`,
`parse_tag`); `mercli.tags.values` converts values; `mercli.tags.scan` is the fast element
scanner. Callers import the public names from `mercli.tags`.
"""

from mercli.tags.read import extract_tags, read_tags
from mercli.tags.spec import SIDECAR_KEYWORDS, InvalidTag, UnreadableDicom, parse_tag

__all__ = [
    "SIDECAR_KEYWORDS",
    "InvalidTag",
    "UnreadableDicom",
    "extract_tags",
    "parse_tag",
    "read_tags",
]
