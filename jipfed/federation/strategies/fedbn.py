"""FedBN: FedAvg whose normalisation layers stay at the sites.

Li, Jiang, Zhang, Kamp, Dou, "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021 (https://arxiv.org/abs/2102.07623).

Every state-dict entry matching ``local_patterns`` (default: names containing ``norm`` or
``bn``, i.e. BatchNorm / GroupNorm / affine InstanceNorm weights, biases and running statistics)
is trained and kept by each site and never leaves it (see
:mod:`~jipfed.federation.strategies.site_options`); everything else is averaged. Any pattern list
works, e.g. ``["model.0.*"]`` keeps a first-layer "scanner adapter" local. Note: the U-Net preset
uses InstanceNorm without affine parameters, so the default patterns match nothing there.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jipfed.federation.strategies.fedavg import FedAvg

#: Default site-local entries: normalisation layers by their usual names.
NORM_PATTERNS = ("*norm*", "*bn*")


class FedBN(FedAvg):
    """Args: ``local_patterns`` (default :data:`NORM_PATTERNS`) and the :class:`FedAvg` options."""

    name: ClassVar[str] = "fedbn"

    def __init__(self, *, local_patterns: list[str] | None = None, **options: Any) -> None:
        patterns = list(NORM_PATTERNS) if local_patterns is None else local_patterns
        if not patterns:
            raise ValueError("fedbn needs at least one local pattern (use fedavg to share everything)")
        super().__init__(local_patterns=patterns, **options)
