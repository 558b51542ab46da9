"""Secrets of targets (SPEC §5.1): references in the rules, values only at send time.

A target never holds a password, token or key itself: rules.toml (and so every job.json,
which carries the target's whole definition) names where the secret is: a file
(`password_file`, `token_file`, `key_file`, `credentials_file`, `tls_key`) or an environment
variable as `"${NAME}"` (`password`, `token`). A literal secret in rules.toml is refused by
`rules check`, because it would be copied into every job.json. The value is read by
`read_secret` when dispatch sends, is never logged, and no error message quotes it: errors
name the file or variable only.

`exposure_warnings` is what `rules check` says of a secret file that others can read, or
that cannot be read now (dispatch may run elsewhere, with the file; so a warning, not an
error).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from mercli.errors import MercliError

ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_SECRET_BYTES = 64 * 1024  # a secret file larger than this is not a secret file
SECRET_FILE_KEYS = (
    *("password_file", "token_file", "key_file", "credentials_file", "tls_key"),
    "pseudonym_secret_file",
)
SECRET_ENV_KEYS = ("password", "token")  # "${NAME}" only


class SecretError(MercliError):
    """A secret could not be read; the message names where it was looked for, never a value."""


def env_reference(value: str) -> str | None:
    """The variable name of a `"${NAME}"` reference; None for anything else."""
    found = ENV_REFERENCE.fullmatch(value.strip())
    return found.group(1) if found else None


def read_secret(reference: str, what: str) -> str:
    """The secret `reference` names: `${NAME}` (the environment) or a file's contents (its
    final line break removed). `what` says whose secret it is in errors ("target "x" token")."""
    name = env_reference(reference)
    if name is not None:
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"{what}: environment variable {name} is not set")
        return value
    return read_secret_file(Path(reference), what).rstrip("\r\n")


def read_secret_file(path: Path, what: str) -> str:
    """A whole secret file as text (bounded); SecretError naming the file if it cannot be."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"{what}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{what}: {path} is not UTF-8 text") from None


def secret_files(values: dict[str, object]) -> Iterator[tuple[str, Path]]:
    """(key, path) of every secret file a target's values name."""
    for key in SECRET_FILE_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value and env_reference(value) is None:
            yield key, Path(value)


def exposure_warnings(values: dict[str, object]) -> list[str]:
    """What is wrong with a target's secret files as they are now: missing, unreadable, or
    readable by other users (group-readable is the spool group's business, and allowed)."""
    found = []
    for key, path in secret_files(values):
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            found.append(f"{key} {path}: {exc.strerror or exc} (dispatch will fail until it is)")
            continue
        if not stat.S_ISREG(mode):
            found.append(f"{key} {path} is not a regular file")
        elif mode & (stat.S_IROTH | stat.S_IWOTH):
            found.append(f"{key} {path} is open to other users (chmod o-rwx {path})")
        elif not os.access(path, os.R_OK):
            found.append(f"{key} {path} is not readable by this user")
    return found
