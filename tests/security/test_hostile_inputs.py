"""The hostile-input suite: what one compromised or broken site can send, against the real endpoint.

Every case asserts the refusal (or bound), the reason recorded for it (the answer's detail and
the audit log, or ``aggregate.json``), and that the global model is unharmed: after the attack the
honest sites' updates are aggregated and the next global model is exactly their FedAvg. Outcomes
are tallied (``conftest.py``) and printed at the end of the run.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
import torch
from central.helpers import SITES, OpenOnUnpickle, start

from jipfed.central.audit import read_events
from jipfed.central.client import CentralClient, CentralError, CentralRefused
from jipfed.central.credentials import issue_credential, revoke_credential
from jipfed.central.model_signing import central_public_key
from jipfed.federation.codec import encode_update
from jipfed.federation.dispatch import dispatch_step
from jipfed.federation.rounds import aggregate_step
from jipfed.federation.signing import generate_private_key, public_key_raw
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore

Tally = Callable[[str, str, str], None]


@dataclass
class Federation:
    """A served central with one running experiment; every site registered with a signing key."""

    url: str
    store: LocalFolderStore
    exp_store: ExperimentStore
    secret: str
    keys: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)

    def client(self, site: str, **kwargs) -> CentralClient:
        options = {"signing_key": self.keys[site], "central_public_key": central_public_key(self.secret)}
        return CentralClient(self.url, self.tokens[site], timeout_s=30, **{**options, **kwargs})

    def start_weights(self, round_: int = 0) -> dict[str, torch.Tensor]:
        return safetensors.torch.load(self.exp_store.load_global(round_)[0])

    def delta(self, site: str, *, round_: int = 0, scale: float = 1.0, n_samples: int = 4) -> ModelUpdate:
        generator = torch.Generator().manual_seed(SITES.index(site) + 100 * round_)
        tensors = {
            name: (torch.randn(t.shape, generator=generator) * 1e-3 * scale).to(t.dtype)
            if t.is_floating_point()
            else torch.zeros_like(t)
            for name, t in self.start_weights(round_).items()
        }
        return ModelUpdate.build(
            tensors,
            experiment="exp1",
            round=round_,
            site=site,
            kind="delta",
            n_samples=n_samples,
            config_hash=self.exp_store.config_hash(),
        )

    def send(self, site: str, payload: bytes, manifest_json: str, *, step: int = 0, round_: int = 0, **kw):
        return self.client(site, **kw).put_update(
            "exp1", round_, payload, manifest_json, step=step, check=False
        )

    def refused(self, site: str, payload: bytes, manifest_json: str, **kw) -> CentralRefused:
        with pytest.raises(CentralRefused) as refusal:
            self.send(site, payload, manifest_json, **kw)
        assert not self.exp_store.update_committed(0, site)
        assert not self.store.exists(self.exp_store.layout.update(0, site))  # nothing half-written left
        return refusal.value

    def audited(self, site: str, action: str = "update") -> list[str]:
        return [e["outcome"] for e in read_events(self.store) if e["site"] == site and e["action"] == action]

    def unharmed(self, honest: tuple[str, ...] = ("site-b", "site-c")) -> dict:
        """Upload the honest updates, aggregate round 0: the new global is exactly their FedAvg."""
        start_weights = self.start_weights(0)
        updates = {site: self.delta(site) for site in honest}
        for site, update in updates.items():
            encoded = encode_update(update)
            self.client(site).put_update("exp1", 0, encoded.payload, encoded.manifest.to_json(), step=0)
        aggregate_step(self.exp_store, 0)
        record = self.exp_store.load_aggregate(0)
        assert record["included"] == list(honest)
        new = safetensors.torch.load(self.exp_store.load_global(1)[0])
        total = sum(u.n_samples for u in updates.values())
        for name, tensor in start_weights.items():
            if tensor.is_floating_point():
                expected = tensor + sum(u.tensors[name] * u.n_samples for u in updates.values()) / total
                assert torch.allclose(new[name], expected, atol=1e-6), name
        return record


@pytest.fixture
def fed(local_store: LocalFolderStore, serve, secret: str) -> Iterator[Federation]:
    central = serve(local_store)
    exp_store = start(local_store, rounds=2)
    federation = Federation(central.url, local_store, exp_store, secret)
    for site in SITES:
        federation.keys[site] = generate_private_key()
        federation.tokens[site], _ = issue_credential(
            local_store, secret, site, public_key=public_key_raw(federation.keys[site])
        )
    yield federation


def _rehashed(manifest: UpdateManifest, payload: bytes) -> str:
    return manifest.replace(sha256=hashlib.sha256(payload).hexdigest()).to_json()


def test_malformed_payloads_are_rejected_and_the_global_model_is_unharmed(
    fed: Federation, tally: Tally, tmp_path: Path
) -> None:
    good = encode_update(fed.delta("site-a"))
    tensors = safetensors.torch.load(good.payload)
    first_float = next(n for n, t in tensors.items() if t.is_floating_point() and t.numel() > 1)

    def variant(change: Callable[[torch.Tensor], torch.Tensor]) -> bytes:
        return safetensors.torch.save({**tensors, first_float: change(tensors[first_float])})

    marker = tmp_path / "unpickled"
    cases = {
        "truncated safetensors": (good.payload[: len(good.payload) // 2], "safetensors"),
        "malformed safetensors": (b"\x00" * 8 + b"not a header" * 10, "safetensors"),
        "pickle payload": (pickle.dumps(OpenOnUnpickle(marker)), "safetensors"),
        "NaN values": (variant(lambda t: t.clone().fill_(float("nan"))), "NaN"),
        "Inf values": (variant(lambda t: t.clone().fill_(float("inf"))), "Inf"),
        "wrong shape": (variant(lambda t: t.reshape(-1)[:-1].clone()), "shape"),
        "wrong dtype": (variant(lambda t: t.double()), "dtype"),
    }
    for case, (payload, reason) in cases.items():
        refusal = fed.refused("site-a", payload, _rehashed(good.manifest, payload))
        assert refusal.code == "rejected" and reason.lower() in refusal.detail.lower(), (case, refusal.detail)
        tally(case, "rejected", refusal.detail)
    assert not marker.exists()
    assert fed.audited("site-a") == ["rejected"] * len(cases)
    fed.unharmed()


def test_an_oversized_body_is_cut_off(fed: Federation, tally: Tally) -> None:
    limit_probe = b"\0" * (64 * 1024**2)
    with pytest.raises(CentralError) as large:
        fed.send("site-a", limit_probe, "{}")
    assert (large.value.status_code, large.value.code) == (413, "too_large")
    assert "limit" in large.value.detail and fed.audited("site-a") == ["too_large"]
    tally("oversized body (memory: tests/central/test_uploads.py)", "rejected", large.value.detail)
    fed.unharmed()


def test_sample_counts_beyond_the_cohort_or_the_cap_are_rejected_even_when_stored_directly(
    fed: Federation, tally: Tally
) -> None:
    huge = encode_update(fed.delta("site-a", n_samples=10**308))
    refusal = fed.refused("site-a", huge.payload, huge.manifest.to_json())
    assert refusal.code == "rejected" and "309-digit number exceeds" in refusal.detail
    tally("huge n_samples (309 digits)", "rejected", refusal.detail)
    fed.client("site-a").report_cohort("exp1", 0, 0, 12)
    above = encode_update(fed.delta("site-a", n_samples=13))
    refusal = fed.refused("site-a", above.payload, above.manifest.to_json())
    assert "exceeds the cohort of 12 case(s)" in refusal.detail
    tally("n_samples above the reported cohort", "rejected", refusal.detail)
    # Written straight into the store (bypassing the endpoint): the step still closes.
    fed.exp_store.save_update(0, "site-a", huge.payload, huge.manifest.to_dict())
    record = fed.unharmed()
    assert "309-digit number exceeds" in record["rejected"]["site-a"]
    tally("huge n_samples written to the store directly", "rejected", record["rejected"]["site-a"])


def test_a_scaled_update_is_clipped_to_the_rounds_median_norm(fed: Federation, tally: Tally) -> None:
    updates = {"site-a": fed.delta("site-a", scale=1000.0), "site-b": fed.delta("site-b")}
    updates["site-c"] = fed.delta("site-c")
    for site, update in updates.items():
        encoded = encode_update(update)
        fed.client(site).put_update("exp1", 0, encoded.payload, encoded.manifest.to_json(), step=0)
    aggregate_step(fed.exp_store, 0)
    record = fed.exp_store.load_aggregate(0)
    assert record["included"] == list(SITES) and list(record["bounded"]) == ["site-a"]
    bounded = record["bounded"]["site-a"]
    assert bounded["norm"] > 100 * bounded["bound"] and "clipped" in bounded["reason"]
    start_weights = fed.start_weights(0)
    new = safetensors.torch.load(fed.exp_store.load_global(1)[0])
    moved = sum(
        float(torch.sum((new[n].double() - t.double()) ** 2))
        for n, t in start_weights.items()
        if t.is_floating_point()
    )
    assert moved**0.5 <= bounded["bound"] * 1.0001  # a weighted mean of updates no larger than the bound
    tally("scaled (poisoned) update x1000", "bounded", bounded["reason"])


def test_a_replayed_update_from_an_earlier_round_is_refused(fed: Federation, tally: Tally) -> None:
    fed.unharmed(("site-a", "site-b"))  # round 0 closes with site-a's update
    dispatch_step(fed.exp_store, 1)
    payload, manifest = fed.exp_store.load_update(0, "site-a")
    text = UpdateManifest.from_dict(manifest).to_json()
    with pytest.raises(CentralRefused) as late:
        fed.send("site-a", payload, text, round_=0, step=0)
    assert late.value.code == "late"
    with pytest.raises(CentralRefused) as replay:
        fed.send("site-a", payload, text, round_=1, step=1)
    assert replay.value.code == "rejected" and "round" in replay.value.detail
    assert not fed.exp_store.update_committed(1, "site-a")
    tally("replayed update from an earlier round (same round URL)", "rejected", late.value.detail)
    tally("replayed update from an earlier round (next round URL)", "rejected", replay.value.detail)


def test_unsigned_foreign_signed_and_retargeted_updates_are_refused(fed: Federation, tally: Tally) -> None:
    encoded = encode_update(fed.delta("site-a"))
    body = (encoded.payload, encoded.manifest.to_json())
    cases = {
        "unsigned update": ({"signing_key": None}, 0, "unsigned"),
        "update signed by another site": ({"signing_key": fed.keys["site-b"]}, 0, "bad_signature"),
        "update signed for another step": ({}, 1, "bad_signature"),
    }
    for case, (options, step, code) in cases.items():
        refusal = fed.refused("site-a", *body, step=step, **options)
        assert refusal.code == code, case
        tally(case, "rejected", refusal.detail)
    assert fed.audited("site-a") == [code for _, _, code in cases.values()]
    fed.unharmed()


def test_a_site_cannot_read_or_write_another_sites_objects(fed: Federation, tally: Tally) -> None:
    b_update = encode_update(fed.delta("site-b"))
    refusal = fed.refused("site-a", b_update.payload, b_update.manifest.to_json())
    assert refusal.code == "rejected" and "site-b" in refusal.detail
    assert not fed.exp_store.update_committed(0, "site-b")
    tally("site A writes site B's update", "rejected", refusal.detail)
    other = start(fed.store, "exp2", sites=("site-b", "site-c"))
    with pytest.raises(CentralError) as read:
        fed.client("site-a").get_model("exp2", 0, 0)
    assert (read.value.status_code, read.value.code) == (403, "not_selected")
    assert fed.client("site-a").pending_work()[0].ticket.experiment == "exp1"
    tally("site A reads site B's model", "rejected", read.value.detail)
    assert other.list_updates(0) == []
    fed.unharmed()


def test_expired_and_revoked_credentials_are_refused(fed: Federation, tally: Tally) -> None:
    expired, _ = issue_credential(fed.store, fed.secret, "site-a", days=1, now=time.time() - 2 * 86400)
    encoded = encode_update(fed.delta("site-a"))
    for case, token, code in (
        ("expired credential", expired, "expired_token"),
        ("revoked credential", fed.tokens["site-b"], "revoked_token"),
    ):
        if code == "revoked_token":
            revoke_credential(fed.store, "site-b")
        with pytest.raises(CentralError) as refused:
            CentralClient(fed.url, token).put_update(
                "exp1", 0, encoded.payload, encoded.manifest.to_json(), check=False
            )
        assert (refused.value.status_code, refused.value.code) == (403, code)
        tally(case, "rejected", refused.value.detail)
    assert fed.exp_store.list_updates(0) == []
    fed.tokens["site-b"], _ = issue_credential(fed.store, fed.secret, "site-b")  # a new token, same key
    fed.unharmed()


def test_plain_http_to_a_remote_central_is_refused_before_sending(tally: Tally) -> None:
    with pytest.raises(ValueError, match="token would travel in clear") as refused:
        CentralClient("http://central.example.org/jipfed", "jipfed.site-a." + "0" * 64)
    tally("http to a non-loopback central", "rejected", str(refused.value))


def test_a_crash_between_the_two_writes_is_repaired_by_the_retry(fed: Federation, tally: Tally) -> None:
    encoded = encode_update(fed.delta("site-a"))
    fed.store.put_bytes(
        fed.exp_store.layout.update(0, "site-a"), encoded.payload[:100]
    )  # payload, no manifest
    assert fed.exp_store.list_updates(0) == []  # a half-written update does not count
    accepted = fed.client("site-a").put_update("exp1", 0, encoded.payload, encoded.manifest.to_json(), step=0)
    assert accepted["sha256"] == encoded.manifest.sha256
    assert fed.exp_store.load_update(0, "site-a")[0] == encoded.payload
    tally(
        "crash between payload and manifest writes", "repaired", "the retry replaced the uncommitted payload"
    )
