"""Secure aggregation over the wire: the real endpoint on a loopback port, the product's client and store."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.numpy import load as load_numpy
from safetensors.torch import load as load_torch

from jipfed.central.client import CentralClient, CentralError, CentralRefused
from jipfed.central.credentials import issue_credential
from jipfed.federation.closing import aggregate_step
from jipfed.federation.dispatch import DELIVERED, FAILED, current_dispatch, site_status
from jipfed.federation.signing import generate_private_key
from jipfed.federation.tickets import QuorumNotMet, UpdateRefused
from jipfed.privacy import secagg, secagg_site, secagg_wire
from jipfed.privacy.settings import SecureAggregation
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from privacy.wire import SETTINGS, SITES, new_key, run_site, site_updates, start


def test_round_completes_without_a_site_that_dropped_after_key_agreement(central, tmp_path: Path) -> None:
    _, store, client = central
    exp_store = start(store)
    start_weights, updates = site_updates(client("site-a"), exp_store)
    # site-c takes the work and posts its key, then dies (never uploads)
    dead = client("site-c")
    assert [item.ticket.experiment for item in dead.pending_work()] == ["sec1"]
    dead_key = base64.b64encode(secagg.public_bytes(secagg.new_private_key())).decode()
    dead.post_secagg_key("sec1", 0, 0, 0, dead_key)
    assert dead.pending_work() == []  # it answered: no work item again
    with ThreadPoolExecutor(2) as pool:
        futures = {
            s: pool.submit(run_site, client(s), exp_store, s, updates[s], tmp_path / s)
            for s in ("site-a", "site-b")
        }
        done = {s: f.result(timeout=60) for s, f in futures.items()}
    assert all(
        d["complete"] and d["attempt"] == 1 and d["sites"] == ["site-a", "site-b"] for d in done.values()
    )
    dispatch = current_dispatch(exp_store)
    assert site_status(exp_store, dispatch, "site-a")[0] == DELIVERED
    state, reason = site_status(exp_store, dispatch, "site-c")
    assert state == FAILED and "posted its key but sent no masked update" in reason

    record = aggregate_step(exp_store, 0)
    assert record.included == ("site-a", "site-b")
    assert client("site-b").secagg_status("sec1", 0, 0)["complete"]  # still readable after the step closed
    stored = store.get_json(exp_store.layout.aggregate(0))
    retry = stored["secure_aggregation"]["retries"][0]
    assert retry["attempt"] == 0 and list(retry["dropped"]) == ["site-c"]
    assert stored["missing"] == ["site-c"] and "dropped out" in stored["missing_reasons"]["site-c"]
    assert stored["secure_aggregation"]["total_weight"] == pytest.approx(8.0)

    new_global = load_torch(store.get_bytes(exp_store.layout.global_model(1)))
    deltas = {s: load_torch(updates[s].payload) for s in ("site-a", "site-b")}
    for name, tensor in start_weights.items():
        plain = (3 * deltas["site-a"][name].double() + 5 * deltas["site-b"][name].double()) / 8
        expected = (tensor.double() + plain).to(tensor.dtype)
        assert torch.allclose(new_global[name], expected, atol=1e-6), name
    # the central never stored an unmasked site update: no update objects, only uint64 masked vectors
    keys = store.list(exp_store.layout.round_prefix(0))
    assert not [k for k in keys if "/updates/" in k]
    masked = [k for k in keys if k.endswith(".safetensors") and "/masked/" in k]
    assert len(masked) == 4  # a and b in attempts 0 and 1
    flat_a = secagg.encode_fixed(
        np.append(secagg.flatten(deltas["site-a"]) * 3, 3), SecureAggregation()
    )  # what site-a's plain fixed-point vector would be
    for key in masked:
        vector = load_numpy(store.get_bytes(key))[secagg_wire.MASKED_TENSOR]
        assert vector.dtype == np.uint64 and not np.array_equal(vector, flat_a)


def test_keys_are_write_once_and_wrong_uploads_refused(central, tmp_path: Path) -> None:
    url, store, client = central
    exp_store = start(store)
    _, updates = site_updates(client("site-a"), exp_store)
    a = client("site-a")
    key = base64.b64encode(secagg.public_bytes(secagg.new_private_key())).decode()
    a.post_secagg_key("sec1", 0, 0, 0, key)
    a.post_secagg_key("sec1", 0, 0, 0, key)  # the same key again: a retried task
    other = base64.b64encode(secagg.public_bytes(secagg.new_private_key())).decode()
    with pytest.raises(CentralRefused) as refused:
        a.post_secagg_key("sec1", 0, 0, 0, other)
    assert refused.value.code == "key_exists"
    with pytest.raises(CentralRefused) as refused:
        a.post_secagg_key("sec1", 0, 0, 1, other)
    assert refused.value.code == "wrong_attempt"
    with pytest.raises(CentralError) as bad:
        a.post_secagg_key("sec1", 0, 0, 0, "bm90IGEga2V5")
    assert bad.value.status_code == 400 and "32 bytes" in bad.value.detail
    status = a.secagg_status("sec1", 0, 0)
    assert status["keys_posted"] == ["site-a"] and status["public_keys"] is None  # not before all posted
    # no masked upload before every key is in; never a plain update in a secure experiment
    with pytest.raises(CentralRefused) as refused:
        a.put_masked_update("sec1", 0, 0, 0, b"x", "{}")
    assert refused.value.code == "keys_missing"
    with pytest.raises(CentralRefused) as refused:
        a.put_update("sec1", 0, updates["site-a"].payload, updates["site-a"].manifest.to_json(), step=0)
    assert refused.value.code == "masked_only"
    for site in ("site-b", "site-c"):
        client(site).post_secagg_key(
            "sec1", 0, 0, 0, base64.b64encode(secagg.public_bytes(secagg.new_private_key())).decode()
        )
    status = a.secagg_status("sec1", 0, 0)
    update = secagg_site.site_update(updates["site-a"].payload, updates["site-a"].manifest.to_json(), 1000)
    own = secagg.X25519PrivateKey.generate()
    config_hash = current_dispatch(exp_store).ticket.config_hash
    payload, manifest = secagg_site.masked_upload(
        update, status, "site-a", 0, config_hash, own, SecureAggregation()
    )
    tampered = json.loads(manifest) | {"sha256": "0" * 64}
    with pytest.raises(CentralRefused) as refused:
        a.put_masked_update("sec1", 0, 0, 0, payload, json.dumps(tampered))
    assert refused.value.code == "rejected" and "sha256" in refused.value.detail
    short = json.loads(manifest) | {"length": 3}
    with pytest.raises(CentralRefused) as refused:
        a.put_masked_update("sec1", 0, 0, 0, payload, json.dumps(short))
    assert refused.value.code == "rejected" and "length" in refused.value.detail
    assert a.put_masked_update("sec1", 0, 0, 0, payload, manifest)["site"] == "site-a"
    with pytest.raises(CentralRefused) as refused:
        a.put_masked_update("sec1", 0, 0, 0, payload, manifest)
    assert refused.value.code == "duplicate"


def test_secagg_routes_refuse_a_plain_experiment(central) -> None:
    _, store, client = central
    start(store, "plain1", secure=False)
    with pytest.raises(CentralRefused) as refused:
        client("site-a").secagg_status("plain1", 0, 0)
    assert refused.value.code == "not_secure"


def test_a_site_with_a_registered_key_must_sign_its_masked_update(central) -> None:
    url, store, client = central
    exp_store = start(store)
    _, updates = site_updates(client("site-a"), exp_store)
    key_a, key_b = generate_private_key(), generate_private_key()
    raw = key_a.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    token, _ = issue_credential(store, store.secret, "site-a", public_key=raw)
    unsigned = CentralClient(url, token, timeout_s=30)
    for site_client in (unsigned, client("site-b"), client("site-c")):
        site_client.post_secagg_key("sec1", 0, 0, 0, new_key())
    status = unsigned.secagg_status("sec1", 0, 0)
    update = secagg_site.site_update(updates["site-a"].payload, updates["site-a"].manifest.to_json(), 1000)
    config_hash = current_dispatch(exp_store).ticket.config_hash
    body = secagg_site.masked_upload(
        update, status, "site-a", 0, config_hash, secagg.new_private_key(), SETTINGS
    )
    codes = {}
    for name, signing_key in (("unsigned", None), ("other key", key_b)):
        with pytest.raises(CentralRefused) as refused:
            CentralClient(url, token, signing_key=signing_key).put_masked_update("sec1", 0, 0, 0, *body)
        codes[name] = refused.value.code
    assert codes == {"unsigned": "unsigned", "other key": "bad_signature"}
    signed = CentralClient(url, token, signing_key=key_a)
    assert signed.put_masked_update("sec1", 0, 0, 0, *body)["sha256"] == json.loads(body[1])["sha256"]


class _PayloadGate(LocalFolderStore):
    """A store whose first masked-vector write waits until :attr:`release` is set: two uploads of
    one site then race the way two site runs answering the same step can."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.waiting = threading.Event()

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        if "/masked/" in key and key.endswith(".safetensors") and not self.waiting.is_set():
            self.waiting.set()
            assert self.release.wait(30)
        super().put_bytes(key, data, overwrite=overwrite)


