"""What `deidentify` takes and gives: the profile, the report of changes, the refusal."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mercli.errors import MercliError
from mercli.secrets import read_secret_file

OPTIONS = (  # PS3.15 E.3 options mercli implements, lower-case with dashes
    "retain-longitudinal-full-dates",
    "retain-longitudinal-modified-dates",
    "retain-patient-characteristics",
    "retain-device-identity",
    "retain-institution-identity",
    "retain-uids",
    "clean-descriptors",
)
MIN_SECRET_BYTES = 16


class DeidentificationRefused(MercliError):
    """This instance cannot be de-identified as asked; `reason` says why (never a value)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProfileError(MercliError):
    """A de-identification profile that cannot be used (unknown option, weak secret)."""


@dataclass(frozen=True)
class Profile:
    """The basic profile plus `options`; `secret` keys pseudonyms, UIDs and date shifts;
    `keep_private`: private creator names whose blocks are kept, as they are."""

    options: tuple[str, ...] = ()
    secret: bytes = field(default=b"", repr=False)
    allow_burned_in: bool = False
    keep_private: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [o for o in self.options if o not in OPTIONS]
        if unknown:
            raise ProfileError(
                f"unknown de-identification option {', '.join(unknown)} "
                f"(known: {', '.join(OPTIONS)})"
            )
        if set(OPTIONS[:2]) <= set(self.options):
            raise ProfileError(f"{OPTIONS[0]} and {OPTIONS[1]} exclude each other")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ProfileError(f"the pseudonym secret must have {MIN_SECRET_BYTES} bytes or more")
        object.__setattr__(self, "options", tuple(sorted(set(self.options))))


@dataclass(frozen=True)
class Change:
    """One attribute changed: `path` like "(0008,1140)[0](0008,1155)"; `action` the table's
    code applied (X Z D U C) or "set"; `old`/`new` masked ("***"), UIDs shown."""

    path: str
    keyword: str
    action: str
    old: str
    new: str


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)

    def add(self, change: Change) -> None:
        self.changes.append(change)


def load_secret(path: Path) -> bytes:
    """The secret of `pseudonym_secret_file` (final line break removed); ProfileError or
    SecretError naming the file, never the value."""
    text = read_secret_file(path, "pseudonym_secret_file").rstrip("\r\n")
    secret = text.encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise ProfileError(f"pseudonym_secret_file {path}: shorter than {MIN_SECRET_BYTES} bytes")
    return secret
