"""mercure targets as `[targets.NAME]` tables (SPEC §5, §5.1), one function per type.

Each function returns the mercli table, or None when the target cannot be carried over (the
reason is reported). Credentials found inline in mercure.json go into files under
`secrets/` (written 0600 by the caller) and the table names the file, relative to rules.toml.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mercli.migrate.report import Report

__all__ = ["NOT_CARRIED", "convert_target"]

NOT_CARRIED = {
    "rsync": "mercli has no rsync target (use an sftp target, or a folder target and rsync "
    "from cron)",
    "xnat": "mercli has no XNAT target (XNAT accepts DICOM C-STORE: use a dicom target to its "
    "DICOM receiver)",
    "dummy": "a dummy target sends nowhere: rules that only name it become discard-like "
    "fallback rules (the series ends in discard/, kept for retention)",
}


class Secrets:
    """Secret files to write: path relative to the output folder -> content."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put(self, name: str, content: str) -> str:
        path = f"secrets/{name}"
        self.files[path] = content.encode("utf-8")
        return path


def _aet_table(target: Mapping[str, Any]) -> dict[str, Any]:
    port = str(target.get("port", "")).strip()
    table: dict[str, Any] = {
        "type": "dicom",
        "host": str(target.get("ip", "")),
        "port": int(port) if port.isdigit() else port,
        "called_aet": str(target.get("aet_target", "")),
    }
    if target.get("aet_source"):
        table["calling_aet"] = str(target["aet_source"])
    return table


def _dicom(
    name: str, target: Mapping[str, Any], report: Report, secrets: Secrets
) -> dict[str, Any]:
    where = f'target "{name}"'
    for flag, what in (("pass_sender_aet", "sender's"), ("pass_receiver_aet", "receiver's")):
        if target.get(flag):
            report.dropped(
                where, f"{flag}: mercli always calls with calling_aet, not the {what} AET"
            )
    return _aet_table(target)


def _pem_or_path(value: str, name: str, suffix: str, secrets: Secrets) -> str:
    """A TLS file setting: mercure keeps paths; PEM text found inline becomes a file."""
    if value.lstrip().startswith("-----BEGIN"):
        return secrets.put(f"{name}.{suffix}", value)
    return value


def _dicomtls(
    name: str, target: Mapping[str, Any], report: Report, secrets: Secrets
) -> dict[str, Any] | None:
    table = _dicom(name, target, report, secrets)
    table["tls"] = True
    for ours, theirs, suffix in (
        ("tls_ca", "ca_cert", "ca.pem"),
        ("tls_cert", "tls_cert", "cert.pem"),
        ("tls_key", "tls_key", "key.pem"),
    ):
        value = str(target.get(theirs) or "")
        if value:
            table[ours] = _pem_or_path(value, name, suffix, secrets)
    if "tls_key" in table and "tls_cert" not in table:
        del table["tls_key"]
        report.dropped(f'target "{name}"', "tls_key without tls_cert: the key is not used")
    report.todo(f'target "{name}"', "copy the TLS files it names to this host (same paths)")
    return table


def _dicomweb(
    name: str, target: Mapping[str, Any], report: Report, secrets: Secrets
) -> dict[str, Any] | None:
    where = f'target "{name}"'
    url = str(target.get("url") or "").rstrip("/")
    if not url.startswith(("http://", "https://")):
        report.dropped(
            where,
            f"url {url!r} is not http(s) (mercure's file:// DICOMweb store); "
            "use a folder target instead",
        )
        return None
    prefix = str(target.get("stow_url_prefix") or "").strip("/")
    table: dict[str, Any] = {"type": "dicomweb", "url": f"{url}/{prefix}" if prefix else url}
    if prefix:
        report.changed(where, f'stow_url_prefix "{prefix}" appended to the url')
    token, user = target.get("access_token"), target.get("http_user")
    if token:
        table |= {"auth": "bearer", "token_file": secrets.put(f"{name}.token", str(token))}
    elif user:
        table |= {"auth": "basic", "username": str(user)}
        table["password_file"] = secrets.put(
            f"{name}.password", str(target.get("http_password") or "")
        )
    if token and user:
        report.dropped(where, "both a token and a user: mercli uses the token (bearer)")
    return table


