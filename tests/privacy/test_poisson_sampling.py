"""DP-SGD's Poisson batches: each case drawn independently with probability q from a secret stream;
an empty batch is a step of noise alone, divided by the expected batch size like every step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from training.synth import write_site

from jipfed.federation.site_round import site_metrics
from jipfed.privacy.poisson_sampling import SAMPLING_NONCE, PoissonBatches, poisson_loader
from jipfed.privacy.secure_noise import ChaChaNormal, ChaChaUniform
from jipfed.privacy.settings import SampleDP
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.fit import FitSettings
from jipfed.training.local import LocalTrainer
from privacy.helpers import sgd_dp_optimizer

KEY = bytes(range(32))


def draws(key: bytes | None, cases: int = 50, rate: float = 0.1, steps: int = 4000) -> list[list[int]]:
    return list(PoissonBatches(cases, rate, steps, ChaChaUniform(key, SAMPLING_NONCE)))


def test_each_case_is_drawn_independently_with_the_sample_rate() -> None:
    batches = draws(KEY)
    steps, cases, rate = 4000, 50, 0.1
    counts = torch.zeros(cases)
    for batch in batches:
        assert batch == sorted(set(batch)) and all(0 <= i < cases for i in batch)
        counts[batch] += 1
    spread = math.sqrt(rate * (1 - rate) / steps)
    assert float((counts / steps - rate).abs().max()) < 5 * spread  # every case about q of the steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert abs(float(sizes.mean()) - cases * rate) < 5 * math.sqrt(cases * rate * (1 - rate) / steps)
    assert abs(float(sizes.var()) / (cases * rate * (1 - rate)) - 1) < 0.15  # binomial sizes, not fixed
    empty = sum(1 for b in batches if not b)
    assert 0 < empty < 4 * steps * (1 - rate) ** cases  # (0.9)^50 = 0.5 %: some steps draw nobody


def test_draws_repeat_only_with_their_key_and_never_follow_the_experiment_seed(tmp_path: Path) -> None:
    assert draws(KEY, steps=50) == draws(KEY, steps=50)
    assert draws(None, steps=50) != draws(None, steps=50)  # 32 fresh bytes of OS randomness each
    # the noise stream of the same key is another stream (its own nonce)
    assert not torch.equal(ChaChaUniform(KEY, SAMPLING_NONCE).uniform(100), ChaChaNormal(KEY).uniform(100))
    data = SiteData.from_dir(write_site(tmp_path, 6, seed=0, size=16, prefix="0"), group="a")
    config = TrainConfig(
        size="micro", steps=4, batch_size=2, lr=0.01, amp=False, augment=False, seed=7, optimizer="sgd"
    )  # SGD: the 1e-6 noise moves nothing (Adam would scale it up); 4 steps: equal draws by chance ~1e-6
    dp = FitSettings(dp_sgd=SampleDP(noise_multiplier=1e-12, max_grad_norm=1e6))
    start = LocalTrainer(config, data, device="cpu").get_weights()
    runs = [LocalTrainer(config, data, device="cpu").train(start, round=0, fit=dp).weights for _ in range(2)]
    # same seed, same start, no noise to speak of: only the secret draws can tell the two runs apart
    assert any(not torch.allclose(runs[0][n], runs[1][n], atol=1e-5) for n in start)


def test_bad_sampling_arguments_are_refused() -> None:
    for cases, rate, steps in ((0, 0.5, 1), (5, 0.0, 1), (5, 1.5, 1), (5, 0.5, 0)):
        with pytest.raises(ValueError, match="Poisson sampling needs"):
            PoissonBatches(cases, rate, steps, ChaChaUniform(KEY))


def test_a_loader_yields_none_for_an_empty_batch_and_ceil_cases_over_batch_steps() -> None:
    dataset = [torch.full((2,), float(i)) for i in range(5)]
    loader = poisson_loader(dataset, 1, key=KEY)  # q = 0.2: an empty draw is likely (0.8^5 = 33 %)
    assert len(loader) == 5
    seen = [b for _ in range(20) for b in loader]
    assert any(b is None for b in seen) and any(b is not None and len(b) > 1 for b in seen)
    assert all(b is None or b.shape[1:] == (2,) for b in seen)
    assert len(poisson_loader(dataset, 8, key=KEY)) == 1  # batch above the cases: q = 1, every case


def test_the_step_of_an_empty_batch_adds_the_noise_over_the_expected_batch_size() -> None:
    model = nn.Linear(1000, 100, bias=False)
    start = model.weight.detach().clone()
    module, optimizer = sgd_dp_optimizer(
        model, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4, key=KEY
    )
    optimizer.step_without_cases()
    moved = model.weight.detach() - start
    assert abs(float(moved.mean())) < 0.003
    assert float(moved.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)  # z C / expected batch
    module._close()


def test_a_round_of_empty_batches_trains_on_noise_counts_its_steps_and_reports_no_loss(tmp_path: Path) -> None:
    """5 training cases, batch 1 (q = 0.2), one step whose draw is empty: the site still takes the
    step (noise only), the accountant counts it, and the update carries no training loss."""
    torch.set_num_threads(1)
    data = SiteData.from_dir(write_site(tmp_path, 6, seed=0, size=16, prefix="0"), group="a")
    key = next(bytes([k]) * 32 for k in range(256) if not draws(bytes([k]) * 32, 5, 0.2, 1)[0])
    config = TrainConfig(size="micro", steps=1, batch_size=1, lr=0.01, amp=False, augment=False)
    trainer = LocalTrainer(config, data, device="cpu")
    trainer.dp_key = key
    start = trainer.get_weights()
    result = trainer.train(start, round=0, fit=FitSettings(dp_sgd=SampleDP(noise_multiplier=1.0)))
    assert result.steps == 1 and "train_loss" not in result.metrics
    assert any(not torch.equal(result.weights[n], start[n]) for n in start)  # the noise moved it
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.2)
    assert result.privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    metrics = site_metrics(result, None)
    assert "train_loss" not in metrics and metrics["steps"] == 1.0
