"""``S3Store``: the model store in an S3-compatible bucket (MinIO, AWS S3), via the ``minio`` SDK.

Atomicity is S3's: an object becomes visible only when its upload completes (single PUT, or
CompleteMultipartUpload); a failed multipart upload is aborted by the SDK, so no object and no
pending parts remain.

No-overwrite: ``put_*`` checks with ``stat_object`` first, and an object of at most
:data:`CONDITIONAL_PUT_MAX_BYTES` (every manifest, the commit marker of an update) is written with a
conditional PutObject (``If-None-Match: *``): of two writers racing for the same new key exactly one
wins, the other gets ``ObjectExistsError``. AWS S3, current MinIO and moto (>= 5.0) honour it; a
server answering ``NotImplemented`` gets a plain PUT after the check (the race window stays there).
minio 7.2's public ``put_object`` cannot send the header (unknown headers become ``x-amz-meta-*``),
so the single-request PutObject goes through the SDK's ``_put_object``. Larger objects go through
the SDK's multipart upload after the check (a site's payload is committed by its manifest).

The region is always passed to the client, so presigning makes no network call.
"""

from __future__ import annotations

import io
import logging
from datetime import timedelta
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.datatypes import Object
from minio.error import S3Error

from jipfed.storage.base import (
    DEFAULT_URL_EXPIRY,
    ModelStore,
    ObjectExistsError,
    ObjectIdentity,
    ObjectNotFoundError,
    StoreError,
    check_expiry,
    validate_key,
    validate_prefix,
)

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
AWS_ENDPOINT = "s3.amazonaws.com"
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "ResourceNotFound"})
#: Objects up to this size are written with one conditional PutObject (``If-None-Match: *``).
CONDITIONAL_PUT_MAX_BYTES = 5 * 1024 * 1024


def split_endpoint(endpoint: str | None, secure: bool | None) -> tuple[str, bool]:
    """``(host[:port], secure)`` from ``http(s)://host[:port]`` or ``host[:port]`` (None = AWS).

    A scheme decides ``secure``; ``secure`` contradicting it is a ValueError. Without a scheme,
    ``secure`` defaults to True.
    """
    if endpoint is None:
        return AWS_ENDPOINT, True if secure is None else secure
    text = endpoint.strip().rstrip("/")
    scheme_secure: bool | None = None
    for scheme, is_secure in (("https://", True), ("http://", False)):
        if text.startswith(scheme):
            text, scheme_secure = text[len(scheme) :], is_secure
    if not text or "/" in text:
        raise ValueError(f"S3 endpoint must be host[:port] or http(s)://host[:port], got {endpoint!r}")
    if scheme_secure is not None and secure is not None and secure != scheme_secure:
        raise ValueError(f"secure={secure} contradicts the scheme of endpoint {endpoint!r}")
    resolved = scheme_secure if scheme_secure is not None else secure
    return text, True if resolved is None else resolved


