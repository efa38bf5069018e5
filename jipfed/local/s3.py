"""``LocalS3Server``: moto's S3 server on 127.0.0.1 (real HTTP), with a fresh bucket.

For the tests and local trials (moto comes with the ``test`` extra). The server binds port 0
itself and reports the port it got. Usage::

    with LocalS3Server() as s3:
        store = s3.make_store()           # an S3Store on the server's bucket
        url = store.presign_get("a/b")    # usable with requests

moto verifies neither signatures nor expiry of presigned URLs (see field-notes.md): tests can check
what our code puts into a URL, not that S3 enforces it. moto keeps its state per process, shared by
all servers in it, so each server gets its own random bucket and empties and removes it on exit.
"""

from __future__ import annotations

import logging
import secrets
from types import TracebackType

from minio import Minio
from minio.deleteobjects import DeleteObject

from jipfed.storage.s3 import DEFAULT_REGION, S3Store

log = logging.getLogger(__name__)


class LocalS3ServerError(RuntimeError):
    """moto's server is not installed or did not start."""


class LocalS3Server:
    """A running moto S3 server; use as a context manager.

    Args:
        bucket: Bucket to create (default: a random ``jipfed-test-…`` name).
        region: Region the clients sign for.
    """

    access_key = "jipfed-test-access"
    secret_key = "jipfed-test-secret"  # moto accepts any credentials

    def __init__(self, *, bucket: str | None = None, region: str = DEFAULT_REGION) -> None:
        self.bucket = bucket or f"jipfed-test-{secrets.token_hex(4)}"
        self.region = region
        self._server = None
        self.endpoint_url = ""

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> LocalS3Server:
        """Start the server on a free port of 127.0.0.1 and create the bucket."""
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # a missing component fails the tests, it does not skip them
            raise LocalS3ServerError("moto[server] is not installed: pip install 'moto[server]'") from exc
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self.endpoint_url = f"http://{host}:{port}"
        try:
            self.client().make_bucket(self.bucket)
        except Exception:
            self.stop()
            raise
        log.info("moto S3 at %s, bucket %s", self.endpoint_url, self.bucket)
        return self

    def stop(self) -> None:
        """Remove the bucket (moto's state outlives the server) and stop the server."""
        if self._server is None:
            return
        try:
            client = self.client()
            if client.bucket_exists(self.bucket):
                names = [o.object_name for o in client.list_objects(self.bucket, recursive=True)]
                errors = list(client.remove_objects(self.bucket, [DeleteObject(n) for n in names if n]))
                if errors:
                    log.warning("could not empty test bucket %s: %s", self.bucket, errors)
                else:
                    client.remove_bucket(self.bucket)
        finally:
            self._server.stop()
            self._server = None

    def client(self) -> Minio:
        """A minio client for the server (for checks a test makes behind the store's back)."""
        if self._server is None:
            raise LocalS3ServerError("LocalS3Server is not running; use it as a context manager")
        return Minio(
            self.endpoint_url.removeprefix("http://"),
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
        )

    def store_config(self, prefix: str = "") -> dict[str, object]:
        """Keyword settings for :func:`jipfed.storage.factory.open_store`."""
        return {
            "kind": "s3",
            "bucket": self.bucket,
            "prefix": prefix,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }

    def make_store(self, prefix: str = "", *, part_size: int = 0) -> S3Store:
        """An :class:`S3Store` on the server's bucket, optionally below ``prefix``."""
        if self._server is None:
            raise LocalS3ServerError("LocalS3Server is not running; use it as a context manager")
        return S3Store(
            bucket=self.bucket,
            endpoint=self.endpoint_url,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            prefix=prefix,
            part_size=part_size,
        )

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
