"""Round records indexed in OpenSearch, against a loopback HTTP server that answers with real
OpenSearch response bodies (tests/ui/opensearch_loopback.py; it is not OpenSearch itself)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jipfed.indexing.opensearch import (
    DEFAULT_INDEX,
    OpenSearchSettings,
    index_quietly,
    index_template,
    settings_from_connection,
    sync_store,
)
from jipfed.indexing.round_documents import document_id, round_documents
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore

from .experiments import FAILURE, ROUND_S, SITES
from .opensearch_loopback import LoopbackOpenSearch


@pytest.fixture
def server() -> Iterator[LoopbackOpenSearch]:
    with LoopbackOpenSearch() as running:
        yield running


def settings(port: int) -> OpenSearchSettings:
    return OpenSearchSettings(host="127.0.0.1", port=port, scheme="http", timeout_s=5)


def test_round_documents_carry_participation_metrics_and_durations(ui_store: ModelStore) -> None:
    exp_store = ExperimentStore(ui_store, "running")
    docs = round_documents(exp_store)
    assert sorted(docs) == sorted(document_id("running", r, s) for r in (0, 1) for s in (*SITES, "_all"))
    record = exp_store.load_aggregate(1)
    whole = docs["running:1:_all"]
    assert whole["metrics"]["val_dice_mean"] == record["metrics"]["val_dice_mean"]
    assert (whole["n_samples"], whole["n_included"], whole["duration_s"]) == (record["n_samples"], 2, ROUND_S)
    site_c = docs["running:1:site-c"]
    assert (site_c["status"], site_c["reason"], site_c["metrics"]) == (
        "missing",
        record["missing_reasons"]["site-c"],
        {},
    )
    assert FAILURE in site_c["reason"]
    site_a = docs["running:0:site-a"]
    assert site_a["status"] == "included" and site_a["metrics"] == record_site(exp_store, 0, "site-a")
    assert whole["@timestamp"].endswith("+00:00")


def record_site(exp_store: ExperimentStore, round_: int, site: str) -> dict:
    values = exp_store.load_aggregate(round_)["sites"][site]
    return {k: float(v) for k, v in values.items() if k != "n_samples"}


def test_template_fits_dashboards(server: LoopbackOpenSearch, ui_store: ModelStore) -> None:
    assert (
        index_quietly(settings(server.port), ExperimentStore(ui_store, "fedavg")) == 8
    )  # 2 rounds x (3 sites + the round)
    template = server.templates[DEFAULT_INDEX]
    assert template == index_template()
    assert template["index_patterns"] == ["jipfed-rounds", "jipfed-rounds-*"]
    props = template["template"]["mappings"]["properties"]
    assert props["@timestamp"] == {"type": "date"}
    assert {props[k]["type"] for k in ("experiment", "site", "status", "strategy")} == {"keyword"}
    assert template["template"]["mappings"]["dynamic_templates"][0]["metrics_as_double"]["mapping"] == {
        "type": "double"
    }
    stored = server.docs[DEFAULT_INDEX]["fedavg:1:_all"]
    assert stored == round_documents(ExperimentStore(ui_store, "fedavg"))["fedavg:1:_all"]


def test_down_then_catch_up_loses_nothing_and_indexes_once(
    server: LoopbackOpenSearch, ui_store: ModelStore, closed_port: int
) -> None:
    exp_store = ExperimentStore(ui_store, "running")
    assert index_quietly(settings(closed_port), exp_store) is None  # down: no exception, the round goes on
    assert server.docs == {}
    assert index_quietly(settings(server.port), exp_store) == 8  # catch-up: both closed rounds
    assert sorted(server.docs[DEFAULT_INDEX]) == sorted(round_documents(exp_store))
    bulks = sum(1 for _, path in server.requests if path.endswith("_bulk"))
    assert index_quietly(settings(server.port), exp_store) == 0  # nothing new: nothing written
    assert sum(1 for _, path in server.requests if path.endswith("_bulk")) == bulks


def test_refused_documents_are_reported_and_one_experiment_does_not_stop_the_others(
    server: LoopbackOpenSearch, ui_store: ModelStore, caplog: pytest.LogCaptureFixture
) -> None:
    server.refuse_bulk = True
    assert index_quietly(settings(server.port), ExperimentStore(ui_store, "fedavg")) is None
    assert "refused 8 round document(s)" in caplog.text and "mapper_parsing_exception" in caplog.text
    server.refuse_bulk = False
    client = settings(server.port).client()
    written = sync_store(client, ui_store, ["broken", "fedavg", "fedprox"])
    assert written == {"fedavg": 8, "fedprox": 8}
    assert "experiment broken: round records not indexed" in caplog.text


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="scheme"):
        OpenSearchSettings(host="h", scheme="ftp")
    with pytest.raises(ValueError, match="index name 'Rounds'"):
        OpenSearchSettings(host="h", index="Rounds")


def test_settings_from_a_connection() -> None:
    plain = settings_from_connection(
        "os.local", None, "jip", "pw", {"use_ssl": "false", "index": "fl-rounds"}
    )
    assert (plain.scheme, plain.port, plain.index, plain.login) == ("http", 9200, "fl-rounds", "jip")
    assert settings_from_connection("os.local", 9201, None, None, None).scheme == "https"
    with pytest.raises(ValueError, match=r"unknown extra field\(s\) \['ssl'\]"):
        settings_from_connection("os.local", None, None, None, {"ssl": True})
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        settings_from_connection("os.local", None, None, None, {"verify_certs": "maybe"})
