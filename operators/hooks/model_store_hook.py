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

from jipfed.tasks.connections import open_model_store, store_config

# the connection parsing lives in the core (shared with ``jipfed task`` in a pod); re-exported here
__all__ = ["ModelStoreHook", "open_model_store", "store_config"]


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
        return open_model_store(self.get_connection(self.model_store_conn_id))
