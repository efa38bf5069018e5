"""Typed, validated configuration of one site's local training (shared by all sites of an experiment).

:class:`TrainConfig` is frozen and JSON round-trippable, so the central can put it in the
experiment's ``config.json`` and every site rebuilds exactly the same model and loop from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

TASKS = ("segmentation", "classification")
MODELS_BY_TASK = {
    "segmentation": ("unet", "segresnet"),
    "classification": ("densenet", "resnet"),
}
SIZES = ("micro", "tiny", "small", "medium")
OPTIMIZERS = ("adam", "adamw", "sgd")
BN_POLICIES = ("aggregate", "local")


@dataclass(frozen=True)
class TrainConfig:
    """How a site trains locally.

    Attributes:
        task: ``"segmentation"`` (3 sigmoid region channels WT/TC/ET) or ``"classification"``
            (grade, HGG = 1, 2 softmax logits).
        model: ``"unet"`` / ``"segresnet"`` for segmentation, ``"densenet"`` / ``"resnet"`` for
            classification.
        size: channel preset, ``"micro"`` (a few thousand weights: sample-level DP, see
            docs/privacy.md), ``"tiny"`` (tests), ``"small"`` (simulation), ``"medium"``.
        epochs: passes over the site's training split per round; at most one of ``epochs`` and
            ``steps`` may be given, and when neither is, ``epochs`` becomes 1.
        steps: optimiser steps per round (the loader cycles, reshuffled each pass).
        batch_size: cases per step.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9); its state is fresh each round.
        weight_decay: L2 / decoupled weight decay, >= 0.
        amp: mixed precision (float16 autocast + grad scaling); only used when running on CUDA.
        seed: seeds model initialisation, shuffling, augmentation and the train/val split.
        val_fraction: share of each site's cases held out for :meth:`LocalTrainer.evaluate`, in [0, 1).
        fedprox_mu: default proximal weight (0 = plain local SGD); the round may override it.
        bn_policy: ``"aggregate"`` (BatchNorm running stats travel and are averaged) or ``"local"``
            (SiloBN: running stats stay at the site and are excluded from updates).
        num_workers: DataLoader worker processes (0 = load in the training process).
        augment: random flips along each spatial axis during training.
    """

    task: str = "segmentation"
    model: str = "unet"
    size: str = "small"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 2
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    amp: bool = True
    seed: int = 0
    val_fraction: float = 0.2
    fedprox_mu: float = 0.0
    bn_policy: str = "aggregate"
    num_workers: int = 0
    augment: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.model not in MODELS_BY_TASK[self.task]:
            raise ValueError(
                f"model {self.model!r} does not fit task {self.task!r}; choose from {MODELS_BY_TASK[self.task]}"
            )
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.epochs is not None and self.steps is not None:
            raise ValueError(f"set epochs or steps, not both: epochs={self.epochs} steps={self.steps}")
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 1)
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not _is_finite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not _is_finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.amp, bool) or not isinstance(self.augment, bool):
            raise ValueError(f"amp and augment must be booleans, got {self.amp!r}, {self.augment!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not _is_finite(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not _is_finite(self.fedprox_mu) or self.fedprox_mu < 0:
            raise ValueError(f"fedprox_mu must be a finite number >= 0, got {self.fedprox_mu!r}")
        if self.bn_policy not in BN_POLICIES:
            raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {self.bn_policy!r}")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error (typos must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), stable enough to hash into manifests."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"TrainConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