def test_two_racing_masked_uploads_of_a_site_keep_one_consistent_update(central) -> None:
    """Upload A passes every check and stalls before it stores its vector; upload B of the same
    site is stored in full meanwhile; then A goes on and is refused as a duplicate. What the
    central aggregates is B's vector under B's manifest (before the fix A's late write replaced
    B's vector, and the step failed for good: "stored masked update of 'site-a' changed")."""
    _, store, client = central
    exp_store = start(store)
    _, updates = site_updates(client("site-a"), exp_store)
    for site in SITES:
        client(site).post_secagg_key("sec1", 0, 0, 0, new_key())
    status = client("site-a").secagg_status("sec1", 0, 0)
    config_hash = current_dispatch(exp_store).ticket.config_hash
    update = secagg_site.site_update(updates["site-a"].payload, updates["site-a"].manifest.to_json(), 1000)
    a, b = (
        secagg_site.masked_upload(
            update, status, "site-a", 0, config_hash, secagg.new_private_key(), SETTINGS
        )
        for _ in range(2)
    )
    assert a[0] != b[0]  # other masks: other bytes
    gated = ExperimentStore(_PayloadGate(store.root), "sec1")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(secagg_wire.commit_masked, gated, "site-a", 0, 0, 0, a[1], a[0])
        assert gated.store.waiting.wait(30)
        secagg_wire.commit_masked(exp_store, "site-a", 0, 0, 0, b[1], b[0])
        gated.store.release.set()
        with pytest.raises(UpdateRefused) as refused:
            first.result(timeout=30)
    assert refused.value.code == "duplicate"
    prefix = secagg_wire.attempt_prefix(exp_store, 0, 0, 0)
    stored = store.get_json(secagg_wire.masked_manifest_key(prefix, "site-a"))
    assert stored["sha256"] == json.loads(b[1])["sha256"]
    # the refused upload left nothing behind: one vector of site-a, the one its manifest names
    keys = [k for k in store.list(prefix) if "/masked/site-a." in k and k.endswith(".safetensors")]
    assert keys == [secagg_wire.masked_key(prefix, "site-a", stored["sha256"])]
    assert store.get_bytes(keys[0]) == b[0]


