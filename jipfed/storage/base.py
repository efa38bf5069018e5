"""The ``ModelStore`` contract shared by the local-folder and S3 backends.

Keys are ``/``-separated relative names (``experiments/e1/rounds/0/global.safetensors``). Every
segment starts with a letter, digit, ``_`` or ``-`` and holds only ``[A-Za-z0-9._-]``: no empty
segment, no ``.``/``..``, no leading ``/``. Names starting with ``.`` are thus never keys, which
lets the local backend keep its temporary files invisible.

Writes are atomic: an object is either absent or complete, never half written. By default a write
refuses to replace an existing object (:class:`ObjectExistsError` names the key).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_URL_EXPIRY = timedelta(minutes=15)
MAX_URL_EXPIRY = timedelta(days=7)  # S3 SigV4 limit for presigned URLs
MAX_KEY_BYTES = 1024  # S3 limit

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


class StoreError(Exception):
    """Base class of the model store's errors."""


class ObjectExistsError(StoreError):
    """A write would replace an existing object (and ``overwrite`` was not given)."""

    def __init__(self, key: str, detail: str = "") -> None:
        self.key = key
        message = f"object {key!r} already exists; refusing to overwrite it"
        super().__init__(f"{message}: {detail}" if detail else message)


class ObjectNotFoundError(StoreError, LookupError):
    """The requested object does not exist."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"object {key!r} does not exist")


class PresignNotSupportedError(StoreError, NotImplementedError):
    """This backend cannot issue presigned URLs."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"object key is longer than {MAX_KEY_BYTES} bytes: {key[:80]!r}...")
    bad = [seg for seg in key.split("/") if not _SEGMENT_RE.match(seg)]
    if bad:
        raise ValueError(
            f"invalid object key {key!r}: segment(s) {bad!r} must be non-empty, must not start "
            "with '.', and may hold only letters, digits, '.', '_' and '-'"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid listing prefix ("" or a key, possibly ending in ``/``)."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def check_expiry(expires: timedelta | float) -> timedelta:
    """Validate a presigned URL's lifetime (a timedelta or seconds): 1 s to 7 days."""
    td = expires if isinstance(expires, timedelta) else timedelta(seconds=float(expires))
    if td < timedelta(seconds=1) or td > MAX_URL_EXPIRY:
        raise ValueError(f"URL expiry must be between 1 s and {MAX_URL_EXPIRY} (7 days), got {td}")
    if td.total_seconds() != int(td.total_seconds()):
        raise ValueError(f"URL expiry must be a whole number of seconds, got {td}")
    return td


def canonical_json(obj: Any) -> bytes:
    """Deterministic UTF-8 JSON: sorted keys, no whitespace, NaN/Infinity refused (ValueError)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


#: What identifies one stored version of an object (JSON-able): it changes when the object is rewritten.
ObjectIdentity = dict[str, int | str]


class PendingObject:
    """A local file (:attr:`path`) written first, that becomes object ``key`` on :meth:`commit`.

    Until then nothing is visible at ``key``; leaving the ``with`` block without committing
    removes the file. ``publish(path, overwrite)`` makes the written file the object.
    """

    def __init__(self, key: str, path: Path, publish: Callable[[Path, bool], None]) -> None:
        self.key, self.path = key, path
        self._publish = publish
        self.committed = False

    def commit(self, *, overwrite: bool = False) -> None:
        """Publish the file at ``key`` atomically. Raises ObjectExistsError as :meth:`ModelStore.put_stream`."""
        self._publish(self.path, overwrite)
        self.committed = True

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> PendingObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class ModelStore(ABC):
    """An object store holding models, manifests and experiment state.

    Backends implement :meth:`put_stream`, :meth:`get_bytes`, :meth:`exists`, :meth:`list`,
    :meth:`delete`, :meth:`presign_get`, :meth:`presign_put` and :meth:`uri`.
    """

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, length: int, *, overwrite: bool = False) -> None:
        """Write ``length`` bytes read from ``stream`` to ``key`` atomically.

        If reading or uploading fails, no object appears at ``key`` (a previous one stays intact).

        Raises:
            ObjectExistsError: ``key`` exists and ``overwrite`` is False.
        """

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content. Raises ObjectNotFoundError."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a complete object exists at ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix`` (plain string prefix, recursive), sorted."""

    @abstractmethod
    def identity(self, key: str) -> ObjectIdentity:
        """The identity of the object's current version, without reading it (size plus a version mark).

        Equal identities mean the object was not rewritten in between, so a check of its bytes
        still holds (local folder: size, mtime and inode; S3: size and ETag).

        Raises:
            ObjectNotFoundError: ``key`` does not exist.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if present (no error when absent).

        Only for scratch data such as a run folder; experiment records (config, rounds) are never
        deleted — :class:`jipfed.storage.state.ExperimentStore` offers no way to.
        """

    @abstractmethod
    def presign_get(self, key: str, expires: timedelta | float = DEFAULT_URL_EXPIRY) -> str:
        """A URL that allows exactly a GET of ``key`` until it expires (at most 7 days)."""

    @abstractmethod
    def presign_put(self, key: str, expires: timedelta | float = DEFAULT_URL_EXPIRY) -> str:
        """A URL that allows exactly a PUT of ``key`` until it expires (at most 7 days)."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A printable reference to ``key`` (``s3://bucket/...`` or a path), for logs and XCom."""

    def pending(self, key: str, workdir: Path) -> PendingObject:
        """A file to write object ``key``'s content into, published by :meth:`PendingObject.commit`.

        This default writes the file in ``workdir`` and uploads it with :meth:`put_stream`; a backend
        that can publish the file in place (the local folder) overrides it, so nothing is copied.
        """
        validate_key(key)
        path = Path(workdir) / f".pending.{secrets.token_hex(8)}"

        def publish(file: Path, overwrite: bool) -> None:
            with open(file, "rb") as fh:
                self.put_stream(key, fh, file.stat().st_size, overwrite=overwrite)

        return PendingObject(key, path, publish)

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        """Write ``data`` to ``key`` atomically; see :meth:`put_stream`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data for {key!r} must be bytes, got {type(data).__name__}")
        raw = bytes(data)
        self.put_stream(key, io.BytesIO(raw), len(raw), overwrite=overwrite)

    def put_json(self, key: str, obj: Any, *, overwrite: bool = False) -> None:
        """Write ``obj`` as canonical JSON (see :func:`canonical_json`)."""
        self.put_bytes(key, canonical_json(obj), overwrite=overwrite)

    def get_json(self, key: str) -> Any:
        """Read a JSON object. Raises ObjectNotFoundError, or StoreError if it is not valid JSON."""
        raw = self.get_bytes(key)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"object {key!r} is not valid UTF-8 JSON: {exc}") from exc

    def put_if_absent_or_same(self, key: str, data: bytes) -> bool:
        """Write-once with idempotent retries: write ``data`` unless ``key`` already holds it.

        Returns True if written, False if the identical object was already there.

        Raises:
            ObjectExistsError: ``key`` holds different content.
        """
        try:
            self.put_bytes(key, data)
            return True
        except ObjectExistsError:
            if self.get_bytes(key) == bytes(data):
                return False
            raise ObjectExistsError(key, "it holds different content") from None


def json_object(obj: Any, what: str) -> dict[str, Any]:
    """``obj`` as a dict if it is a JSON object (Mapping with str keys), else ValueError."""
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{what} must be a mapping with string keys, got {type(obj).__name__}")
    return dict(obj)
