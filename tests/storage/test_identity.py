"""ModelStore.identity: what tells aggregation that a stored update is still the one checked at arrival."""

from __future__ import annotations

from pathlib import Path

import pytest

from jipfed.storage.base import ModelStore, ObjectNotFoundError
from jipfed.storage.local import LocalFolderStore

KEY = "experiments/e1/rounds/0/updates/site-a.safetensors"


def test_identity_is_stable_while_the_object_is_not_rewritten(any_store: ModelStore) -> None:
    any_store.put_bytes(KEY, b"checked bytes")
    first = any_store.identity(KEY)
    assert first["size"] == len(b"checked bytes")
    assert any_store.get_bytes(KEY) == b"checked bytes"
    assert any_store.identity(KEY) == first  # reading does not change it


def test_rewriting_with_other_bytes_of_the_same_size_changes_the_identity(any_store: ModelStore) -> None:
    any_store.put_bytes(KEY, b"checked bytes")
    before = any_store.identity(KEY)
    any_store.put_bytes(KEY, b"CHANGED bytes", overwrite=True)
    after = any_store.identity(KEY)
    assert after["size"] == before["size"] and after != before


def test_identity_of_a_missing_object_names_the_key(any_store: ModelStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="site-a.safetensors"):
        any_store.identity(KEY)


def test_a_local_write_in_place_changes_the_identity(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "store")
    store.put_bytes(KEY, b"checked bytes")
    before = store.identity(KEY)
    with open(store.uri(KEY), "ab") as fh:  # same file (inode), new bytes appended
        fh.write(b"!")
    after = store.identity(KEY)
    assert after["inode"] == before["inode"] and after["size"] == before["size"] + 1
