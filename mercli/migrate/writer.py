"""Read mercure.json, convert until mercli accepts the result, write it atomically.

Every rules.toml is checked before it is published: parsed back with tomllib and loaded with
`load_rules`, exactly as `mercli rules check` would. When the loader refuses a line, the
item that produced it is left out (a rule: commented out) with the loader's message as the
reason, and the conversion runs again, so one odd mercure item costs that item only.

Files: `DIR/rules.toml` (0640) and `DIR/secrets/*` (0600, in a 0700 folder), each written to
a temporary name, fsync'ed and renamed into place. Existing files are replaced only with
`force`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mercli.errors import ConfigError, MercliError, UsageError
from mercli.fsutil import fsync_dir
from mercli.migrate.convert import Conversion, NotMercure, check_config, convert
from mercli.migrate.report import Report
from mercli.migrate.toml_out import render

__all__ = ["ImportResult", "import_mercure", "read_config"]

_ATTEMPTS = 200
_LINE = re.compile(r":(\d+): ")


@dataclass(frozen=True)
class ImportResult:
    rules: Path
    secrets: tuple[Path, ...]
    report: Report
    commands: tuple[str, ...]


def read_config(path: Path) -> dict[str, Any]:
    """The parsed mercure.json; NotMercure when it is not JSON or not mercure's."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise NotMercure(f"{path}: not a mercure configuration (not UTF-8: {exc.reason})") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise NotMercure(f"{path}: not a mercure configuration (invalid JSON: {exc})") from exc
    return dict(check_config(document, str(path)))


def import_mercure(source: Path, out: Path, *, force: bool = False) -> ImportResult:
    """Convert `source` into `out`/rules.toml (+ secrets/); see the module docstring."""
    config = read_config(source)
    target = out / "rules.toml"
    conversion, text = _converge(config, out)
    paths = [target, *(out / name for name in conversion.secrets)]
    existing = [path for path in paths if path.exists()]
    if existing and not force:
        shown = ", ".join(str(path) for path in existing)
        raise UsageError(f"{shown} exists; give --force to replace it")
    if conversion.secrets:
        (out / "secrets").mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out / "secrets", 0o700)
    for name, content in conversion.secrets.items():
        _publish(out / name, content, 0o600)
    _publish(target, text.encode("utf-8"), 0o640)
    return ImportResult(
        target,
        tuple(out / name for name in conversion.secrets),
        conversion.report,
        tuple(conversion.commands),
    )


def _converge(config: dict[str, Any], out: Path) -> tuple[Conversion, str]:
    """Convert, verify, leave out what mercli refuses, again, until it loads."""
    excluded: dict[tuple[str, str], str] = {}
    out.mkdir(parents=True, exist_ok=True)
    for _ in range(_ATTEMPTS):
        conversion = convert(config, excluded)
        text, spans = render(conversion.blocks)
        problem = _verify(text, out)
        if problem is None:
            return conversion, text
        line, message = problem
        origin = next((b.origin for first, last, b in spans if first <= line <= last), None)
        if origin is None or not origin[0] or origin in excluded or origin[1].startswith("\0"):
            raise MercliError(f"could not write a valid rules.toml: {message}")
        excluded[origin] = message
    raise MercliError("could not write a valid rules.toml: too many refused items")


def _verify(text: str, folder: Path) -> tuple[int, str] | None:
    """None if `text` parses and loads as rules.toml in `folder`; else (line, message)."""
    from mercli.rules.config import load_rules

    tomllib.loads(text)  # a writer bug, not an input problem: let it raise
    fd, name = tempfile.mkstemp(prefix=".rules-check-", suffix=".toml", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        load_rules(name)
    except ConfigError as exc:
        message = str(exc).replace(name, "rules.toml")
        found = _LINE.search(message)
        return (int(found.group(1)) if found else 0), message
    finally:
        os.unlink(name)
    return None


def _publish(path: Path, data: bytes, mode: int) -> None:
    """Write a temporary file beside `path`, fsync, rename over it, fsync the folder."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
