"""Shared fixtures: real spools on real files under tmp_path, the built getdcmtags, and
pynetdicom sending data sets exactly as they are."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import _config

from mercli.spool import Spool
from tests.kit import GETDCMTAGS


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool.open(tmp_path / "spool")


@pytest.fixture(scope="session")
def getdcmtags() -> Path:
    """The C++ helper; a missing build is a failure, never a skip."""
    if not GETDCMTAGS.is_file():
        pytest.fail(f"{GETDCMTAGS} is missing: run `make build` first")
    return GETDCMTAGS


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """pynetdicom sends each file's data set bytes as they are: no parsing, no repair."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = False
