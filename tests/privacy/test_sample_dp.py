"""DP-SGD at a site: opacus trains the U-Net, the site's ε accumulates over rounds and travels with the update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from training.synth import write_site

from jipfed.privacy.accountant import noise_for_budget
from jipfed.privacy.sample_dp import DPSGD
from jipfed.privacy.secure_noise import ChaChaNormal, secure_normal
from jipfed.privacy.settings import PrivacySettings, SampleDP
from jipfed.training.config import TrainConfig
from jipfed.training.data import CaseDataset, SiteData
from jipfed.training.fit import FitSettings
from jipfed.training.local import LocalTrainer
from privacy.helpers import record, simulate_two_sites

TRAIN = TrainConfig(size="tiny", steps=3, batch_size=2, lr=0.01, amp=False, augment=False)
DP = SampleDP(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    return SiteData.from_dir(
        write_site(tmp_path_factory.mktemp("site"), 6, seed=0, size=16, prefix="0"), group="a"
    )


def test_site_epsilon_is_opacus_rdp_of_its_steps_and_accumulates(data: SiteData) -> None:
    torch.set_num_threads(1)
    trainer = LocalTrainer(TRAIN, data, device="cpu")
    start = trainer.get_weights()
    first = trainer.train(start, round=0, fit=FitSettings(dp_sgd=DP))
    second = trainer.train(first.weights, round=1, fit=FitSettings(dp_sgd=DP))
    q = TRAIN.batch_size / first.n_samples
    accountant = RDPAccountant()
    for _ in range(first.steps + second.steps):
        accountant.step(noise_multiplier=1.1, sample_rate=q)
    assert second.privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert 0 < first.privacy["epsilon"] < second.privacy["epsilon"]
    assert any(not torch.equal(first.weights[n], start[n]) for n in first.weights)
    # the history is site state: a new trainer (the next round's process) counts on
    fresh = LocalTrainer(TRAIN, data, device="cpu")
    fresh.load_site_state(trainer.site_state())
    assert fresh.dp_history == trainer.dp_history and len(fresh.dp_history) == 2


def test_a_round_beyond_the_site_budget_is_refused_before_training(data: SiteData) -> None:
    trainer = LocalTrainer(TRAIN, data, device="cpu")
    before = trainer.get_weights()
    with pytest.raises(
        ValueError,
        match=r"site a, round 0: DP-SGD: 3 DP-SGD steps would take this site's epsilon to .* > its budget 0.1",
    ):
        trainer.train(before, round=0, fit=FitSettings(dp_sgd=SampleDP(noise_multiplier=1.1, epsilon=0.1)))
    assert all(torch.equal(before[n], w) for n, w in trainer.get_weights().items())


def test_calibrate_sets_the_noise_and_check_budget_only_checks() -> None:
    dp = DPSGD(SampleDP(noise_multiplier=None, epsilon=8.0, planned_rounds=2))
    with pytest.raises(RuntimeError, match="calibrate sets the round's noise multiplier"):
        dp.check_budget(10, 0.1, "site a, round 0")
    assert dp.noise_multiplier is None
    z = dp.calibrate(10, 0.1, "site a, round 0")
    assert z == dp.noise_multiplier == noise_for_budget(8.0, 20, delta=1e-5, sample_rate=0.1)
    dp.check_budget(20, 0.1, "site a, round 0")  # the planned 2 rounds at once: within 8
    assert dp.noise_multiplier == z and dp.history == []
    with pytest.raises(ValueError, match=r"site a, round 0: 21 DP-SGD steps would take .* > its budget 8.0"):
        dp.check_budget(21, 0.1, "site a, round 0")
    assert dp.noise_multiplier == z


def test_models_opacus_cannot_handle_are_refused(data: SiteData) -> None:
    trainer = LocalTrainer(
        TrainConfig(model="segresnet", size="tiny", steps=1, batch_size=2, amp=False), data, device="cpu"
    )
    with pytest.raises(ValueError, match="supports \\('unet',\\); 'segresnet'"):
        trainer.train(trainer.get_weights(), round=0, fit=FitSettings(dp_sgd=DP))
    with pytest.raises(ValueError, match="FedProx, SCAFFOLD and FedDyn are refused"):
        unet = LocalTrainer(TRAIN, data, device="cpu")
        unet.train(unet.get_weights(), mu=0.1, round=0, fit=FitSettings(dp_sgd=DP))


@pytest.mark.parametrize("size", ["micro", "tiny"])
def test_without_noise_and_clipping_dp_sgd_is_sgd_on_its_poisson_batches(data: SiteData, size: str) -> None:
    """5 training cases, batch 2: each step takes every case with probability 0.4 and divides the summed
    gradient of the cases it drew by the expected batch size 2 (a batch of 3 moves 1.5 times a mean step)."""
    torch.set_num_threads(1)
    config = TrainConfig(size=size, steps=3, batch_size=2, lr=0.01, amp=False, augment=False, optimizer="sgd")
    open_dp = SampleDP(noise_multiplier=1e-12, max_grad_norm=1e6)  # noise std 1e-6, nothing clipped
    key = bytes(range(32))
    trainer = LocalTrainer(config, data, device="cpu")
    trainer.dp_key = key
    start = trainer.get_weights()
    got = trainer.train(start, round=0, fit=FitSettings(dp_sgd=open_dp))
    assert got.n_samples == 5 and got.steps == 3

    by_hand = LocalTrainer(config, data, device="cpu")
    model, loss_fn = by_hand.model, by_hand._loss_fn()
    model.load_state_dict(start, strict=False)
    model.train()
    sgd = by_hand._optimizer(list(model.parameters()), 0.01)  # the trainer's SGD (momentum 0.9)
    dataset = CaseDataset(trainer.train_records, config.task, augment=False)
    batches = list(DPSGD(open_dp, noise_key=key).loader(dataset, 2))  # the same draws: one pass of 3 steps
    sizes = [0 if b is None else len(b["image"]) for b in batches]
    assert len(sizes) == 3 and len(set(sizes)) > 1, sizes  # Poisson: the batch size varies
    for batch in batches:
        sgd.zero_grad()
        if batch is None:  # an empty draw: a step with no gradient (momentum still moves)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        else:
            (loss_fn(model(batch["image"]), batch["label"]) * len(batch["image"]) / 2).backward()
        sgd.step()
    expected = {n: w.detach() for n, w in model.state_dict().items() if n in start}
    moved = {n: float((w - start[n]).abs().max()) for n, w in expected.items()}
    assert max(moved.values()) > 1e-4
    for name, weight in expected.items():  # biases before InstanceNorm get no gradient
        assert float((got.weights[name] - weight).abs().max()) <= 1e-3 * moved[name] + 1e-6, name


def test_chacha_noise_is_standard_normal_and_reproducible_only_with_its_key() -> None:
    key = bytes(range(32))
    a, b = ChaChaNormal(key)(200_001), ChaChaNormal(key)(200_001)
    assert a.dtype == torch.float64 and a.shape == (200_001,) and torch.equal(a, b)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01
    assert abs(float((a.abs() < 1.0).double().mean()) - 0.6827) < 0.005  # the normal's 1-sigma mass
    assert not torch.equal(ChaChaNormal()(1000), ChaChaNormal()(1000))  # fresh OS keys
    noise = secure_normal(0.5, torch.zeros(100, 1000), ChaChaNormal(key))
    assert noise.shape == (100, 1000) and noise.dtype == torch.float32
    assert abs(float(noise.std()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="must be 32 bytes, got 3"):
        ChaChaNormal(b"abc")


@pytest.mark.slow
def test_simulated_sample_dp_records_each_site_epsilon(tmp_path: Path) -> None:
    _, rounds = simulate_two_sites(tmp_path, "dpsgd", {"sample_dp": {"noise_multiplier": 1.0}})
    eps = [record(rounds, r)["sites"]["site-a"]["dp_epsilon"] for r in range(2)]
    assert 0 < eps[0] < eps[1]
    manifest = json.loads((rounds / "1" / "updates" / "site-b.json").read_text())
    assert manifest["privacy"]["epsilon"] == manifest["metrics"]["dp_epsilon"]


def test_an_empty_noise_multiplier_spends_the_site_budget_over_the_planned_rounds(data: SiteData) -> None:
    """The site picks z from its own steps and sample rate in round 0 and keeps it; ε stays in budget."""
    torch.set_num_threads(1)
    budget = SampleDP(noise_multiplier=None, epsilon=8.0, planned_rounds=3)
    trainer = LocalTrainer(TRAIN, data, device="cpu")
    weights = trainer.get_weights()
    results = []
    for round_ in range(3):
        result = trainer.train(weights, round=round_, fit=FitSettings(dp_sgd=budget))
        weights = result.weights
        results.append(result)
    noises = {r.privacy["noise_multiplier"] for r in results}
    assert len(noises) == 1
    q = TRAIN.batch_size / results[0].n_samples
    expected = noise_for_budget(8.0, 3 * TRAIN.steps, delta=1e-5, sample_rate=q)
    assert noises == {expected}
    assert 7.5 < results[-1].privacy["epsilon"] <= 8.0  # spends (almost) all of it, never more
    with pytest.raises(
        ValueError, match=r"site a, round 3: DP-SGD: 3 DP-SGD steps would take .* > its budget 8.0"
    ):
        trainer.train(weights, round=3, fit=FitSettings(dp_sgd=budget))
    with pytest.raises(ValueError, match="an empty noise_multiplier is chosen from the epsilon budget"):
        SampleDP(noise_multiplier=None)


def test_ema_of_the_iterates_is_the_hand_computed_average_of_a_two_step_round(data: SiteData) -> None:
    """decay d over 2 steps: a = d * w1 + (1 - d) * w2 (started at the first step's weights)."""
    torch.set_num_threads(1)
    open_dp = SampleDP(noise_multiplier=1e-12, max_grad_norm=1e6)
    config = TrainConfig(
        size="micro", steps=2, batch_size=2, lr=0.01, amp=False, augment=False, optimizer="sgd"
    )
    start = LocalTrainer(config, data, device="cpu").get_weights()

    def weights(steps: int, dp: SampleDP) -> dict[str, torch.Tensor]:
        trainer = LocalTrainer(TrainConfig(**{**config.to_dict(), "steps": steps}), data, device="cpu")
        trainer.dp_key = bytes(range(32))  # the same Poisson batches in every run
        return trainer.train(start, round=0, fit=FitSettings(dp_sgd=dp)).weights

    w1, w2 = weights(1, open_dp), weights(2, open_dp)
    averaged = weights(2, SampleDP(noise_multiplier=1e-12, max_grad_norm=1e6, ema_decay=0.75))
    moved = max(float((w2[n] - w1[n]).abs().max()) for n in w1)
    assert moved > 1e-4
    for name in w1:
        expected = 0.75 * w1[name] + 0.25 * w2[name]
        assert float((averaged[name] - expected).abs().max()) <= 1e-3 * moved + 1e-7, name
    one = weights(1, SampleDP(noise_multiplier=1e-12, max_grad_norm=1e6, ema_decay=0.9))
    assert all(float((one[n] - w1[n]).abs().max()) <= 1e-7 for n in w1)  # the average of one iterate


def test_ema_decay_round_trips_through_the_config_and_bad_values_are_refused() -> None:
    settings = PrivacySettings.from_mapping({"sample_dp": {"noise_multiplier": 1.0, "ema_decay": 0.9}})
    assert settings.sample_dp is not None and settings.sample_dp.ema_decay == 0.9
    stored = json.loads(json.dumps(settings.to_dict()))
    assert stored["sample_dp"]["ema_decay"] == 0.9
    assert PrivacySettings.from_mapping(stored) == settings
    assert SampleDP().ema_decay is None
    for bad in (1.0, -0.1, "0.9", True, float("nan")):
        with pytest.raises(ValueError, match="ema_decay"):
            SampleDP(ema_decay=bad)


def test_parameters_dp_sgd_does_not_train_stay_bit_identical_and_unnoised(data: SiteData) -> None:
    torch.set_num_threads(1)
    config = TrainConfig(
        size="micro", steps=2, batch_size=2, lr=0.01, amp=False, augment=False, optimizer="sgd"
    )
    trainer = LocalTrainer(config, data, device="cpu")
    start = trainer.get_weights()
    last = SampleDP(noise_multiplier=5.0, max_grad_norm=1.0, trainable=["model.2.*"])
    got = trainer.train(start, round=0, fit=FitSettings(dp_sgd=last))
    frozen = [n for n in start if not n.startswith("model.2.")]
    assert frozen and all(torch.equal(got.weights[n], start[n]) for n in frozen)  # no noise either
    assert not torch.equal(got.weights["model.2.conv.weight"], start["model.2.conv.weight"])
    assert got.privacy["epsilon"] > 0
    everything = trainer.train(got.weights, round=1, fit=FitSettings(dp_sgd=DP))  # the next round trains all
    assert all(
        not torch.equal(everything.weights[n], got.weights[n]) for n in frozen if n.endswith("conv.weight")
    )
    with pytest.raises(
        ValueError, match=r"round 2: DP-SGD's trainable patterns \['decoder\.\*'\] match no parameter"
    ):
        trainer.train(start, round=2, fit=FitSettings(dp_sgd=SampleDP(trainable=["decoder.*"])))


def test_trainable_round_trips_through_the_config_and_bad_patterns_are_refused() -> None:
    settings = PrivacySettings.from_mapping({"sample_dp": {"trainable": ["model.2.*"]}})
    assert settings.sample_dp is not None and settings.sample_dp.trainable == ("model.2.*",)
    assert PrivacySettings.from_mapping(json.loads(json.dumps(settings.to_dict()))) == settings
    for bad in ([], [""], "model.2.*", [3]):
        with pytest.raises(ValueError, match="trainable must be a non-empty list"):
            SampleDP(trainable=bad)


def test_the_form_stores_iterate_averaging_and_trainable_patterns_with_the_experiment() -> None:
    from jipfed.central.params import experiment_config, ui_forms

    sample = {"differential_privacy": True, "dp_level": "sample"}
    config = experiment_config(
        {**sample, "dp_ema_decay": 0.9, "dp_trainable": ["model.2.*"], "dp_augment_views": 4}
    )
    assert config.privacy["sample_dp"]["ema_decay"] == 0.9
    assert PrivacySettings.from_mapping(config.privacy).sample_dp.augment_views == 4  # type: ignore[union-attr]
    assert config.privacy["sample_dp"]["trainable"] == ["model.2.*"]
    assert PrivacySettings.from_mapping(config.privacy).sample_dp.trainable == ("model.2.*",)  # type: ignore[union-attr]
    default = experiment_config(sample).privacy["sample_dp"]
    assert default["ema_decay"] is None and default["trainable"] is None and default["augment_views"] == 1
    for bad in (
        {"dp_ema_decay": 1.0},
        {"dp_trainable": [""]},
        {"dp_augment_views": 0},
        {"dp_augment_views": 33},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            experiment_config({**sample, **bad})
    assert {"dp_ema_decay", "dp_trainable", "dp_augment_views"} <= set(
        ui_forms()["workflow_form"]["properties"]
    )
    strategy = experiment_config({**sample, "dp_trainable": ["model.2.*"]}).make_strategy()
    assert json.loads(json.dumps(strategy.config())) == strategy.config()  # a resumed state's config matches
    assert FitSettings.from_config(strategy.configure_fit(0)).dp_sgd.trainable == ("model.2.*",)  # type: ignore[union-attr]
