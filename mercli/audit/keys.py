"""Keyed hashes of patient IDs and accession numbers, so events can be searched by them.

Events never carry patient names or IDs (SPEC §3). An auditor still needs "every study of
patient X": so `routed`, `held` and `discarded` events carry `patient_key` and
`accession_key`, an HMAC-SHA256 of the value under a secret of this spool, cut to 16 bytes.
`mercli log --patient-id X` computes the same key and looks it up. Without the secret a
copy of the log (shipped to a SIEM, attached to a ticket) cannot be searched by guessing
IDs, which a plain hash would allow: patient IDs are short and guessable.

The secret lives in `<spool>/keys/audit.key` (0640, like every spool file: the spool's
group may read the sidecars, which hold the values themselves, anyway), outside `events/`
so copying the event log never copies it. It is created once, race-free: written whole in
`tmp/` and linked into place without replacing, so of two processes creating it at once
one wins and the other reads the winner's. Losing the secret only means old events can no
longer be found by ID (by study UID they still can).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from mercli.fsutil import make_dir, rename_noreplace, unlink_quietly, write_new
from mercli.names import new_id, safe_name

log = logging.getLogger(__name__)

KEYS_DIR = "keys"
KEY_FILE = "audit.key"
KEY_BYTES = 32
DIGEST_BYTES = 16

# event field -> the sidecar / job.json keyword whose value it is the keyed hash of
KEYED_FIELDS = {"accession_key": "AccessionNumber", "patient_key": "PatientID"}


@lru_cache(maxsize=8)
def spool_secret(root: Path) -> bytes:
    """The spool's audit secret, created on first use (OSError if it cannot be)."""
    path = root / KEYS_DIR / KEY_FILE
    try:
        return _parse(path.read_text())
    except FileNotFoundError:
        pass
    make_dir(path.parent, exist_ok=True)
    scratch = root / "tmp" / f"audit-key.{new_id()}"
    write_new(scratch, secrets.token_hex(KEY_BYTES).encode() + b"\n")
    try:
        rename_noreplace(scratch, path)
    except FileExistsError:
        pass  # another process made it first: theirs is the one
    finally:
        unlink_quietly(scratch)
    return _parse(path.read_text())


def _parse(text: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise OSError(f"audit key is damaged (expected {KEY_BYTES} hex bytes)")
    return secret


def normalise(value: object) -> str:
    """The form a value is hashed in: DICOM padding stripped, multiple values joined by `\\`."""
    if isinstance(value, list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return "" if value is None else str(value).strip()


def keyed(secret: bytes, keyword: str, value: object) -> str:
    """The keyed hash of one value of `keyword` (hex); the keyword is mixed in so an accession
    number and a patient ID that read alike do not get the same key."""
    message = f"{keyword}\0{normalise(value)}".encode("utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[: DIGEST_BYTES * 2]


def trail_fields(root: Path, keys: Mapping[str, Any]) -> dict[str, str]:
    """The fields that let `mercli log` find an item by study, accession number or patient ID:
    `study` (the study's spool name, safe_name(StudyInstanceUID), as `held` events and study
    jobs name it) and the keyed hashes of what is present. Never raises: an unreadable key
    costs the keys (with a warning), never the routing the event describes."""
    fields: dict[str, str] = {}
    if keys.get("StudyInstanceUID"):
        fields["study"] = safe_name(str(keys["StudyInstanceUID"]))
    present = {f: k for f, k in KEYED_FIELDS.items() if normalise(keys.get(k))}
    if not present:
        return fields
    try:
        secret = spool_secret(root)
    except OSError as exc:
        log.warning("audit key unusable, events go without patient/accession keys: %s", exc)
        return fields
    for field, keyword in present.items():
        fields[field] = keyed(secret, keyword, keys[keyword])
    return fields
