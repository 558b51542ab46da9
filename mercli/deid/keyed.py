"""Keyed pseudonyms (HMAC-SHA256 of the original with the target's secret).

The same original and secret give the same output in every run and on every target; without
the secret an output cannot be traced back to its original (nor tested against a guess).
Each use has its own label in the hashed message, so a UID and a pseudonym of the same text
are unrelated.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac

MAX_SHIFT_DAYS = 3650  # dates move back 1..3650 days, per patient


def digest(secret: bytes, label: str, value: str) -> bytes:
    message = label.encode("ascii") + b"\0" + value.encode("utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).digest()


def uid(secret: bytes, original: str) -> str:
    """`2.25.<n>`: n a UUID (RFC 9562 version 8, name-based) made of the first 16 bytes of
    the HMAC, as PS3.5 B.2 derives UIDs from UUIDs; at most 44 characters."""
    raw = bytearray(digest(secret, "uid", original.strip().rstrip("\0"))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC variant
    return f"2.25.{int.from_bytes(raw, 'big')}"


def pseudonym(secret: bytes, original: str) -> str:
    """16 upper-case hex digits: valid in every text VR (CS, SH and AE included)."""
    return digest(secret, "pseudonym", original.strip()).hex()[:16].upper()


def shift_days(secret: bytes, patient: str) -> int:
    """How many days this patient's dates move back (the Modified Dates option)."""
    number = int.from_bytes(digest(secret, "date-shift", patient.strip())[:4], "big")
    return 1 + number % MAX_SHIFT_DAYS


def shift_date(value: str, days: int) -> str | None:
    """A DA (YYYYMMDD) or the date part of a DT moved back `days`; None if it is not one."""
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        moved = day - datetime.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved:%Y%m%d}" + text[8:]