def _sftp(
    name: str, target: Mapping[str, Any], report: Report, secrets: Secrets
) -> dict[str, Any] | None:
    where = f'target "{name}"'
    table: dict[str, Any] = {
        "type": "sftp",
        "host": str(target.get("host") or ""),
        "user": str(target.get("user") or ""),
        "path": str(target.get("folder") or "."),
        "known_hosts": "secrets/known_hosts",
    }
    if target.get("password"):
        table["password_file"] = secrets.put(f"{name}.password", str(target["password"]))
    else:
        table["key_file"] = f"secrets/{name}.id_ed25519"
        report.todo(where, f"no password in mercure.json: put the SSH key in {table['key_file']}")
    report.todo(
        where,
        "mercli refuses unknown host keys: ssh-keyscan -H "
        f"{table['host']} >> secrets/known_hosts (and check the fingerprint)",
    )
    _file_filter(target, report, where)
    return table


def _s3(
    name: str, target: Mapping[str, Any], report: Report, secrets: Secrets
) -> dict[str, Any] | None:
    where = f'target "{name}"'
    table: dict[str, Any] = {"type": "s3", "bucket": str(target.get("bucket") or "")}
    prefix = str(target.get("prefix") or "").lstrip("/")
    if prefix:
        table["prefix"] = prefix if prefix.endswith("/") else prefix + "/"
    if target.get("region"):
        table["region"] = str(target["region"])
    key_id, secret = target.get("access_key_id"), target.get("secret_access_key")
    if key_id and secret:
        text = f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
        table["credentials_file"] = secrets.put(f"{name}.ini", text)
    report.changed(
        where,
        "object keys are prefix + <StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm "
        "(mercure: prefix/<task id>/<file>)",
    )
    return table


def _folder(
    name: str, target: Mapping[str, Any], report: Report, secrets: Secrets
) -> dict[str, Any] | None:
    where = f'target "{name}"'
    _file_filter(target, report, where)
    report.changed(
        where,
        "each job lands in DEST/<job id>/, written atomically (mercure: "
        "DEST/<task id>/ with a .lock file while copying)",
    )
    return {"type": "folder", "path": str(target.get("folder") or "")}


def _file_filter(target: Mapping[str, Any], report: Report, where: str) -> None:
    if target.get("file_filter"):
        report.dropped(where, f"file_filter {target['file_filter']!r}: mercli sends every file")


CONVERTERS: dict[
    str, Callable[[str, Mapping[str, Any], Report, Secrets], dict[str, Any] | None]
] = {
    "dicom": _dicom,
    "dicomtls": _dicomtls,
    "dicomweb": _dicomweb,
    "sftp": _sftp,
    "s3": _s3,
    "folder": _folder,
}


def convert_target(
    name: str, target: Any, report: Report, secrets: Secrets
) -> dict[str, Any] | None:
    """One mercure target as a mercli table, or None (reported)."""
    where = f'target "{name}"'
    if not isinstance(target, Mapping):
        report.dropped(where, "not a JSON object")
        return None
    kind = str(target.get("target_type") or "dicom")
    if kind in NOT_CARRIED:
        (report.changed if kind == "dummy" else report.dropped)(where, NOT_CARRIED[kind])
        return None
    if kind not in CONVERTERS:
        report.dropped(where, f'unknown target_type "{kind}"')
        return None
    if target.get("direction") in ("pull", "both"):
        report.dropped(where, "query/retrieve (direction pull/both): mercli only sends")
    return CONVERTERS[kind](name, target, report, secrets)