def _after_first_key(exp_store: ExperimentStore, seconds: float) -> datetime:
    """``seconds`` after the first key of the current attempt arrived (the central's clock)."""
    view = secagg_wire.current_attempt(exp_store, current_dispatch(exp_store))
    return min(datetime.fromisoformat(k["at"]) for k in view.keys.values()) + timedelta(seconds=seconds)


def _wait_for_keys(exp_store: ExperimentStore, sites: set[str], timeout_s: float = 60.0) -> None:
    """Until ``sites`` posted their keys of attempt 0 (a liveness bound, not a timing check)."""
    end = time.monotonic() + timeout_s
    while set(secagg_wire.current_attempt(exp_store, current_dispatch(exp_store)).keys) < sites:
        assert time.monotonic() < end, f"the keys of {sorted(sites)} did not arrive"
        time.sleep(0.05)


def test_a_site_without_a_key_at_the_key_deadline_is_dropped_and_the_round_completes(
    central, tmp_path: Path
) -> None:
    _, store, client = central
    exp_store = start(store)
    _, updates = site_updates(client("site-a"), exp_store)
    settings = secagg_wire.secure_settings(exp_store)
    dispatch = current_dispatch(exp_store)
    # site-c never posts a key (its task died before the upload): a and b wait for it
    with ThreadPoolExecutor(2) as pool:
        futures = {
            s: pool.submit(run_site, client(s), exp_store, s, updates[s], tmp_path / s)
            for s in ("site-a", "site-b")
        }
        _wait_for_keys(exp_store, {"site-a", "site-b"})
        before = secagg_wire.advance(
            exp_store, dispatch, settings, now=_after_first_key(exp_store, settings.key_timeout_s - 1)
        )
        assert (before.attempt, before.failed) == (0, None)  # still within the key deadline
        # the central's clock past the deadline: the next status request of any caller would do this
        secagg_wire.advance(
            exp_store, dispatch, settings, now=_after_first_key(exp_store, settings.key_timeout_s + 1)
        )
        done = {s: f.result(timeout=60) for s, f in futures.items()}
    assert all(
        d["complete"] and d["attempt"] == 1 and d["sites"] == ["site-a", "site-b"] for d in done.values()
    )
    state, reason = site_status(exp_store, dispatch, "site-c")
    assert state == FAILED and "posted no key within 900 s" in reason
    record = aggregate_step(exp_store, 0)
    assert record.included == ("site-a", "site-b")
    stored = store.get_json(exp_store.layout.aggregate(0))
    assert stored["missing"] == ["site-c"] and "before key agreement" in stored["missing_reasons"]["site-c"]
    [retry] = stored["secure_aggregation"]["retries"]
    assert retry["attempt"] == 0 and list(retry["dropped"]) == ["site-c"]
    assert stored["secure_aggregation"]["total_weight"] == pytest.approx(8.0)


