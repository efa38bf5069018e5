"""``LocalFolderStore``: the model store as a folder (one file per object).

Atomicity: content goes to a hidden temporary file in the target's folder (``.<name>.<token>.tmp``),
is fsynced, then published in one step — ``os.link`` (fails if the key exists: create-exclusive,
no race between check and write) or ``os.replace`` when ``overwrite=True`` — and the folder is
fsynced. Readers therefore see no object or the complete one. A failed write removes its temporary
file; a killed process may leave one behind, but names starting with ``.`` are never keys, so
:meth:`LocalFolderStore.list` does not show it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

from jipfed.storage.base import (
    DEFAULT_URL_EXPIRY,
    ModelStore,
    ObjectExistsError,
    ObjectIdentity,
    ObjectNotFoundError,
    PendingObject,
    PresignNotSupportedError,
    StoreError,
    validate_key,
    validate_prefix,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFolderStore(ModelStore):
    """A model store in a local (or mounted) folder.

    Args:
        root: The folder; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalFolderStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def _temporary(self, key: str) -> tuple[Path, Path]:
        """(object path, a new hidden temporary path beside it); the folder is created."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"

    def _publish(self, key: str, tmp: Path, overwrite: bool) -> None:
        """Make the written file ``tmp`` object ``key``: fsync, link (or replace), fsync the folder."""
        path = self._path(key)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ObjectExistsError(key) from None
            os.unlink(tmp)
        _fsync_dir(path.parent)

    def pending(self, key: str, workdir: Path) -> PendingObject:
        """A hidden temporary file in the object's own folder: :meth:`PendingObject.commit` links it in place."""
        _, tmp = self._temporary(key)
        return PendingObject(key, tmp, lambda file, overwrite: self._publish(key, file, overwrite))

    def put_stream(self, key: str, stream: BinaryIO, length: int, *, overwrite: bool = False) -> None:
        if length < 0:
            raise ValueError(f"length for {key!r} must be >= 0, got {length}")
        path, tmp = self._temporary(key)
        if not overwrite and path.exists():
            raise ObjectExistsError(key)
        try:
            with open(tmp, "xb") as fh:
                remaining = length
                while remaining:
                    chunk = stream.read(min(CHUNK_SIZE, remaining))
                    if not chunk:
                        raise StoreError(f"stream for {key!r} ended {remaining} bytes short of {length}")
                    fh.write(chunk)
                    remaining -= len(chunk)
            self._publish(key, tmp, overwrite)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.debug("wrote %s (%d bytes)", path, length)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None

    def identity(self, key: str) -> ObjectIdentity:
        """Size, mtime (ns) and inode: a write in place changes the mtime, a replacement the inode."""
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFoundError(key)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        # Walk only below the deepest folder the prefix names.
        start_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*start_rel.split("/")) if start_rel else self.root
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def _no_presign(self, key: str) -> PresignNotSupportedError:
        validate_key(key)
        return PresignNotSupportedError(
            f"LocalFolderStore cannot issue a presigned URL for {key!r}: a folder has no access "
            "control or expiry to put in a URL. Use an S3/MinIO store (in tests: "
            "jipfed.testing.s3.S3TestServer)."
        )

    def presign_get(self, key: str, expires: timedelta | float = DEFAULT_URL_EXPIRY) -> str:
        raise self._no_presign(key)

    def presign_put(self, key: str, expires: timedelta | float = DEFAULT_URL_EXPIRY) -> str:
        raise self._no_presign(key)
