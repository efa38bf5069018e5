from __future__ import annotations

import pytest
import torch
from torch import nn

from jipfed.training.config import TrainConfig
from jipfed.training.models import (
    bn_buffer_names,
    build_model,
    check_input_size,
    shared_parameter_names,
    spatial_divisor,
)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model", ["unet", "segresnet"])
@pytest.mark.parametrize("size", ["micro", "tiny", "small", "medium"])
def test_segmentation_models_emit_three_region_channels(model: str, size: str) -> None:
    cfg = TrainConfig(model=model, size=size)
    net = build_model(cfg, in_channels=4).eval()
    side = 2 * spatial_divisor(cfg)
    with torch.no_grad():
        out = net(torch.randn(1, 4, side, side, side))
    assert out.shape == (1, 3, side, side, side)
    assert not bn_buffer_names(net), "segmentation nets must have no BatchNorm stats to aggregate"
    assert shared_parameter_names(net, "local") == list(net.state_dict())


@pytest.mark.parametrize("model", ["densenet", "resnet"])
@pytest.mark.parametrize("size", ["micro", "tiny", "small", "medium"])
def test_classification_models_emit_two_logits(model: str, size: str) -> None:
    cfg = TrainConfig(task="classification", model=model, size=size)
    net = build_model(cfg, in_channels=4).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 4, 32, 32, 32))
    assert out.shape == (2, 2)
    assert bn_buffer_names(net)


@pytest.mark.parametrize("model", ["unet", "segresnet"])
def test_presets_grow(model: str) -> None:
    sizes = [
        _n_params(build_model(TrainConfig(model=model, size=s))) for s in ("micro", "tiny", "small", "medium")
    ]
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3]


def test_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(TrainConfig(size="tiny", seed=5)).state_dict()
    after = torch.rand(1)
    b = build_model(TrainConfig(size="tiny", seed=5)).state_dict()
    c = build_model(TrainConfig(size="tiny", seed=6)).state_dict()
    assert torch.equal(after, expected_next)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_n_classes_and_in_channels_are_honoured() -> None:
    net = build_model(TrainConfig(size="tiny"), in_channels=2, n_classes=4).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 2, 16, 16, 16)).shape == (1, 4, 16, 16, 16)
    with pytest.raises(ValueError, match="in_channels"):
        build_model(TrainConfig(size="tiny"), in_channels=0)


def test_shared_names_local_policy_drops_only_running_stats() -> None:
    net = build_model(TrainConfig(task="classification", model="densenet", size="tiny"))
    everything = list(net.state_dict())
    local = shared_parameter_names(net, "local")
    dropped = set(everything) - set(local)
    assert shared_parameter_names(net, "aggregate") == everything
    assert dropped == set(bn_buffer_names(net))
    assert dropped and all(
        n.rsplit(".", 1)[1] in {"running_mean", "running_var", "num_batches_tracked"} for n in dropped
    )
    assert any(n.endswith("norm0.weight") for n in local), "BN affine weights stay shared (SiloBN)"
    with pytest.raises(ValueError, match="policy"):
        shared_parameter_names(net, "fedbn")


@pytest.mark.parametrize(
    ("cfg", "good", "bad"),
    [
        (TrainConfig(size="small"), (64, 64, 48), (64, 64, 44)),  # 44 is not a multiple of 8
        (TrainConfig(size="small"), (16, 16, 16), (8, 8, 8)),  # bottleneck of one voxel
        (TrainConfig(model="segresnet", size="small"), (64, 64, 48), (64, 64, 44)),
        (TrainConfig(task="classification", model="resnet", size="medium"), (64, 64, 48), (32, 32, 32)),
        (TrainConfig(task="classification", model="densenet", size="tiny"), (16, 16, 16), (8, 8, 8)),
    ],
)
def test_check_input_size(cfg: TrainConfig, good: tuple, bad: tuple) -> None:
    check_input_size(cfg, 4, good)
    with pytest.raises(ValueError, match="does not fit"):
        check_input_size(cfg, 4, bad)
