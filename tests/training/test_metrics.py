from __future__ import annotations

import math

import pytest
import torch

from jipfed.training.metrics import RegionDice, classification_metrics


def _logits(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), 5.0, -5.0)


def test_region_dice_values_and_empty_region_convention() -> None:
    y = torch.zeros(2, 3, 4, 4, 4)
    y[:, 0, :2] = 1  # WT: 32 voxels in both cases
    y[0, 1, :1] = 1  # TC in case 0 only; case 1 has empty TC
    # ET empty in both cases
    pred = torch.zeros_like(y)
    pred[:, 0, :1] = 1  # half of WT -> dice 2*16/(32+16) = 2/3
    pred[0, 1, :1] = 1  # perfect TC in case 0; empty pred on empty TC in case 1 -> 1
    pred[1, 2, 0, 0, 0] = 1  # false positive ET on empty truth in case 1 -> 0; case 0 empty/empty -> 1
    dice = RegionDice()
    dice.update(_logits(pred[:1]), y[:1])
    dice.update(_logits(pred[1:]), y[1:])
    out = dice.result()
    assert out["dice_wt"] == pytest.approx(2 / 3)
    assert out["dice_tc"] == pytest.approx(1.0)
    assert out["dice_et"] == pytest.approx(0.5)
    assert out["dice_mean"] == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)


def test_region_dice_rejects_bad_input() -> None:
    dice = RegionDice()
    with pytest.raises(ValueError, match="before any update"):
        dice.result()
    with pytest.raises(ValueError, match="expected logits"):
        dice.update(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2))


def test_classification_metrics() -> None:
    targets = torch.tensor([0, 0, 1, 1])
    # class-1 scores 0.1, 0.6, 0.4, 0.9: one inverted pair of four -> AUC 0.75; argmax right on 2 of 4
    p1 = torch.tensor([0.1, 0.6, 0.4, 0.9])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))], dim=1)
    out = classification_metrics(logits, targets)
    assert out["auc"] == pytest.approx(0.75)
    assert out["accuracy"] == pytest.approx(0.5)
    single = classification_metrics(logits, torch.ones(4, dtype=torch.long))
    assert math.isnan(single["auc"]) and single["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="expected logits"):
        classification_metrics(torch.zeros(4, 3), targets)
