"""A secure-aggregation experiment on the real endpoint (``central`` fixture): its start, the sites'
random deltas and one site's part of the round, for the wire-level privacy tests."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_torch

from jipfed.central.client import CentralClient
from jipfed.federation.codec import encode_update
from jipfed.federation.dispatch import current_dispatch, dispatch_step
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.update import ModelUpdate
from jipfed.privacy import secagg, secagg_site
from jipfed.privacy.secure_dp import NoiseShare
from jipfed.privacy.settings import SecureAggregation
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig

SITES = ("site-a", "site-b", "site-c")
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)
WEIGHTS = {"site-a": 3, "site-b": 5, "site-c": 4}
#: Seconds a site that posted its key has to upload before it counts as dropped out. The drop-out
#: tests wait this long for the dead site; the live sites must mask and upload within it even on a
#: loaded machine (1 s flaked at load 13 on 2 cores), so it is a liveness limit, not a tight margin.
UPLOAD_TIMEOUT_S = 15.0
SETTINGS = SecureAggregation(upload_timeout_s=UPLOAD_TIMEOUT_S)


def start(
    store: LocalFolderStore,
    name: str = "sec1",
    secure: bool = True,
    client_dp: Mapping[str, Any] | None = None,
) -> ExperimentStore:
    """Start a one-round experiment of :data:`SITES` (quorum 2) and dispatch its step."""
    privacy: dict[str, Any] = {"secure_aggregation": {"upload_timeout_s": UPLOAD_TIMEOUT_S}} if secure else {}
    if client_dp is not None:
        privacy["client_dp"] = dict(client_dp)
    config = ExperimentConfig(
        name=name, sites=SITES, rounds=1, train=TRAIN, round_timeout_s=120.0, min_sites=2,
        norm_bound_factor=None, privacy=privacy,
    )  # fmt: skip
    exp_store = ExperimentStore(store, name)
    start_experiment(exp_store, config)
    dispatch_step(exp_store, 0)
    return exp_store


def site_updates(client: CentralClient, exp_store: ExperimentStore) -> tuple[dict, dict]:
    """(global weights of round 0, site -> encoded random delta with weight WEIGHTS[site])."""
    ticket = current_dispatch(exp_store).ticket
    payload, _ = client.get_model(ticket.experiment, ticket.round, ticket.step)
    start_weights = load_torch(payload)
    generator = torch.Generator().manual_seed(7)
    updates = {}
    for site in SITES:
        delta = {
            n: 0.01 * torch.randn(t.shape, generator=generator).to(t.dtype) for n, t in start_weights.items()
        }
        update = ModelUpdate.build(
            delta, experiment=ticket.experiment, round=0, site=site, kind="delta", n_samples=WEIGHTS[site],
            config_hash=ticket.config_hash, metrics={"train_loss": 0.5},
        )  # fmt: skip
        updates[site] = encode_update(update, "fp32")
    return start_weights, updates


def run_site(
    client: CentralClient,
    exp_store: ExperimentStore,
    site: str,
    encoded: Any,
    key_dir: Path,
    noise: NoiseShare | None = None,
) -> dict:
    """``site``'s secure upload of ``encoded`` (clipped and noised with ``noise``)."""
    ticket = current_dispatch(exp_store).ticket
    return secagg_site.secure_upload(
        client,
        experiment=ticket.experiment,
        round=0,
        step=0,
        site=site,
        config_hash=ticket.config_hash,
        update=secagg_site.site_update(encoded.payload, encoded.manifest.to_json(), 1000, noise),
        settings=SETTINGS,
        deadline=current_dispatch(exp_store).deadline,
        key_dir=key_dir,
        poll_interval_s=0.05,
    )


def new_key() -> str:
    """A fresh base64 X25519 public key (of a site that will not upload)."""
    return base64.b64encode(secagg.public_bytes(secagg.new_private_key())).decode()
