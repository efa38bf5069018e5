"""Augmentation multiplicity in DP-SGD: each case's gradient is the mean over its views, then clipped."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from training.synth import write_site

from jipfed.privacy.sample_dp import VIEW_SHIFT, augmented_views
from jipfed.privacy.settings import MAX_AUGMENT_VIEWS, PrivacySettings, SampleDP
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.fit import FitSettings
from jipfed.training.local import LocalTrainer
from privacy.helpers import sgd_dp_optimizer


def batch(cases: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(cases, 1, 6, 5, 4, generator=gen)
    return image, (image > 0.5).float().expand(-1, 3, -1, -1, -1).contiguous()


def test_one_view_is_the_batch_itself_and_draws_nothing() -> None:
    image, target = batch(2)
    gen = torch.Generator().manual_seed(7)
    state = gen.get_state()
    got_image, got_target = augmented_views(image, target, 1, gen)
    assert got_image is image and got_target is target
    assert torch.equal(gen.get_state(), state)


def test_views_are_case_major_start_with_the_case_and_move_the_target_with_the_image() -> None:
    image, target = batch(3)
    views, targets = augmented_views(image, target, 4, torch.Generator().manual_seed(1))
    assert views.shape == (12, *image.shape[1:]) and targets.shape == (12, *target.shape[1:])
    for i in range(3):
        assert torch.equal(views[4 * i], image[i]) and torch.equal(targets[4 * i], target[i])
        for k in range(4):  # every view is a flip / shift of its own case: same voxels, moved together
            v = views[4 * i + k]
            assert torch.equal(v.flatten().sort().values, image[i].flatten().sort().values)
            assert torch.equal(targets[4 * i + k], (v > 0.5).float().expand(3, -1, -1, -1))
    assert not all(torch.equal(views[k], image[0]) for k in range(1, 4))  # the views differ
    labels = torch.tensor([1, 0, 2])  # a class label is repeated per view
    assert torch.equal(augmented_views(image, labels, 2, torch.Generator())[1], labels.repeat_interleave(2))
    assert VIEW_SHIFT >= 1


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.scale = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x).movedim(1, -1)).movedim(-1, 1)


@pytest.mark.parametrize("views", [1, 3])
def test_the_clipped_per_case_gradient_is_the_clipped_mean_of_its_views_by_hand(views: int) -> None:
    """SGD lr 1 without noise: the step is -(1/B) sum_i clip_C(mean_k grad l(view_ik)); C clips some cases."""
    torch.manual_seed(0)
    model, cases = Tiny(), 4
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    image, target = augmented_views(*batch(cases, seed=3), views, torch.Generator().manual_seed(5))

    def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()  # a mean over the batch of equal-sized per-view means

    means = []
    for i in range(cases):
        grads = [
            torch.autograd.grad(loss_of(model(image[j : j + 1]), target[j : j + 1]), list(model.parameters()))
            for j in range(i * views, (i + 1) * views)
        ]
        means.append([torch.stack(g).mean(0) for g in zip(*grads, strict=True)])
    norms = [float(torch.sqrt(sum(g.pow(2).sum() for g in mean))) for mean in means]
    clip = sorted(norms)[cases // 2]  # clips the larger half of the cases, not the others
    expected = {n: torch.zeros_like(p) for n, p in start.items()}
    for mean, norm in zip(means, norms, strict=True):
        factor = min(1.0, clip / (norm + 1e-6))
        for name, g in zip(start, mean, strict=True):
            expected[name] += factor * g / cases
    assert min(norms) < clip < max(norms)

    module, optimizer = sgd_dp_optimizer(  # one clipped gradient per case, divided by the (expected) cases
        model, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=cases, views=views
    )
    optimizer.zero_grad(set_to_none=True)
    loss_of(module(image), target).backward()
    optimizer.step()
    module._close()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), start[name] - expected[name], rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_that_are_not_whole_cases_are_refused() -> None:
    model = Tiny()
    module, optimizer = sgd_dp_optimizer(
        model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=5, views=2
    )
    image, target = batch(5)
    module(image).sub(target).pow(2).mean().backward()
    with pytest.raises(ValueError, match="2 augmented views got 5 per-sample gradients"):
        optimizer.step()
    module._close()


def test_views_change_the_update_but_not_the_steps_or_the_site_epsilon(tmp_path: object) -> None:
    torch.set_num_threads(1)
    data = SiteData.from_dir(write_site(tmp_path / "site", 6, seed=0, size=16, prefix="0"), group="a")  # type: ignore[operator]
    config = TrainConfig(size="micro", steps=2, batch_size=2, lr=0.01, amp=False, augment=False)
    start = LocalTrainer(config, data, device="cpu").get_weights()
    results = {}
    for views in (1, 3):
        trainer = LocalTrainer(config, data, device="cpu")
        trainer.dp_key = bytes(range(32))  # the same Poisson batches in both runs
        dp = SampleDP(noise_multiplier=1e-12, max_grad_norm=0.05, augment_views=views)
        results[views] = trainer.train(start, round=0, fit=FitSettings(dp_sgd=dp))
    one, three = results[1], results[3]
    assert (one.steps, one.n_samples) == (three.steps, three.n_samples) == (2, 5)
    assert one.privacy == three.privacy  # one clipped gradient per case either way: the same accounting
    moved = max(float((one.weights[n] - start[n]).abs().max()) for n in start)
    apart = max(float((three.weights[n] - one.weights[n]).abs().max()) for n in start)
    assert apart > 1e-2 * moved > 0


def test_augment_views_round_trips_through_the_config_and_bad_values_are_refused() -> None:
    settings = PrivacySettings.from_mapping({"sample_dp": {"noise_multiplier": 1.0, "augment_views": 4}})
    assert settings.sample_dp is not None and settings.sample_dp.augment_views == 4
    stored = json.loads(json.dumps(settings.to_dict()))
    assert stored["sample_dp"]["augment_views"] == 4 and PrivacySettings.from_mapping(stored) == settings
    assert SampleDP().augment_views == 1
    assert FitSettings.from_config({"dp_sgd": stored["sample_dp"]}).dp_sgd == settings.sample_dp
    for bad in (0, MAX_AUGMENT_VIEWS + 1, 2.0, True, "4", None):
        with pytest.raises(ValueError, match="augment_views must be an integer"):
            SampleDP(augment_views=bad)  # type: ignore[arg-type]
