"""select_cohort from an OpenSearch metadata index, as Kaapana keeps it.

Not a real OpenSearch: the client (opensearch-py) talks real HTTP to a small loopback server
(http.server in a thread on 127.0.0.1) that answers with OpenSearch 2.x response bodies — the root
``GET /`` info document, ``_search`` results (took, timed_out, _shards, hits.total.value/relation,
hits.hits[]._index/_id/_score/_source/sort) and the security plugin's 401. The server applies the
``term``/``terms`` filters, ``_source.includes``, ``size`` and ``search_after`` of the request to its
documents, and records each request so the tests also check the query the code sends. Documents
use Kaapana's field names ("<tag> <Keyword>_keyword", one document per series, id = series UID).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from jipfed.cohort.model import CohortCase, SeriesRef
from jipfed.cohort.opensearch import OpenSearchCohortError, build_query, select_cohort

USER, PASSWORD, INDEX = "admin", "os-secret", "project_admin"

ROOT_INFO = {
    "name": "opensearch-0",
    "cluster_name": "kaapana",
    "cluster_uuid": "Xb1d6kKpQ0C8y0bCq0nL9w",
    "version": {
        "distribution": "opensearch",
        "number": "2.11.1",
        "build_type": "tar",
        "build_hash": "6b1986e964d440be9137eba1413015c31c5a7752",
        "build_date": "2023-11-29T21:43:10.135035992Z",
        "build_snapshot": False,
        "lucene_version": "9.7.0",
        "minimum_wire_compatibility_version": "7.10.0",
        "minimum_index_compatibility_version": "7.0.0",
    },
    "tagline": "The OpenSearch Project: https://opensearch.org/",
}


def _doc(study: str, series: str, modality: str, description: str, dataset: str, tags: list[str]) -> dict:
    """A series document with the fields Kaapana's LocalDcm2JsonOperator writes (a few of many)."""
    return {
        "0020000D StudyInstanceUID_keyword": study,
        "0020000E SeriesInstanceUID_keyword": series,
        "00080018 SOPInstanceUID_keyword": f"{series}.1",
        "00080060 Modality_keyword": modality,
        "00000000 CuratedModality_keyword": modality,
        "0008103E SeriesDescription_keyword": description,
        "00081030 StudyDescription_keyword": dataset,
        "00100020 PatientID_keyword": "SYN-site-000",
        "00080020 StudyDate_date": "2024-01-01",
        "00120020 ClinicalTrialProtocolID_keyword": ["admin"],
        "00000000 Tags_keyword": tags,
    }


DOCS = [
    _doc("1.2.10", "1.2.10.1", "MR", "FLAIR", "BRATS-SYNTH", ["train"]),
    _doc("1.2.10", "1.2.10.2", "MR", "T1", "BRATS-SYNTH", ["train"]),
    _doc("1.2.10", "1.2.10.3", "SEG", "Tumor segmentation", "BRATS-SYNTH", ["train"]),
    _doc("1.2.20", "1.2.20.1", "MR", "T2", "BRATS-SYNTH", []),
    _doc("1.2.20", "1.2.20.2", "SEG", "Tumor segmentation", "BRATS-SYNTH", []),
    _doc("1.2.20", "1.2.20.3", "CT", "scout", "BRATS-SYNTH", []),
    _doc("1.2.30", "1.2.30.1", "MR", "T1", "OTHER", ["train"]),
]


def _matches(source: dict, clause: dict) -> bool:
    """One ``{"term": {field: value}}`` or ``{"terms": {field: [values]}}`` filter on a document."""
    ((kind, spec),) = clause.items()
    ((field, wanted),) = spec.items()
    accepted = wanted if kind == "terms" else [wanted]
    values = source.get(field.removesuffix(".keyword"))
    return any(v in accepted for v in (values if isinstance(values, list) else [values]))


