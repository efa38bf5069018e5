"""Conditional writes on S3 (moto): of two writers of the same new key, exactly one wins."""

from __future__ import annotations

import io
import secrets

import pytest

from jipfed.storage.base import ObjectExistsError
from jipfed.storage.s3 import S3Store
from jipfed.testing.s3 import S3TestServer


@pytest.fixture(scope="module")
def s3() -> S3TestServer:
    with S3TestServer() as server:
        yield server


def test_moto_refuses_a_conditional_put_over_an_existing_object(s3: S3TestServer) -> None:
    """What moto does with ``If-None-Match: *``: it answers 412 PreconditionFailed (checked here)."""
    store: S3Store = s3.make_store(prefix=f"c{secrets.token_hex(4)}")
    store.put_bytes("a/manifest.json", b"first")
    # Skip our own stat check to reach the server's condition, as a racing writer would.
    with pytest.raises(ObjectExistsError, match="conditional write"):
        store._put_if_absent("a/manifest.json", io.BytesIO(b"second"), 6)
    assert store.get_bytes("a/manifest.json") == b"first"
    store._put_if_absent("a/other.json", io.BytesIO(b"new"), 3)
    assert store.get_bytes("a/other.json") == b"new"
