from __future__ import annotations

import pytest
import torch

from jipfed.federation.strategies import TrimmedMean

from ..helpers import t, update
from .test_median import poisoned_round


def test_trimmed_mean_by_hand() -> None:
    g = {"w": t(0, 10)}
    deltas = [t(1, 0), t(5, 1), t(2, 2), t(4, 3), t(100, -50)]
    ups = [update({"w": d}, site=f"s{i}", kind="delta") for i, d in enumerate(deltas)]
    # beta 0.2 of 5 sites: drop one at each end -> mean(2, 4, 5) = 11/3 ; mean(0, 1, 2) = 1
    assert torch.allclose(TrimmedMean(beta=0.2).aggregate(g, ups, round=1)["w"], t(11 / 3, 11))
    # beta 0 is the plain mean: (1 + 5 + 2 + 4 + 100) / 5 = 22.4 ; (0 + 1 + 2 + 3 - 50) / 5 = -8.8
    assert torch.allclose(TrimmedMean(beta=0.0).aggregate(g, ups, round=1)["w"], t(22.4, 1.2))


def test_trimmed_mean_bounds_a_poisoned_update() -> None:
    g, ups, low, high = poisoned_round()
    new = TrimmedMean(beta=0.2).aggregate(g, ups, round=1)["w"]
    assert bool(((new >= low - 1e-6) & (new <= high + 1e-6)).all())
    untrimmed = TrimmedMean(beta=0.0).aggregate(g, ups, round=1)["w"]
    assert not bool(((untrimmed >= low - 1e-6) & (untrimmed <= high + 1e-6)).all())


@pytest.mark.parametrize("beta", [-0.1, 0.5, 1.0, float("nan")])
def test_beta_is_validated(beta: float) -> None:
    with pytest.raises(ValueError, match="beta"):
        TrimmedMean(beta=beta)
