"""Index every round record of the model store in OpenSearch, and catch up on what is missing.

The model store is the source of truth; the index is derived from it and can be rebuilt at any
time. :func:`sync_experiment` (after each round) compares the store's round documents with the
index (``_mget`` by id) and bulk-indexes the missing ones, so a round closed while OpenSearch was
down is indexed by the next call, and nothing is lost. :func:`index_quietly` is what the central
calls: OpenSearch being down only logs a warning; the round still completes.

The index template (:func:`index_template`) maps the fields for OpenSearch Dashboards: an
``@timestamp`` date, keyword fields to filter and split by (experiment, site, status, strategy),
numbers for the metrics (``metrics.*`` as double).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jipfed.indexing.round_documents import round_documents
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

DEFAULT_INDEX = "jipfed-rounds"
_KEYWORDS = ("experiment", "plan", "strategy", "config_hash", "scope", "site", "status", "output_sha256")
_INTEGERS = ("round", "step", "n_samples", "n_included", "n_selected")


def index_template(index: str = DEFAULT_INDEX) -> dict[str, Any]:
    """The composable index template for ``index`` (and ``index-*``), fit for Dashboards."""
    properties: dict[str, Any] = {"@timestamp": {"type": "date"}, "duration_s": {"type": "double"}}
    properties.update({name: {"type": "keyword"} for name in _KEYWORDS})
    properties.update({name: {"type": "integer"} for name in _INTEGERS})
    properties["reason"] = {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}}
    properties["metrics"] = {"type": "object", "dynamic": True}
    return {
        "index_patterns": [index, f"{index}-*"],
        "priority": 100,
        "template": {
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": {
                "dynamic_templates": [
                    {"metrics_as_double": {"path_match": "metrics.*", "mapping": {"type": "double"}}}
                ],
                "properties": properties,
            },
        },
        "_meta": {"description": "JIP Federated round records (one per round and per site and round)"},
    }


@dataclass(frozen=True)
class OpenSearchSettings:
    """Where the index lives; built from an Airflow Connection by the Airflow layer.

    Args:
        host, port, scheme: the OpenSearch endpoint (``https`` verifies certificates unless
            ``verify_certs`` is False).
        login, password: HTTP basic auth (None: none).
        index: the index name (the template also covers ``<index>-*``).
        timeout_s: per-request timeout; there are no retries (the next round catches up).
    """

    host: str
    port: int = 9200
    scheme: str = "https"
    login: str | None = None
    password: str | None = None
    index: str = DEFAULT_INDEX
    verify_certs: bool = True
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"OpenSearch scheme must be http or https, got {self.scheme!r}")
        if not self.host:
            raise ValueError("OpenSearch host is empty")
        if not self.index or self.index != self.index.lower() or any(c in self.index for c in ' "*\\<|,>/?'):
            raise ValueError(f"invalid OpenSearch index name {self.index!r}")

    def client(self) -> Any:
        """An ``opensearchpy.OpenSearch`` client (no retries, short timeout)."""
        from opensearchpy import OpenSearch

        return OpenSearch(
            hosts=[{"host": self.host, "port": self.port, "scheme": self.scheme}],
            http_auth=(self.login, self.password or "") if self.login else None,
            use_ssl=self.scheme == "https",
            verify_certs=self.verify_certs,
            timeout=self.timeout_s,
            max_retries=0,
            retry_on_timeout=False,
        )


def ensure_template(client: Any, index: str = DEFAULT_INDEX) -> None:
    """Put the index template, named like the index (idempotent)."""
    client.indices.put_index_template(name=index, body=index_template(index))


def missing_ids(client: Any, index: str, ids: Sequence[str]) -> list[str]:
    """The ``ids`` that are not in ``index`` (an index that does not exist yet has none)."""
    if not ids:
        return []
    answer = client.mget(index=index, body={"ids": list(ids)}, params={"_source": "false"})
    found = {doc["_id"] for doc in answer["docs"] if doc.get("found")}
    return [i for i in ids if i not in found]


def index_documents(client: Any, index: str, docs: Mapping[str, Mapping[str, Any]]) -> int:
    """Bulk-index ``id -> document``; returns how many were written. Raises if any item failed."""
    from opensearchpy.helpers import bulk

    if not docs:
        return 0
    actions = [
        {"_op_type": "index", "_index": index, "_id": i, "_source": dict(doc)} for i, doc in docs.items()
    ]
    written, errors = bulk(client, actions, raise_on_error=False, max_retries=0)
    if errors:
        raise RuntimeError(
            f"OpenSearch refused {len(errors)} round document(s) of index {index!r}: {errors[:3]}"
        )
    return written


def sync_experiment(client: Any, exp_store: ExperimentStore, index: str = DEFAULT_INDEX) -> int:
    """Index the experiment's round documents that the index lacks; returns how many were written."""
    docs = round_documents(exp_store)
    todo = missing_ids(client, index, list(docs))
    written = index_documents(client, index, {i: docs[i] for i in todo})
    if written:
        logger.info("experiment %s: indexed %d round document(s) in %s", exp_store.experiment, written, index)
    return written


def sync_store(
    client: Any, store: ModelStore, experiments: Sequence[str], index: str = DEFAULT_INDEX
) -> dict[str, int]:
    """Catch up on every experiment named; one that fails is logged and the others go on."""
    written = {}
    for name in experiments:
        try:
            written[name] = sync_experiment(client, ExperimentStore(store, name), index)
        except Exception as exc:  # one unreadable experiment does not stop the others
            logger.warning("experiment %s: round records not indexed: %s", name, exc)
    return written


def index_quietly(settings: OpenSearchSettings, exp_store: ExperimentStore) -> int | None:
    """After a round: put the template and catch up on the experiment's round documents.

    Never raises for OpenSearch trouble: returns None and logs a warning (the next call catches up).
    """
    try:
        client = settings.client()
        ensure_template(client, settings.index)
        return sync_experiment(client, exp_store, settings.index)
    except Exception as exc:
        logger.warning(
            "experiment %s: round records not indexed in OpenSearch %s://%s:%s now (%s: %s); "
            "the next round catches up",
            exp_store.experiment,
            settings.scheme,
            settings.host,
            settings.port,
            type(exc).__name__,
            exc,
        )
        return None


def settings_from_connection(
    host: str | None,
    port: int | None,
    login: str | None,
    password: str | None,
    extra: Mapping[str, Any] | None,
) -> OpenSearchSettings:
    """Settings from an Airflow Connection's fields (conn_type ``opensearch``, as the OpenSearch
    provider reads it): extra ``use_ssl`` (default true), ``verify_certs`` (default true),
    ``index`` (default ``jipfed-rounds``), ``timeout_s``."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - {"use_ssl", "verify_certs", "index", "timeout_s"})
    if unknown:
        raise ValueError(f"OpenSearch connection: unknown extra field(s) {unknown}")
    return OpenSearchSettings(
        host=host or "",
        port=int(port or 9200),
        scheme="https" if _flag(extra.get("use_ssl", True)) else "http",
        login=login or None,
        password=password or None,
        index=str(extra.get("index", DEFAULT_INDEX)),
        verify_certs=_flag(extra.get("verify_certs", True)),
        timeout_s=float(extra.get("timeout_s", 10.0)),
    )


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"OpenSearch connection: expected true or false, got {value!r}")