def _ca_bundle_client(ca_bundle: str) -> urllib3.PoolManager:
    """A pool like minio's default that verifies TLS against ``ca_bundle``."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=300, read=300),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_bundle,
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class S3Store(ModelStore):
    """A model store in an S3 bucket, optionally below a key prefix.

    Args:
        bucket: Bucket name (must exist).
        endpoint: ``http(s)://host[:port]`` or ``host[:port]``; None = AWS S3.
        access_key: Access key id (None with ``secret_key`` None = anonymous, cannot presign).
        secret_key: Secret access key.
        region: Signing region; always sent, so presigning needs no network (MinIO: ``us-east-1``).
        secure: HTTPS; taken from the endpoint's scheme when it has one.
        prefix: Key prefix inside the bucket (``"jipfed"`` puts every key under ``jipfed/``).
        verify: TLS verification: True (certifi), False, or a CA bundle path.
        part_size: Multipart part size in bytes (0 = let the SDK choose; minimum 5 MiB).
    """

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = DEFAULT_REGION,
        secure: bool | None = None,
        prefix: str = "",
        verify: bool | str = True,
        part_size: int = 0,
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        if part_size and part_size < 5 * 1024 * 1024:
            raise ValueError(f"part_size must be 0 or >= 5 MiB, got {part_size}")
        host, is_secure = split_endpoint(endpoint, secure)
        self.bucket = bucket
        self.region = region or DEFAULT_REGION
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.part_size = part_size
        self.endpoint_url = f"{'https' if is_secure else 'http'}://{host}"
        self._signed = access_key is not None
        self.client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=is_secure,
            region=self.region,
            http_client=_ca_bundle_client(verify) if isinstance(verify, str) else None,
            cert_check=bool(verify),
        )

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.endpoint_url!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    def _stat(self, key: str) -> Object | None:
        """The object's metadata; None when it does not exist."""
        try:
            return self.client.stat_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise StoreError(f"cannot stat {self.uri(key)}: {exc.code}: {exc.message}") from exc

    def put_stream(self, key: str, stream: BinaryIO, length: int, *, overwrite: bool = False) -> None:
        name = self._name(key)
        if length < 0:
            raise ValueError(f"length for {key!r} must be >= 0, got {length}")
        if not overwrite and self._stat(key) is not None:
            raise ObjectExistsError(key)
        if not overwrite and length <= CONDITIONAL_PUT_MAX_BYTES:
            self._put_if_absent(key, stream, length)
            return
        try:
            # One upload thread: a failure aborts the multipart upload with no part still in flight.
            self.client.put_object(
                self.bucket, name, stream, length, part_size=self.part_size, num_parallel_uploads=1
            )
        except S3Error as exc:
            raise StoreError(f"upload to {self.uri(key)} failed: {exc.code}: {exc.message}") from exc
        log.debug("uploaded %s (%d bytes)", self.uri(key), length)

    def _put_if_absent(self, key: str, stream: BinaryIO, length: int) -> None:
        """One conditional PutObject (a plain one where the server does not implement conditions)."""
        data = stream.read(length)
        if len(data) != length:
            raise StoreError(f"stream for {key!r} ended {length - len(data)} bytes short of {length}")
        headers = {"If-None-Match": "*", "Content-Type": "application/octet-stream"}
        try:
            self.client._put_object(self.bucket, self._name(key), data, headers=headers)
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ObjectExistsError(key, "a concurrent writer created it (conditional write)") from None
            if exc.code != "NotImplemented":
                raise StoreError(f"upload to {self.uri(key)} failed: {exc.code}: {exc.message}") from exc
            log.warning("%s: the server does not implement conditional writes", self.endpoint_url)
            self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), length)
        log.debug("uploaded %s (%d bytes, conditional)", self.uri(key), length)

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectNotFoundError(key) from None
            raise StoreError(f"cannot read {self.uri(key)}: {exc.code}: {exc.message}") from exc
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def identity(self, key: str) -> ObjectIdentity:
        """Size and ETag (other bytes get another ETag; so may the same bytes uploaded in other parts)."""
        obj = self._stat(key)
        if obj is None:
            raise ObjectNotFoundError(key)
        return {"size": int(obj.size or 0), "etag": str(obj.etag)}

    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            names = [
                obj.object_name
                for obj in self.client.list_objects(self.bucket, prefix=base + prefix, recursive=True)
                if obj.object_name is not None
            ]
        except S3Error as exc:
            raise StoreError(f"cannot list s3://{self.bucket}/{base}{prefix}: {exc.code}") from exc
        return sorted(name[len(base) :] for name in names)

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._name(key))
        except S3Error as exc:
            raise StoreError(f"cannot delete {self.uri(key)}: {exc.code}: {exc.message}") from exc

    def _presign(self, method: str, key: str, expires: timedelta | float) -> str:
        lifetime = check_expiry(expires)
        if not self._signed:
            raise StoreError(f"cannot presign {self.uri(key)}: the store has no credentials")
        return self.client.get_presigned_url(method, self.bucket, self._name(key), expires=lifetime)

    def presign_get(self, key: str, expires: timedelta | float = DEFAULT_URL_EXPIRY) -> str:
        return self._presign("GET", key, expires)

    def presign_put(self, key: str, expires: timedelta | float = DEFAULT_URL_EXPIRY) -> str:
        return self._presign("PUT", key, expires)
