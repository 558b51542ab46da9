"""De-identification (SPEC §5.1, DICOM PS3.15 Annex E): see `mercli.deid.core`.

This package's top level stays light: `rules check` (and so every command that loads rules,
dispatch included) imports the option names from `mercli.deid.model` without pulling in
pydicom; the engine (`core`, `engine`) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """`deidentify`, `method_codes`, ... from `mercli.deid.core`, imported when first asked."""
    core = importlib.import_module("mercli.deid.core")  # not `from . import`: recursion
    try:
        return getattr(core, name)
    except AttributeError:
        raise AttributeError(f"module 'mercli.deid' has no attribute {name!r}") from None
