"""The central endpoint over real HTTP (uvicorn on 127.0.0.1) with CentralClient, on real experiments."""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from pathlib import Path

import pytest
import requests

from jipfed.central.app import create_app
from jipfed.central.client import CentralError, CentralRefused
from jipfed.central.serve import serve_in_thread
from jipfed.central.tokens import site_token
from jipfed.federation.rounds import aggregate_step
from jipfed.storage.base import ModelStore
from jipfed.storage.local import LocalFolderStore
from jipfed.training.local import LocalTrainer

from .helpers import SITES, Central, OpenOnUnpickle, start, train

UPDATE_PATH = "/v1/experiments/exp1/rounds/0/update"


def test_a_full_round_over_http(any_store: ModelStore, serve, trainers: dict[str, LocalTrainer]) -> None:
    central: Central = serve(any_store)
    exp_store = start(any_store)
    clients = {site: central.client(site) for site in SITES}
    assert clients["site-a"].health() == {"status": "ok"}
    for site in ("site-a", "site-b"):
        [item] = clients[site].pending_work()
        assert (item.ticket.experiment, item.ticket.round, item.ticket.step) == ("exp1", 0, 0)
        payload, manifest = clients[site].get_model("exp1", 0, 0)
        assert hashlib.sha256(payload).hexdigest() == item.ticket.model_sha256
        assert (payload, manifest) == exp_store.load_global(0)
        encoded = train(clients[site], trainers[site], site, item)
        accepted = clients[site].put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
        assert accepted["site"] == site and accepted["sha256"] == encoded.manifest.sha256
        assert exp_store.load_update(0, site)[0] == encoded.payload
        assert clients[site].pending_work() == []
    with pytest.raises(CentralRefused) as again:
        clients["site-a"].put_update("exp1", 0, encoded.payload, encoded.manifest.to_json(), check=False)
    assert again.value.code == "duplicate" and "experiment 'exp1', round 0" in str(again.value)

    [item_c] = clients["site-c"].pending_work()
    record = clients["site-c"].report_failure("exp1", 0, item_c.ticket.step, "PACS down", task="fetch_dicom")
    assert (record["site"], record["source"], record["reason"]) == (
        "site-c",
        "site",
        "data in fetch_dicom: PACS down",
    )
    assert clients["site-c"].pending_work() == []

    aggregate_step(exp_store, 0)
    aggregate = exp_store.load_aggregate(0)
    assert aggregate["included"] == ["site-a", "site-b"]
    assert aggregate["missing_reasons"] == {"site-c": "data in fetch_dicom: PACS down"}


def test_a_site_sees_and_writes_only_its_own_work(
    local_store: LocalFolderStore, serve, trainers: dict[str, LocalTrainer], caplog: pytest.LogCaptureFixture
) -> None:
    central = serve(local_store)
    a, b = central.client("site-a"), central.client("site-b")
    # Cyclic plan: step 0 is site-a's hop; site-b trains in step 1.
    cyclic = start(local_store, "cyc", sites=("site-a", "site-b"), plan="cyclic", min_sites=None)
    assert b.pending_work() == []
    with caplog.at_level(logging.WARNING, logger="jipfed.central.app"), pytest.raises(CentralError) as model:
        b.get_model("cyc", 0, 0)
    assert (model.value.status_code, model.value.code) == (403, "not_selected")
    assert "403 site=site-b experiment=cyc round=0 step=0" in caplog.text
    with pytest.raises(CentralError) as failure:
        b.report_failure("cyc", 0, 0, "pretending to be site-a")
    assert (failure.value.status_code, failure.value.code) == (403, "not_selected")
    [item] = a.pending_work()
    encoded_a = train(a, trainers["site-a"], "site-a", item)
    with pytest.raises(CentralRefused) as upload:
        b.put_update("cyc", 0, encoded_a.payload, encoded_a.manifest.to_json(), check=False)
    assert upload.value.code == "not_selected"
    assert cyclic.list_updates(0) == [] and cyclic.site_failures(0) == {}
    assert [w.ticket.experiment for w in a.pending_work()] == ["cyc"]

    # Parallel plan: both selected; site-b's token cannot upload site-a's update as its own.
    parallel = start(local_store, "par", sites=("site-a", "site-b"))
    item = [w for w in a.pending_work() if w.ticket.experiment == "par"][0]
    encoded_a = train(a, trainers["site-a"], "site-a", item)
    with pytest.raises(CentralRefused) as forged:
        b.put_update("par", 0, encoded_a.payload, encoded_a.manifest.to_json(), check=False)
    assert forged.value.code == "rejected" and "site-a" in forged.value.detail
    assert parallel.list_updates(0) == []
    assert a.put_update("par", 0, encoded_a.payload, encoded_a.manifest.to_json())["site"] == "site-a"
    assert parallel.list_updates(0) == ["site-a"]


