"""A loopback HTTP server that answers the few OpenSearch calls the indexer makes, with the response
bodies a real OpenSearch 2.x cluster sends (shapes from the OpenSearch REST API reference: root info,
``PUT _index_template``, ``_mget`` including the ``index_not_found_exception`` of a missing index,
``_bulk`` items with ``result``/``status``/``_shards``). It keeps documents in memory, so a test can
check what was indexed. It is not OpenSearch: it does not search, score or apply mappings.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

INFO = {
    "name": "opensearch-node1",
    "cluster_name": "opensearch-cluster",
    "cluster_uuid": "Lk9TsZ1nQZWXbY5XoP0sAw",
    "version": {
        "distribution": "opensearch",
        "number": "2.19.1",
        "build_type": "tar",
        "build_hash": "2e4741fb45d1b150aaeeadf66d41445b23ff5982",
        "build_date": "2025-02-27T01:16:47.726162386Z",
        "build_snapshot": False,
        "lucene_version": "9.12.1",
        "minimum_wire_compatibility_version": "7.10.0",
        "minimum_index_compatibility_version": "7.0.0",
    },
    "tagline": "The OpenSearch Project: https://opensearch.org/",
}
SHARDS = {"total": 1, "successful": 1, "failed": 0}


def _index_not_found(index: str) -> dict[str, Any]:
    cause = {
        "type": "index_not_found_exception",
        "reason": f"no such index [{index}]",
        "index": index,
        "resource.id": index,
        "resource.type": "index_expression",
        "index_uuid": "_na_",
    }
    return {"root_cause": [cause], **cause}


class LoopbackOpenSearch:
    """``with LoopbackOpenSearch() as server:`` ``server.port``, ``server.docs[index][id]``, ``server.templates``."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.refuse_bulk = False  # answer _bulk with a mapping error per item
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, data: Any) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json; charset=UTF-8")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("PUT")

            def _route(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                owner.requests.append((method, path))
                body = self._body()
                parts = [p for p in path.split("/") if p]
                if not parts:
                    return self._send(200, INFO)
                if parts[0] == "_index_template" and method == "PUT":
                    owner.templates[parts[1]] = json.loads(body)
                    return self._send(200, {"acknowledged": True})
                if parts[-1] == "_mget":
                    return self._send(200, owner.mget(parts[0], json.loads(body)["ids"]))
                if parts[-1] == "_bulk":
                    return self._send(200, owner.bulk(body))
                return self._send(400, {"error": f"loopback server: no route {method} {path}", "status": 400})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def mget(self, index: str, ids: list[str]) -> dict[str, Any]:
        if index not in self.docs:
            return {"docs": [{"_index": index, "_id": i, "error": _index_not_found(index)} for i in ids]}
        docs = []
        for i in ids:
            doc = self.docs[index].get(i)
            if doc is None:
                docs.append({"_index": index, "_id": i, "found": False})
            else:
                docs.append(
                    {
                        "_index": index,
                        "_id": i,
                        "_version": 1,
                        "_seq_no": 0,
                        "_primary_term": 1,
                        "found": True,
                    }
                )
        return {"docs": docs}

    def bulk(self, body: bytes) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        items = []
        for action, source in zip(lines[::2], lines[1::2], strict=True):
            meta = action["index"]
            index, doc_id = meta["_index"], meta["_id"]
            if self.refuse_bulk:
                error = {
                    "type": "mapper_parsing_exception",
                    "reason": "failed to parse field [round] of type [integer]",
                }
                items.append({"index": {"_index": index, "_id": doc_id, "status": 400, "error": error}})
                continue
            created = doc_id not in self.docs.setdefault(index, {})
            self.docs[index][doc_id] = source
            items.append(
                {
                    "index": {
                        "_index": index,
                        "_id": doc_id,
                        "_version": 1,
                        "result": "created" if created else "updated",
                        "_shards": SHARDS,
                        "_seq_no": len(self.docs[index]) - 1,
                        "_primary_term": 1,
                        "status": 201 if created else 200,
                    }
                }
            )
        return {"took": 3, "errors": any("error" in i["index"] for i in items), "items": items}

    def __enter__(self) -> LoopbackOpenSearch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
