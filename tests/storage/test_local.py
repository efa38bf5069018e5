"""LocalFolderStore: round trip, no-overwrite, atomic writes; open_store for paths."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest

from jipfed.storage.base import (
    ObjectExistsError,
    ObjectNotFoundError,
    PresignNotSupportedError,
    StoreError,
)
from jipfed.storage.factory import open_store
from jipfed.storage.local import LocalFolderStore

KEY = "experiments/e1/rounds/0/global.safetensors"


class ExplodingStream(io.RawIOBase):
    """Yields ``good`` bytes, calls ``during`` once half of them were read, then raises OSError."""

    def __init__(self, good: bytes, during: Callable[[], None] | None = None) -> None:
        self._data = io.BytesIO(good)
        self._during = during
        self._half = len(good) // 2

    def read(self, size: int = -1) -> bytes:
        if self._data.tell() >= self._half and self._during is not None:
            during, self._during = self._during, None
            during()
        chunk = self._data.read(min(size, 1024) if size > 0 else 1024)
        if not chunk:
            raise OSError("connection to the trainer lost")
        return chunk


def visible_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "store")


def test_round_trip(store: LocalFolderStore) -> None:
    store.put_bytes(KEY, b"weights")
    store.put_json("experiments/e1/rounds/0/global.json", {"round": 0, "sha256": "ab"})
    store.put_bytes("experiments/e1/rounds/10/aggregate.json", b"{}")
    assert store.get_bytes(KEY) == b"weights"
    assert store.get_json("experiments/e1/rounds/0/global.json") == {"round": 0, "sha256": "ab"}
    assert store.exists(KEY) and not store.exists("experiments/e1/rounds/0/other")
    assert not store.exists("experiments/e1/rounds/0")  # a folder is not an object
    assert store.list("experiments/e1/rounds/0/") == [
        "experiments/e1/rounds/0/global.json",
        "experiments/e1/rounds/0/global.safetensors",
    ]
    assert store.list("experiments/e1/rounds/1") == ["experiments/e1/rounds/10/aggregate.json"]
    assert len(store.list()) == 3 and store.list("nothing/") == []
    with pytest.raises(ObjectNotFoundError, match="'experiments/e1/missing' does not exist"):
        store.get_bytes("experiments/e1/missing")


def test_no_overwrite_names_the_key_and_keeps_the_original(store: LocalFolderStore) -> None:
    store.put_bytes(KEY, b"first")
    with pytest.raises(ObjectExistsError, match=f"'{KEY}' already exists"):
        store.put_bytes(KEY, b"second")
    assert store.get_bytes(KEY) == b"first"
    store.put_bytes(KEY, b"third", overwrite=True)
    assert store.get_bytes(KEY) == b"third"


def test_create_exclusive_when_another_writer_wins_the_race(store: LocalFolderStore) -> None:
    """The existence check passes, then another writer publishes first: ours must not replace it."""

    def other_writer() -> None:
        LocalFolderStore(store.root).put_bytes(KEY, b"winner")

    payload = b"x" * 10_000
    with pytest.raises(ObjectExistsError, match=KEY):
        store.put_stream(KEY, ExplodingStream(payload, other_writer), len(payload))
    assert store.get_bytes(KEY) == b"winner"
    assert visible_files(store.root) == [KEY]  # our temporary file is gone


def test_crash_mid_write_leaves_no_object_and_no_junk(store: LocalFolderStore) -> None:
    seen_mid_write: list[bool] = []

    def reader() -> None:
        seen_mid_write.append(store.exists(KEY))
        with pytest.raises(ObjectNotFoundError):
            store.get_bytes(KEY)
        seen_mid_write.append(bool(store.list()))

    payload = b"w" * 50_000
    with pytest.raises(OSError, match="connection to the trainer lost"):
        store.put_stream(KEY, ExplodingStream(payload, reader), len(payload) + 1)
    assert seen_mid_write == [False, False]  # a reader mid-write saw nothing
    assert not store.exists(KEY)
    assert store.list() == []
    assert visible_files(store.root) == []  # not even a hidden temporary file


def test_crash_mid_overwrite_keeps_the_old_object_whole(store: LocalFolderStore) -> None:
    store.put_bytes(KEY, b"old model")
    seen: list[bytes] = []
    payload = b"n" * 50_000
    with pytest.raises(OSError):
        store.put_stream(
            KEY,
            ExplodingStream(payload, lambda: seen.append(store.get_bytes(KEY))),
            len(payload) + 1,
            overwrite=True,
        )
    assert seen == [b"old model"]
    assert store.get_bytes(KEY) == b"old model"
    assert visible_files(store.root) == [KEY]


def test_short_stream_is_an_error_not_a_truncated_object(store: LocalFolderStore) -> None:
    with pytest.raises(StoreError, match="ended 5 bytes short"):
        store.put_stream(KEY, io.BytesIO(b"12345"), 10)
    assert not store.exists(KEY)


def test_leftover_temp_files_are_not_listed(store: LocalFolderStore) -> None:
    """A process killed mid-write leaves ``.<name>.<token>.tmp``; it is never a key."""
    store.put_bytes(KEY, b"ok")
    (store.root / "experiments/e1/rounds/0/.global.json.0123.tmp").write_bytes(b"half")
    assert store.list() == [KEY]


def test_keys_cannot_escape_the_root(store: LocalFolderStore, tmp_path: Path) -> None:
    for key in ("../outside", "a/../../outside", "/etc/passwd"):
        with pytest.raises(ValueError, match="invalid object key"):
            store.put_bytes(key, b"x")
    assert not (tmp_path / "outside").exists()


def test_delete_only_removes_the_key(store: LocalFolderStore) -> None:
    store.put_bytes("runs/r1/a.bin", b"a")
    store.put_bytes("runs/r1/b.bin", b"b")
    store.delete("runs/r1/a.bin")
    store.delete("runs/r1/a.bin")  # absent: no error
    assert store.list() == ["runs/r1/b.bin"]


def test_presign_is_refused_clearly(store: LocalFolderStore) -> None:
    with pytest.raises(PresignNotSupportedError, match=f"LocalFolderStore cannot issue.*{KEY}.*S3"):
        store.presign_get(KEY)
    with pytest.raises(PresignNotSupportedError):
        store.presign_put(KEY)


def test_open_store_local_forms(tmp_path: Path) -> None:
    for spec in (str(tmp_path), tmp_path, f"file://{tmp_path}"):
        store = open_store(spec)
        assert isinstance(store, LocalFolderStore) and store.root == tmp_path.resolve()
    store = open_store(kind="local", root=str(tmp_path))
    assert isinstance(store, LocalFolderStore) and store.root == tmp_path.resolve()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("http://host/x",), {}, "unsupported store URL"),
        ((), {"kind": "local"}, "needs root"),
        ((), {"kind": "ftp", "root": "/x"}, "unknown store kind"),
        (("/x",), {"kind": "local"}, "not both"),
        ((), {"kind": "local", "root": "/x", "access_key": "a"}, "no credentials"),
    ],
)
def test_open_store_refuses_bad_specs(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(*args, **kwargs)
