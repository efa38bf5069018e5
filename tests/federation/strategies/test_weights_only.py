"""Server optimisers step trainable weights only, and unchanged coordinates stay bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jipfed.federation.strategies import FedAdagrad, FedAdam, FedAvgM, FedYogi
from jipfed.federation.strategies.fedopt import FedOpt
from jipfed.federation.strategies.pseudo_gradient import is_buffer, mean_delta

from ..helpers import update

MAKERS = [
    lambda: FedAdam(eta=0.1, tau=1e-9, beta1=0.9),  # the old defaults: first step ~ eta * sign(delta)
    lambda: FedAdam(),
    lambda: FedYogi(tau=1e-9),
    lambda: FedAdagrad(tau=1e-9),
    lambda: FedAvgM(server_lr=1.0, momentum=0.9),
]


def _bn_global() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.running_var"] = torch.full((4,), 0.05)
    state["1.running_mean"] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    return state


def _site_deltas(g: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, x in g.items():
        if not x.is_floating_point():
            out[name] = torch.ones_like(x)
        elif name.endswith("running_var"):
            out[name] = torch.full_like(x, -0.01 * scale)  # running variance shrinks a little
        else:
            out[name] = torch.full_like(x, 1e-3 * scale)
    return out


@pytest.mark.parametrize("make", MAKERS)
def test_running_variance_takes_fedavg_value_and_stays_positive(make) -> None:
    g = _bn_global()
    strategy: FedOpt = make()
    ups = [
        update(_site_deltas(g, 1.0), site="a", round=0, n_samples=3),
        update(_site_deltas(g, 2.0), site="b", round=0, n_samples=1),
    ]
    out = strategy.aggregate(g, ups, round=0)
    want_var = g["1.running_var"] + (3 * -0.01 + 1 * -0.02) / 4
    assert torch.allclose(out["1.running_var"], want_var, atol=1e-7)
    assert (out["1.running_var"] > 0).all()
    assert torch.allclose(out["1.running_mean"], g["1.running_mean"] + 1.25e-3, atol=1e-7)
    assert torch.equal(out["1.num_batches_tracked"], g["1.num_batches_tracked"] + 1)
    state_names = {key.split("/", 1)[1] for key in strategy.state_dict().tensors}
    assert state_names == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert not torch.equal(out["0.weight"], g["0.weight"])  # the trainable weights did take a step


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("kind", ["delta", "weights"])
def test_unchanged_coordinates_are_bit_identical(make, kind: str) -> None:
    torch.manual_seed(1)
    g = {"w": torch.randn(1000), "b": torch.randn(7)}
    moved = torch.zeros(1000, dtype=torch.bool)
    moved[::10] = True
    deltas = []
    for scale in (1.0, -0.5, 0.25):
        d = torch.where(moved, torch.full((1000,), 1e-3 * scale), torch.zeros(1000))
        deltas.append({"w": d, "b": torch.zeros(7)})
    ups = [
        update(
            d if kind == "delta" else {k: g[k] + v for k, v in d.items()},
            site=s,
            round=0,
            kind=kind,
            n_samples=n,
        )
        for d, s, n in zip(deltas, ("a", "b", "c"), (7, 3, 11), strict=True)
    ]
    out = make().aggregate(g, ups, round=0)
    assert torch.equal(out["w"][~moved], g["w"][~moved])
    assert torch.equal(out["b"], g["b"])
    assert not torch.equal(out["w"][moved], g["w"][moved])


def test_mean_delta_is_exactly_zero_where_no_site_moved() -> None:
    g = {"w": torch.tensor([0.1, 0.7, 1 / 3])}
    ups = [
        update({"w": g["w"].clone()}, site=s, round=0, kind="weights", n_samples=n)
        for s, n in (("a", 7), ("b", 3), ("c", 11))
    ]
    assert torch.equal(mean_delta(g, ups)["w"], torch.zeros(3))


def test_mean_delta_rejects_names_not_in_the_global_model() -> None:
    g = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="extra"):
        mean_delta(g, [update({"v": torch.zeros(2)}, round=0)])


def test_is_buffer_by_name() -> None:
    assert is_buffer("features.norm0.running_var")
    assert is_buffer("bn.num_batches_tracked")
    assert not is_buffer("features.norm0.weight")


def test_fedadam_default_does_not_blow_up_small_deltas() -> None:
    # with the defaults a first step is proportional to the delta, not eta * sign(delta)
    g = {"w": torch.zeros(3)}
    out = FedAdam().aggregate(g, [update({"w": torch.tensor([1e-4, -1e-4, 0.0])}, round=0)], round=0)
    assert out["w"].abs().max() < 1e-3
    assert out["w"][2] == 0.0
