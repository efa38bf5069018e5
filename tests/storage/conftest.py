"""Fixtures for the storage tests: one moto S3 server per session, a fresh key prefix per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from jipfed.storage.base import ModelStore
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.s3 import S3Store
from jipfed.testing.s3 import S3TestServer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    with S3TestServer() as server:
        yield server


@pytest.fixture
def s3_store(s3_server: S3TestServer) -> S3Store:
    """An S3Store below a prefix of its own, so tests sharing the server do not see each other."""
    return s3_server.make_store(prefix=f"t-{secrets.token_hex(4)}")


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ModelStore:
    """Each backend in turn."""
    if request.param == "local":
        return LocalFolderStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")
