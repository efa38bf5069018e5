"""A two-site simulated experiment with privacy settings, for the end-to-end privacy tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from training.synth import write_site

from jipfed.federation.experiment import ExperimentConfig
from jipfed.simulation import SimulationResult, simulate
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData

SITES = ("site-a", "site-b")


def simulate_two_sites(tmp_path: Path, name: str, privacy: dict[str, Any]) -> tuple[SimulationResult, Path]:
    """Two rounds of a tiny U-Net on two synthetic sites; (result, the experiment's ``rounds`` folder)."""
    torch.set_num_threads(1)
    sites = {
        s: SiteData.from_dir(write_site(tmp_path / s, 4, seed=i, size=16, prefix=str(i)), group=s)
        for i, s in enumerate(SITES)
    }
    train = TrainConfig(size="tiny", steps=1, batch_size=2, lr=0.01, amp=False, augment=False)
    config = ExperimentConfig(name=name, sites=SITES, rounds=2, train=train, privacy=privacy)
    result = simulate(sites, config, tmp_path / "sim", progress=False, device="cpu")
    return result, tmp_path / "sim" / "store" / "experiments" / name / "rounds"


def record(rounds: Path, round_: int) -> dict[str, Any]:
    """The stored ``aggregate.json`` of ``round_``."""
    return json.loads((rounds / str(round_) / "aggregate.json").read_text())


def sgd_dp_optimizer(model: torch.nn.Module, **settings: Any) -> tuple[Any, Any]:
    """(opacus ``GradSampleModule`` of ``model``, :class:`SecureDPOptimizer` around SGD at lr 1 with a fixed
    noise key); ``settings``: noise_multiplier, max_grad_norm, expected_batch_size and optionally views."""
    from opacus import GradSampleModule

    from jipfed.privacy.dp_optimizer import SecureDPOptimizer
    from jipfed.privacy.secure_noise import ChaChaNormal

    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = SecureDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        loss_reduction="mean",
        noise=ChaChaNormal(settings.pop("key", bytes(32))),
        **settings,
    )
    return module, optimizer
