"""ExperimentState and ExperimentStore (both backends; site URLs against moto's S3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from jipfed.storage.base import ModelStore, ObjectExistsError, ObjectNotFoundError, PresignNotSupportedError
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.s3 import S3Store
from jipfed.storage.state import (
    ConfigConflictError,
    ExperimentState,
    ExperimentStore,
    IntegrityError,
    Status,
    StepRecord,
    config_hash_of,
)

CONFIG = {"strategy": "fedavg", "rounds": 3, "model": {"name": "unet", "channels": [16, 32]}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(payload: bytes, round_: int, **extra: object) -> dict:
    return {"sha256": sha(payload), "round": round_, **extra}


@pytest.fixture
def exp(any_store: ModelStore) -> ExperimentStore:
    store = ExperimentStore(any_store, "brats-demo")
    store.save_config(CONFIG)
    return store


# -- ExperimentState ------------------------------------------------------------------------------


def test_state_transitions_and_json_round_trip() -> None:
    state = ExperimentState(experiment="e1", config_hash=config_hash_of(CONFIG))
    assert (state.status, state.next_step, state.current_round) == (Status.CREATED, 0, 0)
    state = state.start().complete_step(
        StepRecord(
            step=0, round=0, included=("site-a",), rejected={"site-b": "NaN in update"}, metrics={"dice": 0.5}
        )
    )
    assert (state.last_completed_step, state.next_step, state.current_round) == (0, 1, 1)
    state = state.complete_step(StepRecord(step=1, round=1, included=("site-a", "site-b")), next_round=1)
    assert state.current_round == 1
    again = ExperimentState.from_json(state.to_json())
    assert again == state
    assert again.history[0].rejected == {"site-b": "NaN in update"}
    assert json.loads(state.to_json())["status"] == "running"
    failed = state.fail("site-a unreachable")
    assert (failed.status, failed.error) == (Status.FAILED, "site-a unreachable")
    resumed = failed.start()
    assert (resumed.status, resumed.error, resumed.next_step) == (Status.RUNNING, None, 2)
    done = resumed.finish()
    with pytest.raises(ValueError, match="finished"):
        done.start()


def test_steps_are_never_repeated_or_skipped() -> None:
    state = ExperimentState(experiment="e1", config_hash="0" * 64).start()
    state = state.complete_step(StepRecord(step=0, round=0))
    for step in (0, 2):
        with pytest.raises(ValueError, match="next step is 1"):
            state.complete_step(StepRecord(step=step, round=0))
    with pytest.raises(ValueError, match="while the experiment is created"):
        ExperimentState(experiment="e1", config_hash="0" * 64).complete_step(StepRecord(step=0, round=0))
    with pytest.raises(ValueError, match="cannot finish"):
        ExperimentState(experiment="e1", config_hash="0" * 64).finish()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": {"loss": float("nan")}}, "Out of range float"),
        ({"included": ("a",), "rejected": {"a": "late"}}, "listed twice"),
        ({"included": ("a", "a")}, "listed twice"),
        ({"rejected": {"a": ""}}, "non-empty string"),
        ({"included": ("../b",)}, "invalid site id"),
    ],
)
def test_bad_step_records_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StepRecord(step=0, round=0, **kwargs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 99}, "unsupported state format"),
        ({"surprise": 1}, "unknown experiment state field"),
        ({"last_completed_step": 3}, "disagrees"),
        ({"status": "paused"}, "paused"),
        ({"config_hash": "abc"}, "64 lower-case hex"),
    ],
)
def test_invalid_state_json_is_refused(change: dict, message: str) -> None:
    data = ExperimentState(experiment="e1", config_hash="0" * 64).to_dict() | change
    with pytest.raises(ValueError, match=message):
        ExperimentState.from_dict(data)


# -- ExperimentStore: config and state ------------------------------------------------------------


def test_config_is_immutable(exp: ExperimentStore) -> None:
    reordered = {"model": {"channels": [16, 32], "name": "unet"}, "rounds": 3, "strategy": "fedavg"}
    assert exp.save_config(reordered) == config_hash_of(CONFIG)  # same content: accepted
    with pytest.raises(ConfigConflictError, match="already has a different config"):
        exp.save_config(CONFIG | {"rounds": 4})
    assert exp.load_config() == CONFIG
    raw = exp.store.get_bytes(exp.layout.config())
    assert exp.config_hash() == sha(raw) == config_hash_of(CONFIG)


def test_state_survives_reopening(tmp_path: Path) -> None:
    first = ExperimentStore(LocalFolderStore(tmp_path), "e1")
    first.save_config(CONFIG)
    state = first.load_or_create_state().start()
    state = state.complete_step(StepRecord(step=0, round=0, included=("site-a",), metrics={"loss": 0.7}))
    first.save_state(state)

    reopened = ExperimentStore(LocalFolderStore(tmp_path), "e1")  # a new DAG run, a new process
    resumed = reopened.load_or_create_state()
    assert resumed == state
    assert (resumed.status, resumed.next_step, resumed.current_round) == (Status.RUNNING, 1, 1)
    reopened.save_state(resumed.complete_step(StepRecord(step=1, round=1)))
    assert first.load_state().last_completed_step == 1


def test_state_must_belong_to_this_experiment(exp: ExperimentStore) -> None:
    with pytest.raises(ValueError, match="not the stored config"):
        exp.save_state(ExperimentState(experiment="brats-demo", config_hash="0" * 64))
    with pytest.raises(ValueError, match="state of experiment 'other'"):
        exp.save_state(ExperimentState(experiment="other", config_hash=exp.config_hash()))
    with pytest.raises(ObjectNotFoundError):
        exp.load_state()


# -- ExperimentStore: rounds (both backends) ------------------------------------------------------


def test_global_model_write_once(exp: ExperimentStore) -> None:
    payload = b"global r0"
    exp.save_global(0, payload, manifest(payload, 0, shapes={"w": [2, 2]}))
    exp.save_global(0, payload, manifest(payload, 0, shapes={"w": [2, 2]}))  # identical retry: ok
    with pytest.raises(ObjectExistsError, match="global.safetensors"):
        exp.save_global(0, b"other", manifest(b"other", 0))
    assert exp.load_global(0) == (payload, manifest(payload, 0, shapes={"w": [2, 2]}))
    assert exp.has_global(0) and not exp.has_global(1)
    with pytest.raises(ValueError, match="does not match the payload"):
        exp.save_global(1, b"x", manifest(b"y", 1))
    with pytest.raises(ValueError, match="says round 2"):
        exp.save_global(1, b"x", manifest(b"x", 2))
    assert not exp.has_global(1)


def test_corrupted_global_is_detected(exp: ExperimentStore) -> None:
    exp.save_global(0, b"good", manifest(b"good", 0))
    exp.store.put_bytes(exp.layout.global_model(0), b"evil", overwrite=True)  # behind the facade
    with pytest.raises(IntegrityError, match="its manifest says"):
        exp.load_global(0)


def test_second_update_for_a_site_is_refused(exp: ExperimentStore) -> None:
    exp.save_update(1, "site-a", b"delta a", manifest(b"delta a", 1, site="site-a", n_samples=4))
    exp.save_update(1, "site-b", b"delta b", manifest(b"delta b", 1, site="site-b", n_samples=6))
    with pytest.raises(ObjectExistsError, match="site 'site-a' already uploaded an update for round 1"):
        exp.save_update(1, "site-a", b"delta a2", manifest(b"delta a2", 1, site="site-a"))
    assert exp.load_update(1, "site-a")[0] == b"delta a"
    with pytest.raises(ValueError, match="says site 'site-b'"):
        exp.save_update(1, "site-c", b"x", manifest(b"x", 1, site="site-b"))
    # a model without its manifest (upload interrupted between the two) is not a complete update
    exp.store.put_bytes(exp.layout.update(1, "site-d"), b"half")
    assert exp.list_updates(1) == ["site-a", "site-b"]
    assert exp.list_updates(2) == []


def test_aggregate_and_final(exp: ExperimentStore) -> None:
    aggregate = {"included": ["site-a"], "rejected": {"site-b": "stale round"}, "metrics": {"dice": 0.8}}
    exp.save_aggregate(0, aggregate)
    exp.save_aggregate(0, aggregate)
    with pytest.raises(ObjectExistsError):
        exp.save_aggregate(0, aggregate | {"metrics": {}})
    assert exp.load_aggregate(0) == aggregate
    key = exp.save_final("plots/dice.png", b"png")
    assert key == "experiments/brats-demo/final/plots/dice.png" and exp.store.get_bytes(key) == b"png"


# -- ExperimentStore: site URLs -------------------------------------------------------------------


def test_site_urls_name_only_that_sites_objects_and_work(s3_store: S3Store) -> None:
    """Each URL names exactly one key of this site and round, with the method and expiry we chose.

    That a URL is refused for another key, another method or after expiry is the object store's
    job (S3/MinIO check the signature; moto does not — see test_s3.py for the signature check).
    """
    exp = ExperimentStore(s3_store, "brats-demo")
    exp.save_config(CONFIG)
    exp.save_global(2, b"global r2", manifest(b"global r2", 2))
    urls_a = exp.issue_site_urls(2, "site-a", expires=600)
    urls_b = exp.issue_site_urls(2, "site-b", expires=600)
    assert set(urls_a) == {"global_get", "update_put", "manifest_put"}
    base = f"/{s3_store.bucket}/{s3_store.prefix}/"
    expected = {
        "global_get": exp.layout.global_model(2),
        "update_put": exp.layout.update(2, "site-a"),
        "manifest_put": exp.layout.update_manifest(2, "site-a"),
    }
    for name, url in urls_a.items():
        parts = urlsplit(url)
        assert parts.path == base + expected[name]
        assert "X-Amz-Expires=600" in parts.query.split("&")
        assert "site-b" not in url
    assert all("site-a" not in url for url in urls_b.values())

    response = requests.get(urls_a["global_get"], timeout=10)
    assert response.status_code == 200 and response.content == b"global r2"
    delta = b"site a delta"
    assert requests.put(urls_a["update_put"], data=delta, timeout=10).status_code == 200
    body = json.dumps(manifest(delta, 2, site="site-a", n_samples=5)).encode()
    assert requests.put(urls_a["manifest_put"], data=body, timeout=10).status_code == 200

    assert exp.list_updates(2) == ["site-a"]
    assert exp.load_update(2, "site-a") == (delta, manifest(delta, 2, site="site-a", n_samples=5))
    with pytest.raises(ObjectExistsError, match="already uploaded"):
        exp.issue_site_urls(2, "site-a")  # a new PUT URL would let it overwrite


def test_site_urls_preconditions(s3_store: S3Store, tmp_path: Path) -> None:
    exp = ExperimentStore(s3_store, "brats-demo")
    with pytest.raises(ObjectNotFoundError, match="rounds/0/global.json"):
        exp.issue_site_urls(0, "site-a")
    exp.save_global(0, b"g", manifest(b"g", 0))
    with pytest.raises(ValueError, match="expiry"):
        exp.issue_site_urls(0, "site-a", expires=8 * 24 * 3600)
    with pytest.raises(ValueError, match="invalid site id"):
        exp.issue_site_urls(0, "../site-b")
    local = ExperimentStore(LocalFolderStore(tmp_path), "brats-demo")
    local.save_global(0, b"g", manifest(b"g", 0))
    with pytest.raises(PresignNotSupportedError):
        local.issue_site_urls(0, "site-a")
