"""Model factory: MONAI networks sized by a preset, randomly initialised (never pretrained).

Segmentation follows the BraTS region convention: the network emits 3 channels (WT, TC, ET),
each an independent sigmoid, because the regions overlap (ET ⊂ TC ⊂ WT); a 4-class softmax
cannot express that directly and is not what BraTS ranks. Classification emits 2 logits
(LGG = 0, HGG = 1) for a softmax / cross-entropy.

Normalisation and federation:
- ``unet`` uses MONAI's default InstanceNorm (no affine, no running stats) and ``segresnet``
  GroupNorm: neither has buffers, so every state-dict entry is a trainable weight to average.
- ``densenet`` and ``resnet`` use BatchNorm; see :func:`shared_parameter_names` for how their
  running statistics are handled (``TrainConfig.bn_policy``).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet, ResNet, SegResNet, UNet
from torch import nn

from jipfed.training.config import TrainConfig

N_REGIONS = 3
REGION_NAMES = ("wt", "tc", "et")
N_GRADES = 2

_UNET = {
    # channels per level; stride 2 between levels. "micro" (6,293 weights) is the size at which
    # sample-level DP reaches the non-private Dice on the synthetic task (docs/privacy.md)
    "micro": ((8, 16), 0),
    "tiny": ((4, 8, 16, 32), 0),
    "small": ((16, 32, 64, 128), 1),
    "medium": ((32, 64, 128, 256), 2),
}
_SEGRESNET = {
    # init_filters, blocks_down, blocks_up (GroupNorm with 8 groups needs filters % 8 == 0)
    "micro": (8, (1, 1), (1,)),
    "tiny": (8, (1, 1, 1), (1, 1)),
    "small": (16, (1, 2, 2, 4), (1, 1, 1)),
    "medium": (32, (1, 2, 2, 4), (1, 1, 1)),
}
_DENSENET = {
    # init_features, growth_rate, block_config; "medium" is DenseNet121's layout at half width
    "micro": (4, 4, (2,)),
    "tiny": (8, 4, (2, 2)),
    "small": (16, 8, (3, 6, 6)),
    "medium": (32, 16, (6, 12, 24, 16)),
}
_RESNET = {
    # layers, block_inplanes ("medium" is ResNet-18's layout at half width)
    "micro": ([1, 1, 1, 1], [2, 4, 8, 16]),
    "tiny": ([1, 1, 1, 1], [4, 8, 16, 32]),
    "small": ([1, 1, 1, 1], [16, 32, 64, 128]),
    "medium": ([2, 2, 2, 2], [32, 64, 128, 256]),
}


def default_out_channels(config: TrainConfig) -> int:
    """3 region channels for segmentation, 2 logits for classification."""
    return N_REGIONS if config.task == "segmentation" else N_GRADES


def spatial_divisor(config: TrainConfig) -> int:
    """Each spatial size of a segmentation input must be a multiple of this (1 for classification).

    Necessary, not sufficient: :func:`check_input_size` is the authoritative check.
    """
    if config.task != "segmentation":
        return 1
    if config.model == "unet":
        return 2 ** (len(_UNET[config.size][0]) - 1)
    return 2 ** (len(_SEGRESNET[config.size][1]) - 1)


def build_model(config: TrainConfig, in_channels: int = 4, n_classes: int | None = None) -> nn.Module:
    """Build the configured network with weights drawn from ``config.seed``.

    Initialisation runs inside a forked RNG, so the global torch RNG is left untouched and every
    site (and the central) builds identical initial weights from the same config.

    Args:
        config: selects task, model and size preset.
        in_channels: image channels C of the (B, C, X, Y, Z) input (4 = FLAIR, T1, T1c, T2).
        n_classes: output channels; None = :func:`default_out_channels`.

    Returns:
        segmentation: module mapping (B, C, X, Y, Z) → logits (B, n_classes, X, Y, Z);
        classification: module mapping (B, C, X, Y, Z) → logits (B, n_classes).
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    out = default_out_channels(config) if n_classes is None else n_classes
    if out < 1:
        raise ValueError(f"n_classes must be >= 1, got {out}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _build(config, in_channels, out)


def check_input_size(config: TrainConfig, in_channels: int, spatial_shape: tuple[int, ...]) -> None:
    """Raise ValueError when a (1, C, X, Y, Z) batch cannot be trained on by the configured net.

    Runs one forward pass in train mode on the meta device (shapes only, no memory, no compute):
    catches sizes a U-Net cannot skip-connect and feature maps that shrink to one voxel, where
    InstanceNorm / BatchNorm fail in training (e.g. ``resnet`` needs more than 32 voxels per axis).
    """
    shape = (1, in_channels, *spatial_shape)
    try:
        with torch.device("meta"):
            _build(config, in_channels, default_out_channels(config)).train()(torch.empty(shape))
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"input {shape} does not fit {config.model}/{config.size} "
            f"(segmentation axes must be multiples of {spatial_divisor(config)}): {err}"
        ) from err


def _build(config: TrainConfig, in_channels: int, out: int) -> nn.Module:
    if config.model == "unet":
        channels, res_units = _UNET[config.size]
        return UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=res_units,
            norm="INSTANCE",
        )
    if config.model == "segresnet":
        filters, down, up = _SEGRESNET[config.size]
        return SegResNet(
            spatial_dims=3,
            init_filters=filters,
            in_channels=in_channels,
            out_channels=out,
            blocks_down=down,
            blocks_up=up,
        )
    if config.model == "densenet":
        features, growth, blocks = _DENSENET[config.size]
        return DenseNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out,
            init_features=features,
            growth_rate=growth,
            block_config=blocks,
        )
    if config.model == "resnet":
        layers, planes = _RESNET[config.size]
        return ResNet(
            block="basic",
            layers=layers,
            block_inplanes=planes,
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_stride=2,
            num_classes=out,
        )
    raise ValueError(f"unknown model {config.model!r}")


def bn_buffer_names(model: nn.Module) -> list[str]:
    """State-dict names of BatchNorm running statistics (running_mean/var, num_batches_tracked)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    names.append(f"{prefix}.{name}" if prefix else name)
    return names


def shared_parameter_names(model: nn.Module, policy: str) -> list[str]:
    """State-dict entries that leave the site, in state-dict order.

    Args:
        model: the unwrapped network (not a DataParallel wrapper).
        policy: ``"aggregate"``: everything, BatchNorm running stats included (the aggregator
            averages running_mean/var as floats and must treat the integer
            ``num_batches_tracked`` explicitly); ``"local"``: SiloBN (Andreux et al., 2020) —
            BatchNorm running statistics stay at the site, learned affine weights are shared.
    """
    if policy not in ("aggregate", "local"):
        raise ValueError(f"policy must be 'aggregate' or 'local', got {policy!r}")
    names = list(model.state_dict().keys())
    if policy == "aggregate":
        return names
    local = set(bn_buffer_names(model))
    return [n for n in names if n not in local]
