"""Checks an update must pass before it is used (FLARE-style: stale round, wrong site, NaN, shape).

Every failure raises :class:`UpdateRejected` carrying the site, the round and a one-line reason
that the central writes into ``aggregate.json``. The codec runs these checks while decoding, so a
decoded :class:`~jipfed.federation.update.ModelUpdate` is always a checked one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from jipfed.federation.update import (
    GLOBAL_SITE,
    KINDS,
    TensorSpec,
    UpdateManifest,
    control_specs,
    is_control,
    spec_of,
    validate_sha256,
)
from jipfed.storage.layout import validate_round, validate_slug


class UpdateRejected(Exception):
    """An update failed validation; ``reason`` says why in one line."""

    def __init__(self, site: str, round: int, reason: str) -> None:
        self.site = site
        self.round = round
        self.reason = reason
        super().__init__(f"update from site {site!r} for round {round} rejected: {reason}")


@dataclass(frozen=True, eq=False, kw_only=True)
class ExpectedUpdate:
    """What the receiver expects, against which an incoming update is checked.

    Attributes:
        experiment, round, site, config_hash: must equal the manifest's.
        tensors: the model's spec (name -> TensorSpec); names, shapes and dtypes must match exactly.
        kinds: accepted kinds.
        min_samples: smallest accepted ``n_samples`` (1 for site updates, 0 for a global model).
        max_delta_norm: bound on the L2 norm of the delta over all float tensors; None = no bound.
        reference: the global weights of this round, needed to bound the norm of a ``"weights"``
            update (delta = weights - reference); not needed otherwise.
    """

    experiment: str
    round: int
    site: str
    config_hash: str
    tensors: Mapping[str, TensorSpec]
    kinds: tuple[str, ...] = KINDS
    min_samples: int = 1
    max_delta_norm: float | None = None
    reference: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate_slug(self.experiment, "experiment")
        validate_round(self.round)
        validate_slug(self.site, "site")
        validate_sha256(self.config_hash, "config_hash")
        if (
            not isinstance(self.tensors, Mapping)
            or not self.tensors
            or not all(isinstance(s, TensorSpec) for s in self.tensors.values())
        ):
            raise ValueError(
                f"tensors must be a non-empty mapping of name -> TensorSpec, got {self.tensors!r}"
            )
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        kinds = tuple(self.kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if (
            isinstance(self.min_samples, bool)
            or not isinstance(self.min_samples, int)
            or self.min_samples < 0
        ):
            raise ValueError(f"min_samples must be an int >= 0, got {self.min_samples!r}")
        bound = self.max_delta_norm
        if bound is not None and (
            isinstance(bound, bool)
            or not isinstance(bound, (int, float))
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ValueError(f"max_delta_norm must be a finite number > 0 or None, got {bound!r}")
        if bound is not None and "weights" in kinds and self.reference is None:
            raise ValueError(
                "max_delta_norm with kind 'weights' accepted needs reference (the global weights)"
            )
        if self.reference is not None and spec_of(self.reference) != dict(self.tensors):
            raise ValueError("reference weights do not match the expected tensor specs")

    @classmethod
    def from_weights(
        cls, weights: Mapping[str, torch.Tensor], *, keep_reference: bool = False, **kwargs: object
    ) -> ExpectedUpdate:
        """Expectation whose spec is that of ``weights`` (the current global model).

        ``keep_reference=True`` also keeps ``weights`` as the reference for norm bounds.
        """
        return cls(tensors=spec_of(weights), reference=weights if keep_reference else None, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def for_global(
        cls, *, experiment: str, round: int, config_hash: str, tensors: Mapping[str, TensorSpec]
    ) -> ExpectedUpdate:
        """Expectation for a global model: site :data:`GLOBAL_SITE`, kind weights, n_samples >= 0."""
        return cls(
            experiment=experiment,
            round=round,
            site=GLOBAL_SITE,
            config_hash=config_hash,
            tensors=tensors,
            kinds=("weights",),
            min_samples=0,
        )


def check_manifest(manifest: UpdateManifest, expected: ExpectedUpdate) -> None:
    """Identity, kind, sample count and tensor specs of ``manifest`` against ``expected``."""
    site, round_ = manifest.site, manifest.round

    def reject(reason: str) -> UpdateRejected:
        return UpdateRejected(site, round_, reason)

    for attr in ("experiment", "round", "site", "config_hash"):
        got, want = getattr(manifest, attr), getattr(expected, attr)
        if got != want:
            raise reject(f"manifest {attr} is {got!r}, expected {want!r}")
    if manifest.kind not in expected.kinds:
        raise reject(f"kind {manifest.kind!r} not accepted (accepted: {list(expected.kinds)})")
    if manifest.n_samples < expected.min_samples:
        raise reject(f"n_samples {manifest.n_samples} < {expected.min_samples}")
    check_specs(manifest.tensors, expected.tensors, site, round_, what="manifest")


def check_specs(
    got: Mapping[str, TensorSpec], want: Mapping[str, TensorSpec], site: str, round: int, *, what: str
) -> None:
    """Exactly the expected tensor names, each with the expected shape and dtype.

    Control variates (SCAFFOLD, ``control/<weight>``) the expectation does not list yet (the
    round-0 model carries none) are accepted only as a complete set, one per trainable float
    weight, each with its weight's shape and dtype.
    """
    if any(is_control(n) for n in got) and not any(is_control(n) for n in want):
        want = {**want, **control_specs(want)}
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if missing or extra:
        raise UpdateRejected(
            site,
            round,
            f"{what} tensor names differ from the model: missing {missing[:5]}, extra {extra[:5]}"
            + (f" ({len(missing)} missing, {len(extra)} extra)" if len(missing) + len(extra) > 10 else ""),
        )
    for name, spec in want.items():
        if got[name].shape != spec.shape:
            raise UpdateRejected(
                site, round, f"{what} tensor {name!r} has shape {got[name].shape}, expected {spec.shape}"
            )
        if got[name].dtype != spec.dtype:
            raise UpdateRejected(
                site, round, f"{what} tensor {name!r} has dtype {got[name].dtype}, expected {spec.dtype}"
            )


def count_non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf values (0 for integer tensors).

    Fast path: a sum in the tensor's own dtype is finite iff no value is NaN/Inf, unless finite
    values overflow it; only then (or when something is wrong) the exact, allocating count runs.
    """
    if not tensor.is_floating_point() or math.isfinite(float(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(name: str, tensor: torch.Tensor, site: str, round: int) -> None:
    """Reject a float tensor holding NaN or Inf (integer tensors are always finite)."""
    n_bad = count_non_finite(tensor)
    if n_bad:
        raise UpdateRejected(site, round, f"tensor {name!r} has {n_bad} NaN/Inf values")


def delta_sq_norm(
    name: str, tensor: torch.Tensor, kind: str, reference: Mapping[str, torch.Tensor] | None
) -> float:
    """Squared L2 norm of one float tensor's delta (``tensor`` itself for kind delta), in float64.

    Control variates are not model changes: they count 0.
    """
    if is_control(name):
        return 0.0
    if kind == "weights":
        if reference is None:
            raise ValueError("bounding the delta norm of a 'weights' update needs ExpectedUpdate.reference")
        delta = tensor.to(torch.float64) - reference[name].to(torch.float64)
        return float(delta.square().sum())
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64) ** 2)


def check_norm(sq_norm: float, expected: ExpectedUpdate, site: str, round: int) -> None:
    """Reject when the delta's L2 norm ``sqrt(sq_norm)`` exceeds ``expected.max_delta_norm``."""
    if expected.max_delta_norm is not None and math.sqrt(sq_norm) > expected.max_delta_norm:
        raise UpdateRejected(
            site,
            round,
            f"delta L2 norm {math.sqrt(sq_norm):.6g} exceeds the bound {expected.max_delta_norm:.6g}",
        )


def check_tensors(
    tensors: Mapping[str, torch.Tensor], manifest: UpdateManifest, expected: ExpectedUpdate
) -> None:
    """Decoded tensors: names / shapes / dtypes as expected, finite, delta norm within the bound."""
    site, round_ = manifest.site, manifest.round
    check_specs(spec_of(tensors), expected.tensors, site, round_, what="payload")
    sq_norm = 0.0
    for name, tensor in tensors.items():
        check_finite(name, tensor, site, round_)
        if expected.max_delta_norm is not None and tensor.is_floating_point():
            sq_norm += delta_sq_norm(name, tensor, manifest.kind, expected.reference)
    check_norm(sq_norm, expected, site, round_)
