"""Safe file names for untrusted DICOM values, and unique ids for spool items.

A UID or AE title comes from the network; used raw as a path component, `../..` or a NUL
would let a sender write anywhere. Values that are already well-formed UIDs (digits and dots,
at most 64 characters, no empty component) are used as they are, because admins grep for them;
anything else is mapped to `x` + a hash of the raw bytes. A mapped name can never equal a real
UID (it starts with a letter), and the raw value is kept in the sidecar.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from datetime import UTC, datetime

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_MAX_UID = 64
# C0 controls, DEL and C1 controls (ESC starts ANSI sequences; CSI 0x9B is one byte on its
# own), and the Unicode line separators and bidirectional controls that reorder or break lines
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def is_safe_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID, which is also a harmless file name."""
    return len(value) <= _MAX_UID and _UID.fullmatch(value) is not None


def safe_name(value: str | bytes | None) -> str:
    """The file-name form of an untrusted UID-like value (see module docstring)."""
    if isinstance(value, str) and is_safe_uid(value):
        return value
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value or b""
    return "x" + hashlib.sha256(raw).hexdigest()[:40]


def printable(value: object, limit: int = 64) -> str:
    """An untrusted value as it may appear in a log line or a terminal table.

    Control characters (newlines that would forge log lines, ANSI escapes that would act on a
    terminal) become `\\xNN`; text past `limit` characters is cut with `...` (0: no limit).
    """
    text = _CONTROL.sub(_escape, str(value))
    return text if not limit or len(text) <= limit else text[:limit] + "..."


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def new_id(now: datetime | None = None) -> str:
    """A unique, time-sortable item id such as `20261128T002729.123456-3f9a1c2b7d4e`."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%f")
    return f"{stamp}-{secrets.token_hex(6)}"


def owner_id(role: str) -> str:
    """Identifies one worker process: role, host, pid and a nonce (pids get reused)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", os.uname().nodename)[:40] or "host"
    role = re.sub(r"[^a-z0-9-]", "-", role.lower())[:20] or "worker"
    return f"{role}.{host}.{os.getpid()}.{secrets.token_hex(4)}"
