"""Warm start: an experiment's round-0 model is another finished experiment's final model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from training.synth import write_site

from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import start_experiment
from jipfed.simulation import SimulationResult, simulate
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore, Status
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData

TRAIN = TrainConfig(size="tiny", steps=2, batch_size=2, lr=0.02, amp=False, augment=False)


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationResult]:
    """A finished one-site "pretraining" experiment ``pre`` in a store; returns (store folder, result)."""
    torch.set_num_threads(1)  # the only training here; the rest reads and compares tensors
    root = tmp_path_factory.mktemp("public")
    data = {
        "public": SiteData.from_dir(write_site(root / "data", 4, seed=7, size=16, prefix="p"), group="public")
    }
    config = ExperimentConfig(name="pre", sites=("public",), rounds=1, train=TRAIN)
    result = simulate(data, config, root / "run", progress=False, device="cpu", store_dir=root / "store")
    return root / "store", result


def config(name: str = "fine", **overrides: Any) -> ExperimentConfig:
    values: dict[str, Any] = {
        "name": name,
        "sites": ("site-a", "site-b"),
        "rounds": 1,
        "train": TRAIN,
        "initial_model": "pre",
    }
    values.update(overrides)
    return ExperimentConfig(**values)


def round0(exp_store: ExperimentStore) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(exp_store.load_global(0)[0])


def test_warm_start_equals_the_source_final_model(
    public: tuple[Path, SimulationResult], tmp_path: Path
) -> None:
    store_dir, result = public
    store = LocalFolderStore(store_dir)
    exp_store = ExperimentStore(store, "fine")
    state = start_experiment(exp_store, config())
    assert state.status is Status.RUNNING
    warm = round0(exp_store)
    assert set(warm) == set(result.weights)
    for name, tensor in result.weights.items():
        assert torch.equal(warm[name], tensor), name
    seeded = ExperimentStore(store, "seeded")
    start_experiment(seeded, config("seeded", initial_model=None))
    assert any(not torch.equal(round0(seeded)[n], t) for n, t in warm.items())  # the seed draws another
    again = start_experiment(exp_store, config())  # idempotent
    assert again.status is Status.RUNNING and round0(exp_store).keys() == warm.keys()
    assert exp_store.load_config()["initial_model"] == "pre"
    assert "initial_model" not in seeded.load_config()  # config hashes without it are unchanged


def refused(store_dir: Path, cfg: ExperimentConfig, match: str) -> None:
    exp_store = ExperimentStore(LocalFolderStore(store_dir), cfg.name)
    with pytest.raises(ValueError, match=match):
        start_experiment(exp_store, cfg)
    assert not exp_store.store.exists(exp_store.layout.config())  # nothing stored for a refused start
    assert not exp_store.has_global(0)


def test_missing_source_is_refused(public: tuple[Path, SimulationResult]) -> None:
    refused(
        public[0],
        config("orphan", initial_model="nope"),
        "'orphan': initial_model 'nope': no such experiment",
    )


def test_unfinished_source_is_refused(public: tuple[Path, SimulationResult]) -> None:
    store = LocalFolderStore(public[0])
    start_experiment(ExperimentStore(store, "running"), config("running", initial_model=None))
    refused(
        public[0],
        config("child", initial_model="running"),
        "'child': initial_model 'running' is running, not finished",
    )


def test_source_of_another_network_is_refused_naming_both(public: tuple[Path, SimulationResult]) -> None:
    micro = TrainConfig(size="micro", steps=2, batch_size=2, lr=0.02, amp=False, augment=False)
    refused(
        public[0],
        config("small", train=micro),
        r"'small': initial_model 'pre': its final model is not this experiment's model \(unet micro.*tensor\(s\) differ",
    )
    refused(public[0], config("gray", in_channels=1), r"'gray': initial_model 'pre'.*1 input channels")


def test_initial_model_is_validated() -> None:
    with pytest.raises(ValueError, match="initial_model cannot be the experiment itself"):
        config("pre")
    with pytest.raises(ValueError, match="initial_model"):
        config(initial_model="../x")
