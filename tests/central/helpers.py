"""Builders shared by the central endpoint tests: small real experiments and a served endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jipfed.central.client import CentralClient
from jipfed.central.tokens import site_token
from jipfed.federation.codec import EncodedUpdate
from jipfed.federation.dispatch import WorkItem, dispatch_step
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.federation.site_round import run_site_step
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig
from jipfed.training.local import LocalTrainer

SITES = ("site-a", "site-b", "site-c")
TRAIN = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)


@dataclass
class Central:
    """A served central endpoint over ``store``."""

    url: str
    store: ModelStore
    secret: str

    def client(self, site: str, **kwargs) -> CentralClient:
        return CentralClient(self.url, site_token(self.secret, site), timeout_s=30, backoff_s=0.01, **kwargs)

    def headers(self, site: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {site_token(self.secret, site)}"}


def start(store: ModelStore, name: str = "exp1", **overrides) -> ExperimentStore:
    """Start an experiment (3 sites, parallel, quorum 2 unless overridden) and dispatch step 0."""
    values = {
        "name": name,
        "sites": SITES,
        "rounds": 1,
        "train": TRAIN,
        "round_timeout_s": 900.0,  # generous: a loaded CI machine must not make an upload late
        "min_sites": 2,
    }
    values.update(overrides)
    exp_store = ExperimentStore(store, name)
    start_experiment(exp_store, ExperimentConfig(**values))
    dispatch_step(exp_store, 0)
    return exp_store


def train(client: CentralClient, trainer: LocalTrainer, site: str, item: WorkItem) -> EncodedUpdate:
    """What a site does with a work item: download the model over HTTP and train its update."""
    ticket = item.ticket
    payload, manifest = client.get_model(ticket.experiment, ticket.round, ticket.step)
    return run_site_step(
        ticket, payload, manifest, trainer, site, ticket.experiment, ticket.config_hash, evaluate=False
    )


class OpenOnUnpickle:
    """A pickle that creates a file when unpickled: the endpoint must never unpickle it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))
