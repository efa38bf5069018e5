from __future__ import annotations

import torch

from jipfed.federation.strategies import FedAvg, Median

from ..helpers import t, update


def poisoned_round() -> tuple[dict, list, torch.Tensor, torch.Tensor]:
    """5 sites, honest deltas in [-1, 1]; site 4 sends 1000x a delta."""
    gen = torch.Generator().manual_seed(7)
    g = {"w": torch.randn(50, generator=gen), "n": torch.tensor(10)}
    honest = [torch.rand(50, generator=gen) * 2 - 1 for _ in range(4)]
    deltas = [*honest, honest[0] * 1000]
    ups = [update({"w": d, "n": torch.tensor(1)}, site=f"s{i}", n_samples=1) for i, d in enumerate(deltas)]
    stack = torch.stack(honest)
    return g, ups, g["w"] + stack.min(0).values, g["w"] + stack.max(0).values


def test_median_by_hand() -> None:
    g = {"w": t(1, 1, 1)}
    deltas = [t(3, 0, -1), t(1, 9, -2), t(2, 4, 8)]
    ups = [update({"w": d}, site=f"s{i}", n_samples=100 if i == 1 else 1) for i, d in enumerate(deltas)]
    assert torch.equal(Median().aggregate(g, ups, round=1)["w"], t(3, 5, 0))  # n_samples ignored


def test_median_bounds_a_poisoned_update() -> None:
    g, ups, low, high = poisoned_round()
    new = Median().aggregate(g, ups, round=1)["w"]
    eps = 1e-6
    assert bool(((new >= low - eps) & (new <= high + eps)).all())
    # the same round under FedAvg leaves the honest range: the check above can fail
    avg = FedAvg().aggregate(g, ups, round=1)["w"]
    assert not bool(((avg >= low - eps) & (avg <= high + eps)).all())


def test_median_over_lazy_files_equals_in_memory(tmp_path) -> None:
    from jipfed.federation.codec import encode_update, open_update, write_update
    from jipfed.federation.validation import ExpectedUpdate

    from ..helpers import CONFIG_HASH, EXPERIMENT

    g, ups, _, _ = poisoned_round()
    lazy = []
    for u in ups:
        write_update(tmp_path / u.site, encode_update(u, "int8"))
        expected = ExpectedUpdate.from_weights(
            g, experiment=EXPERIMENT, round=1, site=u.site, config_hash=CONFIG_HASH, kinds=("delta",)
        )
        lazy.append(open_update(tmp_path / u.site, expected))
    decoded = [x.load() for x in lazy]
    assert torch.equal(
        Median().aggregate(g, lazy, round=1)["w"], Median().aggregate(g, decoded, round=1)["w"]
    )
    # int8 stays within its bound of the exact median: max|delta| / 254 per site value
    exact = Median().aggregate(g, ups, round=1)["w"]
    bound = max(float(u.tensors["w"].abs().max()) for u in ups) / 254
    assert float((Median().aggregate(g, lazy, round=1)["w"] - exact).abs().max()) <= bound * 1.001
