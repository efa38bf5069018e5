"""Fixtures for the central endpoint tests: a real uvicorn server per test, small real experiments."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from training.synth import site_trainers

from jipfed.central.app import create_app
from jipfed.central.serve import serve_in_thread
from jipfed.storage.base import ModelStore
from jipfed.storage.local import LocalFolderStore
from jipfed.testing.s3 import S3TestServer
from jipfed.training.local import LocalTrainer

from .helpers import SITES, TRAIN, Central


@pytest.fixture(scope="session")
def secret() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalTrainer]:
    return site_trainers(tmp_path_factory.mktemp("sites"), SITES, TRAIN)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3TestServer]:
    with S3TestServer() as server:
        yield server


@pytest.fixture
def local_store(tmp_path: Path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ModelStore:
    """A LocalFolderStore, then an S3Store on moto (a fresh prefix per test)."""
    if request.param == "local":
        return LocalFolderStore(tmp_path / "store")
    return request.getfixturevalue("s3_server").make_store(prefix=f"t{secrets.token_hex(4)}")


@pytest.fixture
def serve(secret: str) -> Iterator[Callable[..., Central]]:
    """``serve(store, **create_app_kwargs)`` starts the endpoint on 127.0.0.1; stopped after the test."""
    stops = []

    def serve_store(store: ModelStore, **kwargs) -> Central:
        url, stop = serve_in_thread(create_app(lambda: store, kwargs.pop("token_secret", secret), **kwargs))
        stops.append(stop)
        return Central(url, store, secret)

    yield serve_store
    for stop in stops:
        stop()
