"""Small builders shared by the federation tests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from jipfed.federation.update import ModelUpdate

CONFIG_HASH = hashlib.sha256(b"test-config").hexdigest()
EXPERIMENT = "exp1"


def update(
    tensors: Mapping[str, torch.Tensor],
    *,
    site: str = "site-a",
    round: int = 1,
    kind: str = "delta",
    n_samples: int = 1,
    experiment: str = EXPERIMENT,
    metrics: Mapping[str, float] | None = None,
) -> ModelUpdate:
    """A ModelUpdate with the test experiment's identity (metrics default ``{"loss": 0.5}``)."""
    return ModelUpdate.build(
        dict(tensors),
        experiment=experiment,
        round=round,
        site=site,
        kind=kind,
        n_samples=n_samples,
        config_hash=CONFIG_HASH,
        metrics={"loss": 0.5} if metrics is None else metrics,
    )


def t(*values: float) -> torch.Tensor:
    """float32 1-D tensor."""
    return torch.tensor(values, dtype=torch.float32)
