"""TLS for DICOM (and https) connections: one place that builds the SSL contexts.

DICOM over TLS (PS3.15 Annex B, BCP 195) is plain TLS around the usual PDUs. Both sides
here require TLS 1.2 or later and Python's default cipher list (which follows BCP 195's
recommendations). The requesting side verifies the server's chain against `ca` (or the
system's store) and its host name: on by default, as an admin expects of anything
encrypted. The accepting side asks for a client certificate only when told to, and then
verifies it against `ca`.

Errors loading a certificate or key become `TlsConfigError` naming the file (never its
contents), so `receive` can exit with a usage error and dispatch can fail the job clearly.
"""

from __future__ import annotations

import ssl

from mercli.errors import MercliError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(MercliError):
    """A certificate, key or CA file that cannot be used; names the file."""


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """For connecting out: the server verified (chain against `ca`, or the system's CAs,
    and host name); `cert`/`key` presented if given (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = MINIMUM_VERSION
    if ca:
        _load(context.load_verify_locations, ca, "CA file", cafile=ca)
    if cert:
        _load_chain(context, cert, key, "client certificate/key")
    return context


def server_context(
    cert: str, key: str | None = None, ca: str | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """For accepting: our certificate and key; client certificates required (and verified
    against `ca`) only with `require_client_cert`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, cert, key, "certificate/key")
    if ca:
        _load(context.load_verify_locations, ca, "CA file", cafile=ca)
    if require_client_cert:
        if not ca:
            raise TlsConfigError("requiring client certificates needs a CA file to verify them")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None, what: str) -> None:
    """Certificate and key; a key protected by a password fails here with a clear error
    (OpenSSL would otherwise ask for the password on the terminal of a service)."""

    def no_password() -> bytes:
        raise TlsConfigError(f"TLS key {key or cert} is encrypted: give an unencrypted key")

    try:
        context.load_cert_chain(certfile=cert, keyfile=key, password=no_password)
    except TlsConfigError:
        raise
    except FileNotFoundError:
        raise TlsConfigError(f"TLS {what} {cert}: no such file") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TlsConfigError(f"TLS {what} {cert}: cannot be loaded ({reason})") from None


def _load(method: object, path: str, what: str, **kwargs: str | None) -> None:
    try:
        method(**kwargs)  # type: ignore[operator]
    except FileNotFoundError:
        raise TlsConfigError(f"TLS {what} {path}: no such file") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise TlsConfigError(f"TLS {what} {path}: cannot be loaded ({reason})") from None


def describe_failure(exc: BaseException) -> str:
    """A handshake failure in words for a log line or error.json (no secrets in there)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"TLS handshake failed: {exc}"