def test_requests_without_a_valid_token_are_refused(
    local_store: LocalFolderStore, serve, secret: str
) -> None:
    central = serve(local_store)
    start(local_store)
    url = f"{central.url}/v1/work"
    assert requests.get(f"{central.url}/healthz", timeout=10).json() == {"status": "ok"}
    missing = requests.get(url, timeout=10)
    assert (missing.status_code, missing.json()["code"]) == (401, "no_token")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    basic = requests.get(url, auth=("site-a", "pw"), timeout=10)
    assert basic.status_code == 401
    for token in (
        site_token("another-central-secret-of-32-chars-or-more", "site-a"),
        f"jipfed.site-a.{'0' * 64}",
        "jipfed.site-a",
        "jipfed.../etc.passwd",
    ):
        answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert (answer.status_code, answer.json()["code"]) == (403, "bad_token"), token
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert secret not in answer.text
    other = central.client("site-a")
    other._session.headers["Authorization"] = f"Bearer jipfed.site-a.{'f' * 64}"
    with pytest.raises(CentralError, match=r"GET /v1/work answered 403 bad_token"):
        other.pending_work()


def test_a_misconfigured_central_answers_500_without_details(
    local_store: LocalFolderStore, serve, secret: str
) -> None:
    central = serve(local_store, token_secret=lambda: "too-short")
    answer = requests.get(f"{central.url}/v1/work", headers=central.headers("site-a"), timeout=10)
    assert (answer.status_code, answer.json()["code"]) == (500, "misconfigured")
    assert "too-short" not in answer.text
    with pytest.raises(ValueError, match="at least 32 characters"):
        serve(local_store, token_secret="too-short")

    def no_store() -> ModelStore:
        raise ValueError("connection 'jipfed_model_store_default': an fs connection needs extra 'path'")

    url, stop = serve_in_thread(create_app(no_store, secret))
    try:
        answer = requests.get(f"{url}/v1/work", headers=central.headers("site-a"), timeout=10)
    finally:
        stop()
    assert (answer.status_code, answer.json()["code"]) == (500, "misconfigured")
    assert "cannot open its model store" in answer.text and "extra" not in answer.text