def test_fewer_keys_than_the_quorum_at_the_key_deadline_fail_the_step_with_the_reason(central) -> None:
    _, store, client = central
    exp_store = start(store)  # quorum 2 of 3
    settings = secagg_wire.secure_settings(exp_store)
    dispatch = current_dispatch(exp_store)
    client("site-a").post_secagg_key("sec1", 0, 0, 0, new_key())
    view = secagg_wire.advance(
        exp_store, dispatch, settings, now=_after_first_key(exp_store, settings.key_timeout_s + 1)
    )
    assert view.attempt == 0 and sorted(view.failed["dropped"]) == ["site-b", "site-c"]
    status = client("site-a").secagg_status("sec1", 0, 0)
    assert status["attempt"] == 0 and "site-b posted no key" in status["failed"]["reason"]  # no attempt 1
    for site in SITES:
        assert site_status(exp_store, dispatch, site)[0] == FAILED
    with pytest.raises(CentralRefused) as refused:  # a late key is refused
        client("site-b").post_secagg_key("sec1", 0, 0, 0, new_key())
    assert refused.value.code == "wrong_attempt"
    with pytest.raises(QuorumNotMet) as failed:
        aggregate_step(exp_store, 0)
    assert failed.value.included == () and sorted(failed.value.missing_reasons) == ["site-b", "site-c"]
    assert "posted no key within 900 s" in failed.value.missing_reasons["site-c"]
    assert not exp_store.has_global(1)


def test_a_status_request_waits_for_the_stage_to_change(central) -> None:
    _, store, client = central
    start(store)
    a, b = client("site-a"), client("site-b")
    a.post_secagg_key("sec1", 0, 0, 0, new_key())
    first = a.secagg_status("sec1", 0, 0)
    assert first["stage"] == "d0/a0/open"
    # nothing changes: the long poll answers after wait_s with the same stage
    assert a.secagg_status("sec1", 0, 0, since=first["stage"], wait_s=0.2)["stage"] == "d0/a0/open"
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(a.secagg_status, "sec1", 0, 0, since=first["stage"], wait_s=20.0)
        b.post_secagg_key("sec1", 0, 0, 0, new_key())
        client("site-c").post_secagg_key("sec1", 0, 0, 0, new_key())
        changed = waiting.result(timeout=30)
    assert changed["stage"] == "d0/a0/keys" and changed["public_keys"] is not None
