from __future__ import annotations

import dataclasses
import json

import pytest

from jipfed.training.config import TrainConfig


def test_json_round_trip_keeps_every_field() -> None:
    cfg = TrainConfig(
        task="classification",
        model="resnet",
        size="tiny",
        steps=7,
        batch_size=3,
        lr=0.05,
        optimizer="sgd",
        weight_decay=1e-4,
        amp=False,
        seed=11,
        val_fraction=0.3,
        fedprox_mu=0.1,
        bn_policy="local",
        num_workers=0,
        augment=False,
    )
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.epochs is None and back.steps == 7
    assert json.loads(cfg.to_json())["bn_policy"] == "local"


def test_defaults_to_one_epoch_and_is_frozen() -> None:
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.steps) == (1, None)
    assert TrainConfig(steps=5).epochs is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "detection"}, "task"),
        ({"model": "densenet"}, "does not fit task"),
        ({"task": "classification", "model": "unet"}, "does not fit task"),
        ({"size": "huge"}, "size"),
        ({"epochs": 2, "steps": 3}, "not both"),
        ({"epochs": 0}, "epochs"),
        ({"steps": 1.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"amp": "yes"}, "amp"),
        ({"seed": -1}, "seed"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"fedprox_mu": -0.1}, "fedprox_mu"),
        ({"bn_policy": "fedbn"}, "bn_policy"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_invalid_values_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="object"):
        TrainConfig.from_json("[1, 2]")
