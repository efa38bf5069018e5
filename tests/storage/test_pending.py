"""ModelStore.pending: a model written where it will be stored, visible only once committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from jipfed.storage.base import ModelStore, ObjectExistsError
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore

KEY = "experiments/e1/rounds/1/global.safetensors"


def test_a_pending_object_appears_only_when_committed(any_store: ModelStore, tmp_path: Path) -> None:
    with any_store.pending(KEY, tmp_path) as pending:
        pending.path.write_bytes(b"model bytes")
        assert not any_store.exists(KEY) and any_store.list("experiments/") == []
        pending.commit()
    assert any_store.get_bytes(KEY) == b"model bytes"
    with any_store.pending(KEY, tmp_path) as again:  # write-once, as put_stream
        again.path.write_bytes(b"other bytes")
        with pytest.raises(ObjectExistsError, match="global.safetensors"):
            again.commit()
    assert any_store.get_bytes(KEY) == b"model bytes"


def test_an_uncommitted_pending_object_leaves_nothing(any_store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), any_store.pending(KEY, tmp_path) as pending:
        pending.path.write_bytes(b"half a model")
        raise RuntimeError("the step failed")
    assert not pending.path.exists() and not any_store.exists(KEY)


def test_the_local_folder_writes_the_pending_file_in_place(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "store")
    with store.pending(KEY, tmp_path / "work") as pending:
        assert pending.path.parent == Path(store.uri(KEY)).parent  # same folder: published by a link
        assert pending.path.name.startswith(".")  # never a key
        pending.path.write_bytes(b"model bytes")
        pending.commit()
    assert Path(store.uri(KEY)).read_bytes() == b"model bytes"
    assert [p.name for p in Path(store.uri(KEY)).parent.iterdir()] == ["global.safetensors"]


def test_a_model_check_holds_while_the_object_is_not_rewritten(any_store: ModelStore) -> None:
    exp_store = ExperimentStore(any_store, "e1")
    any_store.put_bytes(KEY, b"model bytes")
    exp_store.record_model_check(KEY, "a" * 64)
    identity = exp_store.checked_model_identity(KEY, "a" * 64)
    assert identity == any_store.identity(KEY)
    assert exp_store.checked_model_identity(KEY, "b" * 64) is None  # recorded for other bytes
    any_store.put_bytes(KEY, b"MODEL BYTES", overwrite=True)
    assert any_store.identity(KEY) != identity
