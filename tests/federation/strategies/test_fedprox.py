from __future__ import annotations

import pytest
import torch
from torch import nn

from jipfed.federation.strategies import FedAvg, FedProx, proximal_term

from ..helpers import t, update


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    strategy = FedProx(mu=0.05)
    assert strategy.configure_fit(3) == {"mu": 0.05}
    assert FedAvg().configure_fit(3) == {}
    g = {"w": t(0, 0)}
    ups = [update({"w": t(2, 4)}, site="a", n_samples=1), update({"w": t(6, 0)}, site="b", n_samples=3)]
    assert torch.equal(strategy.aggregate(g, ups, round=1)["w"], t(5, 1))
    with pytest.raises(ValueError, match="mu must be"):
        FedProx(mu=-1.0)
    with pytest.raises(ValueError, match="round"):
        strategy.configure_fit(-1)


def test_proximal_term_by_hand_and_its_gradient() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    anchor = {"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([1.0])}
    term = proximal_term(model, anchor, mu=0.5)
    # (0.5 / 2) * (1 + 4 + 4) = 2.25
    assert float(term.detach()) == pytest.approx(2.25)
    term.backward()
    # d/dw (mu/2)||w - w0||^2 = mu (w - w0)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([1.0]))
    model.bias.requires_grad_(False)
    assert float(proximal_term(model, anchor, mu=0.5).detach()) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="mu"):
        proximal_term(model, anchor, mu=float("nan"))
