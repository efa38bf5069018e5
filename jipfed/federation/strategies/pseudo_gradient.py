"""The pseudo-gradient of server optimisers and which state-dict entries they may move.

``mean_delta`` is the weighted mean of the sites' deltas (``site model - global``), formed from the
deltas themselves: a coordinate no site changed is exactly 0, never the float32 rounding noise of
``mean(site models) - global``. ``is_buffer`` tells normalisation running statistics (and other
non-trainable buffers) from trainable weights by name: server optimisers step trainable float
weights only; buffers take the FedAvg value (or stay at the sites when the training config keeps
them local, in which case they are not in the exchanged state at all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from jipfed.federation.aggregate import WeightedMean
from jipfed.federation.update import BUFFER_PATTERNS, UpdateManifest, UpdateSource, is_buffer

__all__ = ["BUFFER_PATTERNS", "is_buffer", "mean_delta", "site_delta"]


class _Delta(Mapping[str, torch.Tensor]):
    """``weights - global`` per name, computed when read (a "weights" update as a delta)."""

    def __init__(
        self, weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor]
    ) -> None:
        self._weights, self._global = weights, global_weights

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._weights[name] - self._global[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def site_delta(
    update: UpdateSource, global_weights: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """The update's tensors as deltas relative to ``global_weights`` (read lazily)."""
    if update.manifest.kind == "delta":
        return update.tensors
    return _Delta(update.tensors, global_weights)


def mean_delta(
    global_weights: Mapping[str, torch.Tensor],
    updates: Iterable[UpdateSource],
    *,
    weight: Callable[[UpdateManifest], float] = lambda manifest: float(manifest.n_samples),
    accumulate_dtype: torch.dtype | None = None,
    integer_mode: str = "max",
) -> dict[str, torch.Tensor]:
    """Weighted mean of the sites' deltas (default weight: ``n_samples``), streamed one update at a time.

    Float entries are in the model's dtype (accumulated in ``accumulate_dtype``); integer entries
    are the element-wise max (or first site's) delta, so ``global + delta`` is FedAvg's value.
    Raises ValueError when the updates' names differ from the global model's.
    """
    acc = WeightedMean(accumulate_dtype=accumulate_dtype, integer_mode=integer_mode)
    for update in updates:
        acc.add(site_delta(update, global_weights), weight(update.manifest))
    result = acc.result()
    if result.keys() != global_weights.keys():
        missing = sorted(set(global_weights) - set(result))[:5]
        extra = sorted(set(result) - set(global_weights))[:5]
        raise ValueError(f"updates do not match the global model: missing {missing}, extra {extra}")
    return result