def test_unknown_experiment_closed_step_and_store_failures(local_store: LocalFolderStore, serve) -> None:
    central = serve(local_store)
    exp_store = start(local_store)
    a = central.client("site-a")
    with pytest.raises(CentralError) as unknown:
        a.get_model("nope", 0, 0)
    assert (unknown.value.status_code, unknown.value.code) == (404, "unknown_experiment")
    with pytest.raises(CentralError) as invalid:
        a.get_model("bad.name", 0, 0)
    assert invalid.value.status_code == 400
    with pytest.raises(CentralRefused) as closed:
        a.get_model("exp1", 0, 1)
    assert closed.value.code == "not_open" and "the open step is 0 (round 0)" in closed.value.detail
    with pytest.raises(CentralRefused, match="not_open"):
        a.report_failure("exp1", 1, 1, "too early")

    # The stored model no longer matches its manifest: the client refuses the bytes.
    key = exp_store.layout.global_model(0)
    good = local_store.get_bytes(key)
    local_store.put_bytes(key, good[:-4] + b"\0\0\0\0", overwrite=True)
    with pytest.raises(CentralError, match="the manifest says"):
        a.get_model("exp1", 0, 0)
    local_store.put_bytes(key, good, overwrite=True)

    # A corrupt record in the store: 500 naming the experiment and round, no traceback.
    local_store.put_bytes(exp_store.layout.dispatch(0, 0), b'{"format": 1}', overwrite=True)
    with pytest.raises(CentralError) as broken:
        a.get_model("exp1", 0, 0)
    assert (broken.value.status_code, broken.value.code) == (500, "internal")
    assert "experiment 'exp1', round 0" in broken.value.detail and "Traceback" not in broken.value.detail
    with pytest.raises(CentralError, match="answered 500 internal"):
        a.pending_work()


def test_an_update_after_the_deadline_is_refused(
    local_store: LocalFolderStore, serve, trainers: dict[str, LocalTrainer]
) -> None:
    central = serve(local_store)
    exp_store = start(local_store, round_timeout_s=2.0)
    a = central.client("site-a")
    [item] = a.pending_work()
    encoded = train(a, trainers["site-a"], "site-a", item)
    time.sleep(max(0.0, item.dispatch.seconds_left()) + 0.1)
    assert a.pending_work() == []
    with pytest.raises(CentralRefused) as late:
        a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    assert late.value.code == "late" and "timed out" in late.value.detail
    assert exp_store.list_updates(0) == []


def test_oversized_uploads_get_413(local_store: LocalFolderStore, serve) -> None:
    central = serve(local_store, max_update_bytes=1000)
    start(local_store)
    a = central.client("site-a")
    for size in (5000, 9 * 1024**2):  # over the payload limit / over the whole body limit (not read)
        with pytest.raises(CentralError) as large:
            a.put_update("exp1", 0, b"x" * size, "{}", check=False)
        assert (large.value.status_code, large.value.code) == (413, "too_large")

    def chunked(size: int):  # no Content-Length: the body is counted while it is read
        yield b'--B\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n{}\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="payload"; filename="u"\r\n\r\n'
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b"\r\n--B--\r\n"

    headers = {**central.headers("site-a"), "Content-Type": "multipart/form-data; boundary=B"}
    answer = requests.put(central.url + UPDATE_PATH, data=chunked(9 * 1024**2), headers=headers, timeout=30)
    assert (answer.status_code, answer.json()["code"]) == (413, "too_large")
    assert local_store.list("experiments/exp1/rounds/0/updates/") == []


def test_malformed_and_pickled_uploads_are_refused_unread(
    local_store: LocalFolderStore, serve, trainers: dict[str, LocalTrainer], tmp_path: Path
) -> None:
    central = serve(local_store)
    exp_store = start(local_store)
    a = central.client("site-a")
    [item] = a.pending_work()
    encoded = train(a, trainers["site-a"], "site-a", item)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(OpenOnUnpickle(marker))
    manifest = encoded.manifest.replace(sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(CentralRefused) as pickled:
        a.put_update("exp1", 0, payload, manifest.to_json(), check=False)
    assert pickled.value.code == "rejected" and "safetensors" in pickled.value.detail
    assert not marker.exists()
    with pytest.raises(CentralRefused, match="rejected"):
        a.put_update("exp1", 0, encoded.payload, "not json", check=False)
    no_file = requests.put(
        central.url + UPDATE_PATH, data={"manifest": "{}"}, headers=central.headers("site-a"), timeout=10
    )
    assert (no_file.status_code, no_file.json()["code"]) == (400, "bad_request")
    assert exp_store.list_updates(0) == []
