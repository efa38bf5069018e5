"""Influence bounds: how much one site's update may weigh and move the global model.

* **Sample count.** A site's ``n_samples`` is its FedAvg weight. It may not exceed the cohort size
  the site reported when it took the step's work (``rounds/<r>/cohorts/<site>.json``) nor the
  experiment's ``max_site_samples``; beyond that the update is rejected with the reason recorded.
  The bound is an int comparison, so even a 309-digit claim is refused without an OverflowError.
* **Update norm.** With ``norm_bound_factor`` f (on by default), an update whose L2 delta norm
  exceeds f × the lower median of the round's update norms is scaled down to that norm (clipped),
  and the clip is recorded in ``aggregate.json`` under ``bounded``. ``max_update_norm`` (absolute)
  still rejects outright (:mod:`jipfed.federation.validation`).

Pure functions; :mod:`jipfed.federation.rounds` calls them while it decides a step.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from jipfed.federation.names import DEFAULT_MAX_SITE_SAMPLES, DEFAULT_NORM_BOUND_FACTOR  # noqa: F401
from jipfed.federation.update import ModelUpdate, is_buffer, is_control

#: Fewest updates in a round for a relative (median) bound to mean anything.
MIN_UPDATES_FOR_MEDIAN = 2


def sample_bound(cap: int, cohort: int | None) -> int:
    """The largest ``n_samples`` a site may claim: the cap, or its reported cohort if smaller."""
    return cap if cohort is None else min(cap, cohort)


def sample_count_problem(n_samples: object, cap: int, cohort: int | None) -> str | None:
    """Why ``n_samples`` is out of bounds, or None when it is within them."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        return f"n_samples must be an int >= 1, got {str(n_samples)[:40]!r}"
    bound = sample_bound(cap, cohort)
    if n_samples <= bound:
        return None
    shown = str(n_samples) if n_samples < 10**15 else f"a {len(str(n_samples))}-digit number"
    source = (
        f"the cohort of {cohort} case(s) the site reported"
        if cohort is not None and cohort < cap
        else (f"the experiment's max_site_samples {cap}")
    )
    return f"n_samples {shown} exceeds {source}"


def _bounded_tensors(update: ModelUpdate) -> dict[str, torch.Tensor]:
    """The tensors the norm bound covers: float model weights (no buffers, no control variates)."""
    return {
        name: t
        for name, t in update.tensors.items()
        if t.is_floating_point() and not is_control(name) and not is_buffer(name)
    }


def delta_norm(update: ModelUpdate, start: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the update's change to the model (``weights - start`` for a weights update)."""
    total = 0.0
    for name, tensor in _bounded_tensors(update).items():
        delta = tensor.double() if update.kind == "delta" else tensor.double() - start[name].double()
        total += float(torch.sum(delta * delta))
    return math.sqrt(total)


@dataclass(frozen=True)
class Clip:
    """One clipped update: its norm, the bound, and the factor its delta was scaled by."""

    norm: float
    bound: float
    scale: float

    def reason(self) -> str:
        return f"update norm {self.norm:.4g} clipped to {self.bound:.4g} (x{self.scale:.3g})"

    def to_dict(self) -> dict[str, float | str]:
        return {"norm": self.norm, "bound": self.bound, "scale": self.scale, "reason": self.reason()}


def norm_clips(norms: Mapping[str, float], factor: float | None) -> dict[str, Clip]:
    """Which updates to clip: norm > ``factor`` × the lower median of ``norms`` (none below 2 updates)."""
    if factor is None or len(norms) < MIN_UPDATES_FOR_MEDIAN:
        return {}
    bound = factor * statistics.median_low(sorted(norms.values()))
    if bound <= 0:
        return {}
    return {site: Clip(norm, bound, bound / norm) for site, norm in sorted(norms.items()) if norm > bound}


def scaled(update: ModelUpdate, start: Mapping[str, torch.Tensor], scale: float) -> ModelUpdate:
    """``update`` with its change to the model scaled by ``scale`` (same kind, same manifest)."""
    tensors = dict(update.tensors)
    for name, tensor in _bounded_tensors(update).items():
        if update.kind == "delta":
            tensors[name] = (tensor * scale).to(tensor.dtype)
        else:
            base = start[name]
            tensors[name] = (base + (tensor - base) * scale).to(tensor.dtype)
    return ModelUpdate(tensors=tensors, manifest=update.manifest)
