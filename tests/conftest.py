"""Shared fixtures: real spools on real files under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mercli.spool import Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool.open(tmp_path / "spool")