class FakeOpenSearch(ThreadingHTTPServer):
    """Answers GET / and POST|GET /<index>/_search like OpenSearch 2.x with the security plugin."""

    def __init__(self, docs: list[dict]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.docs = docs
        self.requests: list[tuple[str, str, dict | None]] = []
        self.auth_headers: list[str | None] = []

    def search(self, index: str, body: dict) -> dict:
        clauses = body["query"]["bool"]["filter"]
        sort_field = next(iter(body["sort"][0])).removesuffix(".keyword")
        hits = sorted(
            (d for d in self.docs if all(_matches(d, c) for c in clauses)), key=lambda d: d[sort_field]
        )
        if "search_after" in body:
            hits = [d for d in hits if d[sort_field] > body["search_after"][0]]
        page = hits[: body.get("size", 10)]
        includes = body.get("_source", {}).get("includes")
        return {
            "took": 3,
            "timed_out": False,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {
                "total": {"value": len(hits), "relation": "eq"},
                "max_score": None,
                "hits": [
                    {
                        "_index": index,
                        "_id": d["0020000E SeriesInstanceUID_keyword"],
                        "_score": None,
                        "_source": {k: v for k, v in d.items() if includes is None or k in includes},
                        "sort": [d[sort_field]],
                    }
                    for d in page
                ],
            },
        }


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenSearch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logging.getLogger(__name__).debug(format, *args)

    def _answer(self, status: int, body: dict | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/json; charset=UTF-8" if isinstance(body, dict) else "text/plain"
        )
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="OpenSearch Security"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        path = self.path.split("?")[0]
        self.server.requests.append((self.command, path, body))
        auth = self.headers.get("Authorization")
        self.server.auth_headers.append(auth)
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if auth != expected:
            self._answer(401, "Unauthorized")
        elif path == "/":
            self._answer(200, ROOT_INFO)
        elif path == f"/{INDEX}/_search" and body is not None:
            self._answer(200, self.server.search(INDEX, body))
        else:
            index = path.strip("/").split("/")[0]
            error = {
                "type": "index_not_found_exception",
                "reason": f"no such index [{index}]",
                "index": index,
                "resource.id": index,
                "resource.type": "index_or_alias",
                "index_uuid": "_na_",
            }
            self._answer(404, {"error": {"root_cause": [error], **error}, "status": 404})

    do_GET = do_POST = _handle


@pytest.fixture
def fake() -> Iterator[FakeOpenSearch]:
    server = FakeOpenSearch(DOCS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _select(fake: FakeOpenSearch, **kwargs: Any) -> list[CohortCase]:
    return select_cohort(
        host="127.0.0.1", port=fake.server_address[1], username=USER, password=PASSWORD, **kwargs
    )


def test_select_cohort_pages_and_groups(fake: FakeOpenSearch) -> None:
    cases = _select(fake, dataset="BRATS-SYNTH", page_size=2)
    assert cases == [
        CohortCase(
            "1.2.10",
            (
                SeriesRef("1.2.10", "1.2.10.1", "MR", "FLAIR", None),
                SeriesRef("1.2.10", "1.2.10.2", "MR", "T1", None),
                SeriesRef("1.2.10", "1.2.10.3", "SEG", "Tumor segmentation", None),
            ),
        ),
        CohortCase(
            "1.2.20",
            (
                SeriesRef("1.2.20", "1.2.20.1", "MR", "T2", None),
                SeriesRef("1.2.20", "1.2.20.2", "SEG", "Tumor segmentation", None),
            ),
        ),
    ]
    searches = [(m, p, b) for m, p, b in fake.requests if p.endswith("/_search")]
    assert [(m, p) for m, p, _ in searches] == [("POST", f"/{INDEX}/_search")] * 3  # 2 + 2 + 1 hits
    first, second, third = (b for _, _, b in searches)
    assert first == {**build_query("BRATS-SYNTH", ["MR", "SEG"]), "size": 2}
    assert first["query"]["bool"]["filter"] == [
        {"term": {"00081030 StudyDescription_keyword.keyword": "BRATS-SYNTH"}},
        {"terms": {"00080060 Modality_keyword.keyword": ["MR", "SEG"]}},
    ]
    assert first["sort"] == [{"0020000E SeriesInstanceUID_keyword.keyword": "asc"}]
    assert (second["search_after"], third["search_after"]) == (["1.2.10.2"], ["1.2.20.1"])
    assert all(h is not None and h.startswith("Basic ") for h in fake.auth_headers)


def test_dataset_field_and_modalities(fake: FakeOpenSearch) -> None:
    cases = _select(fake, dataset="train", dataset_field="00000000 Tags_keyword", modalities=("mr",))
    assert [(c.study_uid, [r.series_uid for r in c.series]) for c in cases] == [
        ("1.2.10", ["1.2.10.1", "1.2.10.2"]),
        ("1.2.30", ["1.2.30.1"]),
    ]
    body = fake.requests[-1][2]
    assert body is not None and body["query"]["bool"]["filter"][0] == {
        "term": {"00000000 Tags_keyword.keyword": "train"}
    }
    assert body["query"]["bool"]["filter"][1] == {"terms": {"00080060 Modality_keyword.keyword": ["MR"]}}
    assert _select(fake, dataset="brats-synth") == []  # exact, case-sensitive term


def test_broken_document_is_skipped_with_warning(
    fake: FakeOpenSearch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _doc("1.2.10", "1.2.10.9", "MR", "T2", "BRATS-SYNTH", [])
    broken["0020000D StudyInstanceUID_keyword"] = "not-a-uid"
    fake.docs = [*DOCS, broken]
    with caplog.at_level(logging.WARNING, logger="jipfed.cohort.opensearch"):
        cases = _select(fake, dataset="BRATS-SYNTH")
    assert "1.2.10.9" not in {r.series_uid for c in cases for r in c.series}
    assert "skipping document '1.2.10.9'" in caplog.text


def test_errors_name_the_index(fake: FakeOpenSearch, closed_port: int) -> None:
    port = fake.server_address[1]
    with pytest.raises(OpenSearchCohortError, match=rf"http://127.0.0.1:{port}, index 'project_admin'.*401"):
        select_cohort(host="127.0.0.1", port=port, username=USER, password="wrong")
    with pytest.raises(OpenSearchCohortError, match="index 'nope'.*index_not_found"):
        _select(fake, index="nope")
    down = closed_port
    with pytest.raises(OpenSearchCohortError, match=f"127.0.0.1:{down}.*search failed"):
        select_cohort(host="127.0.0.1", port=down, timeout_s=5)
    with pytest.raises(ValueError, match="together"):
        select_cohort(host="h", port=9200, username="u")
    with pytest.raises(ValueError, match="modalities"):
        select_cohort(host="h", port=9200, modalities="MR")
