from __future__ import annotations

import pytest
import torch

from jipfed.federation.strategies import FedAvg

from ..helpers import t, update

GLOBAL = {"w": t(0, 0), "bn.num_batches_tracked": torch.tensor(5)}


def test_fedavg_by_hand_mixing_weights_and_deltas() -> None:
    a = update(
        {"w": t(1, 2), "bn.num_batches_tracked": torch.tensor(7)}, site="a", kind="weights", n_samples=1
    )
    b = update({"w": t(4, 8), "bn.num_batches_tracked": torch.tensor(4)}, site="b", kind="delta", n_samples=3)
    new = FedAvg().aggregate(GLOBAL, [a, b], round=1)
    # site models: a = [1, 2], b = global + delta = [4, 8]; (1*[1, 2] + 3*[4, 8]) / 4
    assert torch.equal(new["w"], t(3.25, 6.5))
    # integers: max of the site values 7 and 5 + 4 = 9, still int64
    assert torch.equal(new["bn.num_batches_tracked"], torch.tensor(9))


def test_fedavg_float64_accumulation_matches_float32_here() -> None:
    a = update({"w": t(1, 3), "bn.num_batches_tracked": torch.tensor(0)}, site="a", n_samples=2)
    b = update({"w": t(2, 5), "bn.num_batches_tracked": torch.tensor(0)}, site="b", n_samples=2)
    new = FedAvg(accumulate_dtype="float64").aggregate(GLOBAL, [a, b], round=1)
    assert torch.equal(new["w"], t(1.5, 4))
    assert new["w"].dtype == torch.float32


def test_fedavg_refuses_stale_duplicate_or_no_updates() -> None:
    a = update({"w": t(1, 2), "bn.num_batches_tracked": torch.tensor(0)}, site="a")
    with pytest.raises(ValueError, match="round 1, aggregating 2"):
        FedAvg().aggregate(GLOBAL, [a], round=2)
    with pytest.raises(ValueError, match="duplicate update from site 'a'"):
        FedAvg().aggregate(GLOBAL, [a, a], round=1)
    with pytest.raises(ValueError, match="no updates"):
        FedAvg().aggregate(GLOBAL, [], round=1)
    with pytest.raises(ValueError, match="missing"):
        FedAvg().aggregate({**GLOBAL, "extra": t(1)}, [a], round=1)


def test_fedavg_validates_arguments() -> None:
    with pytest.raises(ValueError, match="'float16'"):
        FedAvg(accumulate_dtype="float16")
    with pytest.raises(ValueError, match="'mean'"):
        FedAvg(integer_mode="mean")
    with pytest.raises(TypeError):
        FedAvg("float64")  # type: ignore[misc]  # keyword-only
