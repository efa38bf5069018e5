"""ModelStoreHook: an Airflow Connection -> where the federation's object store is.

Two kinds of Connection:

* S3 / MinIO, conn_type ``aws`` (as Airflow's Amazon provider)::

      login     access key id       password  secret access key
      extra     {"endpoint_url": "http://127.0.0.1:9000",   # omit for AWS itself
                 "region_name": "us-east-1", "bucket": "jipfed", "prefix": "", "verify": true}

* a local folder, conn_type ``fs`` (as Airflow's File (path) connection): extra ``{"path": "/data/store"}``.

``get_store_config()`` returns a plain dict (``kind`` = ``s3`` or ``local``); ``get_conn()`` opens
the store with ``jipfed.storage.factory.open_store(**config)``.
"""

from __future__ import annotations

from typing import Any

from jipfed.operators.compat import BaseHook
from jipfed.operators.hooks._connection import ConnectionLike, checked_extras, optional_str

S3_CONN_TYPES = ("aws", "s3")
LOCAL_CONN_TYPES = ("fs",)
S3_EXTRA_FIELDS = (
    "endpoint_url",
    "region_name",
    "bucket",
    "prefix",
    "verify",
    "aws_access_key_id",
    "aws_secret_access_key",
)
DEFAULT_BUCKET = "jipfed"


def store_config(conn: ConnectionLike) -> dict[str, Any]:
    """The object store's location and credentials from a Connection.

    Returns:
        ``{"kind": "s3", "endpoint_url", "region", "bucket", "prefix", "access_key", "secret_key",
        "verify"}``
        (``endpoint_url`` None = AWS) or ``{"kind": "local", "root"}``.
    """
    if conn.conn_type in LOCAL_CONN_TYPES:
        extras = checked_extras(conn, ("path",))
        root = str(extras.get("path") or "").strip()
        if not root:
            raise ValueError(f"connection {conn.conn_id!r}: an fs connection needs extra 'path'")
        return {"kind": "local", "root": root}
    if conn.conn_type not in S3_CONN_TYPES:
        raise ValueError(
            f"connection {conn.conn_id!r}: conn_type {conn.conn_type!r} is not a model store; "
            f"use one of {sorted(S3_CONN_TYPES + LOCAL_CONN_TYPES)}"
        )
    extras = checked_extras(conn, S3_EXTRA_FIELDS)
    access_key = optional_str(conn.login) or extras.get("aws_access_key_id") or None
    secret_key = optional_str(conn.password) or extras.get("aws_secret_access_key") or None
    if (access_key is None) != (secret_key is None):
        raise ValueError(f"connection {conn.conn_id!r}: give both access key and secret key, or neither")
    endpoint_url = extras.get("endpoint_url") or None
    if endpoint_url is not None and not str(endpoint_url).startswith(("http://", "https://")):
        raise ValueError(f"connection {conn.conn_id!r}: endpoint_url {endpoint_url!r} is not an http(s) URL")
    verify = extras.get("verify", True)
    if not isinstance(verify, (bool, str)):
        raise ValueError(f"connection {conn.conn_id!r}: verify must be true, false or a CA bundle path")
    return {
        "kind": "s3",
        "endpoint_url": str(endpoint_url).rstrip("/") if endpoint_url else None,
        "region": extras.get("region_name") or None,
        "bucket": str(extras.get("bucket") or DEFAULT_BUCKET),
        "prefix": str(extras.get("prefix") or "").strip("/"),
        "access_key": access_key,
        "secret_key": secret_key,
        "verify": verify,
    }


class ModelStoreHook(BaseHook):
    """Reads the model store Connection (S3/MinIO or a local folder).

    Args:
        model_store_conn_id: The Connection id.
    """

    conn_name_attr = "model_store_conn_id"
    default_conn_name = "jipfed_model_store_default"
    conn_type = "aws"
    hook_name = "JIP Federated model store (S3/MinIO or folder)"

    def __init__(self, model_store_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_store_conn_id = model_store_conn_id

    def get_store_config(self) -> dict[str, Any]:
        """The store's location and credentials (see :func:`store_config`)."""
        return store_config(self.get_connection(self.model_store_conn_id))

    def get_conn(self) -> Any:
        """The opened store: ``jipfed.storage.factory.open_store(**self.get_store_config())``."""
        config = self.get_store_config()
        from jipfed.storage.factory import open_store

        return open_store(**config)
