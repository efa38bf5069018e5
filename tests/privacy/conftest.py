"""The central's real endpoint on a loopback port for the wire-level privacy tests."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jipfed.central.app import create_app
from jipfed.central.client import CentralClient
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.storage.local import LocalFolderStore


@pytest.fixture
def central(tmp_path: Path) -> Iterator[tuple[str, LocalFolderStore, Callable[[str], CentralClient]]]:
    """(endpoint URL, its store, site -> client); the token secret is ``central.secret`` on the store."""
    secret = secrets.token_hex(32)
    store = LocalFolderStore(tmp_path / "store")
    url, stop = serve_in_thread(create_app(lambda: store, secret))
    store.secret = secret  # type: ignore[attr-defined]

    def client(site: str) -> CentralClient:
        return CentralClient(url, site_token(secret, site), timeout_s=30, backoff_s=0.01)

    yield url, store, client
    stop()
