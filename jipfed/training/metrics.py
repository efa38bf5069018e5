"""Evaluation metrics: BraTS region Dice for segmentation, AUC / accuracy for classification.

Dice follows the BraTS convention for empty regions (common for ET in LGG cases): an empty
ground truth scores 1 when the prediction is empty too and 0 otherwise, instead of being
dropped. All region channels are foreground (WT/TC/ET, no background channel), hence
``include_background=True``.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import DiceMetric, compute_roc_auc

from jipfed.training.models import REGION_NAMES


class RegionDice:
    """Accumulates per-region Dice over batches.

    ``update(logits, regions)`` takes logits (B, 3, X, Y, Z) (thresholded at sigmoid 0.5) and
    binary regions (B, 3, X, Y, Z); ``result()`` returns dice_wt, dice_tc, dice_et (means over
    cases) and dice_mean (mean of the three).
    """

    def __init__(self) -> None:
        self._metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        self._count = 0

    def update(self, logits: torch.Tensor, regions: torch.Tensor) -> None:
        if logits.shape != regions.shape or logits.ndim != 5 or logits.shape[1] != len(REGION_NAMES):
            raise ValueError(
                f"expected logits and regions (B, 3, X, Y, Z), got {tuple(logits.shape)} and "
                f"{tuple(regions.shape)}"
            )
        pred = (logits.detach().float() > 0).to(torch.float32)  # sigmoid(x) > 0.5  <=>  x > 0
        self._metric(y_pred=pred, y=regions.detach().to(torch.float32))
        self._count += logits.shape[0]

    def result(self) -> dict[str, float]:
        if self._count == 0:
            raise ValueError("RegionDice.result() called before any update()")
        per_region = self._metric.aggregate().cpu()
        out = {f"dice_{name}": float(v) for name, v in zip(REGION_NAMES, per_region, strict=True)}
        out["dice_mean"] = float(per_region.mean())
        return out


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """AUC and accuracy of 2-class logits (N, 2) against targets (N,) in {0, 1}.

    ``auc`` is NaN when the targets hold only one class (undefined); callers that serialise
    metrics to JSON must handle that.
    """
    if logits.ndim != 2 or logits.shape[1] != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (N, 2) and targets (N,), got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("no cases to score")
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    accuracy = float((logits.argmax(dim=1) == targets).float().mean())
    if targets.unique().numel() < 2:
        auc = math.nan
    else:
        score = torch.softmax(logits, dim=1)[:, 1]
        auc = float(compute_roc_auc(score, targets))
    return {"auc": auc, "accuracy": accuracy}
