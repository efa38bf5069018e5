"""The experiment's ``privacy`` mapping, validated, and the combinations that cannot work together.

``ExperimentConfig.privacy`` is empty (off) or holds any of::

    {"client_dp": {"epsilon": 8.0, "delta": 1e-5, "clip_norm": 0.5, "noise_multiplier": null,
                   "adaptive_clip": false, "target_quantile": 0.5, "clip_lr": 0.2,
                   "clip_count_stddev": null, "accountant": "rdp"},
     "sample_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "epsilon": null,
                   "accountant": "rdp", "planned_rounds": null, "ema_decay": null, "trainable": null,
                   "augment_views": 1},
     "secure_aggregation": {"fraction_bits": 24, "value_bound": 1000.0, "upload_timeout_s": 300.0,
                            "key_timeout_s": 900.0}}

Client-level DP (DP-FedAvg, McMahan et al. 2018): every site's update is clipped to L2 norm
``clip_norm`` (C) and Gaussian noise of std ``noise_multiplier * C`` is added to their sum.
``noise_multiplier`` None = the smallest one that keeps ``epsilon`` after the configured rounds;
a given ``noise_multiplier`` whose ε after all rounds exceeds ``epsilon`` is refused. Sample-level
DP: DP-SGD at every site (opacus). No torch here: the central DAG file reads these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jipfed.federation.experiment import ExperimentConfig

ACCOUNTANTS = ("rdp", "prv")
#: Parts whose building blocks exist but that the central / site round does not run yet, and why.
NOT_WIRED: dict[str, str] = {}
#: Strategies whose server step is a function of the (noised) mean of the sites' deltas.
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedbn")
#: Models DP-SGD can train (mirrors ``jipfed.privacy.sample_dp.DP_SGD_MODELS``; no torch here).
DP_SGD_MODELS = ("unet",)
#: Most augmented views per case DP-SGD averages (each costs one more forward / backward pass).
MAX_AUGMENT_VIEWS = 32
#: Fixed-point arithmetic of secure aggregation is modulo 2**RING_BITS (signed values below 2**63).
RING_BITS = 64


def _number(value: object, what: str, *, low: float, high: float = math.inf, open_low: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and not ((value > low if open_low else value >= low) and value <= high):
        ok = False
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{what} must be a finite number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def _optional_number(value: object, what: str, *, low: float, high: float = math.inf) -> float | None:
    return None if value is None else _number(value, what, low=low, high=high)


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(reason)


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-native values (tuples as lists), equal to its JSON round trip."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def _from_mapping(cls: type, data: object, what: str) -> Any:
    if data is True:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be an object of settings (or true for the defaults), got {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown setting(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class ClientDP:
    """DP-FedAvg settings; see the module docstring. ``clip_count_stddev`` None = 2 x noise multiplier."""

    epsilon: float | None = 8.0
    delta: float = 1e-5
    clip_norm: float = 0.5
    noise_multiplier: float | None = None
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _optional_number(self.epsilon, "epsilon", low=0.0)
        _number(self.delta, "delta", low=0.0, high=0.1)
        _number(self.clip_norm, "clip_norm", low=0.0)
        _optional_number(self.noise_multiplier, "noise_multiplier", low=0.0)
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("set epsilon (the budget) or noise_multiplier (or both)")
        if not isinstance(self.adaptive_clip, bool):
            raise ValueError(f"adaptive_clip must be true or false, got {self.adaptive_clip!r}")
        _number(self.target_quantile, "target_quantile", low=0.0, high=1.0)
        _number(self.clip_lr, "clip_lr", low=0.0)
        _optional_number(self.clip_count_stddev, "clip_count_stddev", low=0.0)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD at each site: per-sample gradients clipped to ``max_grad_norm``, noise ``noise_multiplier``.

    ``epsilon`` (optional): a site refuses to train a round that would take its own ε beyond it.
    ``noise_multiplier`` None: each site takes the smallest one that keeps its own ε within
    ``epsilon`` after ``planned_rounds`` rounds of its first round's steps and sample rate (the
    experiment fills ``planned_rounds`` with its rounds), and keeps it for later rounds.
    ``ema_decay`` (optional, in [0, 1)): the site sends the exponential moving average of its DP-SGD
    iterates over the round (started at the first step's weights) instead of the last iterate;
    post-processing of private weights, so it costs no ε and averages part of the noise out.
    ``trainable`` (optional): fnmatch patterns of the parameter names DP-SGD trains; the others stay
    at the global model's values (frozen, not clipped or noised: fewer noised weights, e.g. only
    the last layer when fine-tuning a public model). None = every parameter.
    ``augment_views`` (augmentation multiplicity, De et al. 2022): each case's gradient is the mean
    over this many augmented views of it (the case as loaded and random flips / small shifts)
    before it is clipped; still one clipped gradient per case, so the accounting is unchanged.
    1 = off (one view, today's DP-SGD).
    """

    noise_multiplier: float | None = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon: float | None = None
    accountant: str = "rdp"
    planned_rounds: int | None = None
    ema_decay: float | None = None
    trainable: tuple[str, ...] | None = None
    augment_views: int = 1

    def __post_init__(self) -> None:
        views = self.augment_views
        _require(
            isinstance(views, int) and not isinstance(views, bool) and 1 <= views <= MAX_AUGMENT_VIEWS,
            f"augment_views must be an integer in [1, {MAX_AUGMENT_VIEWS}], got {views!r}",
        )
        if self.trainable is not None:
            patterns = self.trainable
            _require(
                isinstance(patterns, (list, tuple))
                and len(patterns) > 0
                and all(isinstance(p, str) and p for p in patterns),
                f"trainable must be a non-empty list of parameter name patterns or empty (all), got {patterns!r}",
            )
            object.__setattr__(self, "trainable", tuple(patterns))
        _optional_number(self.noise_multiplier, "noise_multiplier", low=0.0)
        if self.ema_decay is not None:
            _number(self.ema_decay, "ema_decay", low=0.0, high=1.0, open_low=False)
            _require(
                self.ema_decay < 1.0, f"ema_decay must be below 1 (1 would never move), got {self.ema_decay}"
            )
        _require(
            self.noise_multiplier is not None or self.epsilon is not None,
            "sample-level DP: an empty noise_multiplier is chosen from the epsilon budget; set epsilon",
        )
        rounds = self.planned_rounds
        _require(
            rounds is None or (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1),
            f"planned_rounds must be an integer >= 1, got {rounds!r}",
        )
        _number(self.max_grad_norm, "max_grad_norm", low=0.0)
        _number(self.delta, "delta", low=0.0, high=0.1)
        _optional_number(self.epsilon, "epsilon", low=0.0)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


@dataclass(frozen=True)
class SecureAggregation:
    """Fixed point: ``round(x * 2**fraction_bits)`` of values clamped to ``[-value_bound, value_bound]``."""

    fraction_bits: int = 24
    value_bound: float = 1000.0
    #: Seconds after the last key of an attempt arrived within which every site of it must upload its
    #: masked update; a site still missing then dropped out, the attempt is retried without it.
    upload_timeout_s: float = 300.0
    #: Seconds after the first key of an attempt within which every site of it must post its key (a
    #: slower site trains longer, so this is generous); a site still without a key then dropped out
    #: before key agreement: the attempt is retried with the sites that posted one if they make the
    #: quorum, else the step fails with the reason.
    key_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        bits = self.fraction_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not 8 <= bits <= 40:
            raise ValueError(f"fraction_bits must be an integer in [8, 40], got {bits!r}")
        _number(self.value_bound, "value_bound", low=0.0)
        _number(self.upload_timeout_s, "upload_timeout_s", low=0.0)
        _number(self.key_timeout_s, "key_timeout_s", low=0.0)

    def check_capacity(self, n_sites: int, max_weight: int) -> None:
        """ValueError unless ``n_sites`` sums of ``max_weight * value_bound`` fit the signed ring."""
        largest = n_sites * max_weight * self.value_bound * 2.0**self.fraction_bits
        if largest >= 2.0 ** (RING_BITS - 1):
            raise ValueError(
                f"secure aggregation cannot encode {n_sites} sites x weight up to {max_weight} x values up "
                f"to {self.value_bound} with {self.fraction_bits} fraction bits in a {RING_BITS}-bit ring "
                "(it would overflow): lower max_site_samples, value_bound or fraction_bits"
            )


@dataclass(frozen=True)
class PrivacySettings:
    """The parsed ``privacy`` mapping; each part None when off."""

    client_dp: ClientDP | None = None
    sample_dp: SampleDP | None = None
    secure_aggregation: SecureAggregation | None = None

    @classmethod
    def from_mapping(cls, privacy: Mapping[str, Any]) -> PrivacySettings:
        """Parse ``privacy``; ValueError naming the unknown key or bad setting."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(privacy) - known)
        if unknown:
            raise ValueError(f"privacy: unknown key(s) {unknown}; known: {sorted(known)}")
        parts = {"client_dp": ClientDP, "sample_dp": SampleDP, "secure_aggregation": SecureAggregation}
        return cls(
            **{
                name: None if privacy.get(name) in (None, False) else _from_mapping(part, privacy[name], name)
                for name, part in parts.items()
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Inverse of :meth:`from_mapping` with every default spelled out (off parts left out)."""
        return {f.name: settings_dict(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}

    def check_combination(self, experiment: ExperimentConfig) -> None:
        """ValueError with the reason when these settings cannot work with the rest of ``experiment``.

        Called while the experiment config validates itself (its other fields are checked already).
        """
        e = experiment
        if self.client_dp is not None:
            _require(
                e.plan == "parallel",
                "client-level DP needs the parallel plan: a cyclic plan hands one site's model to the next, "
                "there is no sum to add the noise to",
            )
            _require(
                e.strategy in MEAN_STRATEGIES,
                f"client-level DP calibrates noise to a sum of clipped updates; strategy {e.strategy!r} does "
                f"not aggregate a mean (use one of {MEAN_STRATEGIES})",
            )
        if self.sample_dp is not None:
            if e.train.model not in DP_SGD_MODELS:
                raise ValueError(
                    f"sample-level DP (DP-SGD) supports the models {DP_SGD_MODELS}; {e.train.model!r} has "
                    "BatchNorm or in-place activations opacus cannot compute per-case gradients for"
                )
            if e.strategy in ("scaffold", "feddyn", "fedprox") or e.train.fedprox_mu > 0:
                raise ValueError(
                    f"sample-level DP clips per-case gradients of the task loss only; strategy {e.strategy!r} "
                    "adds a regulariser or gradient correction it would not cover (use e.g. fedavg or fedadam)"
                )
        if self.secure_aggregation is not None:
            self._check_secure_aggregation(self.secure_aggregation, e)
        missing = [name for name in NOT_WIRED if getattr(self, name) is not None]
        if missing:
            raise ValueError(
                f"privacy: {missing[0]} is not available in the round protocol yet: {NOT_WIRED[missing[0]]}"
            )

    def _check_secure_aggregation(self, agg: SecureAggregation, e: ExperimentConfig) -> None:
        _require(
            e.plan == "parallel",
            "secure aggregation needs the parallel plan: a cyclic hop has one site, its masked update could "
            "not be unmasked without revealing it",
        )
        _require(
            e.strategy in MEAN_STRATEGIES,
            f"secure aggregation reveals only the sum of the updates; strategy {e.strategy!r} needs the "
            f"individual updates (use one of {MEAN_STRATEGIES})",
        )
        # fewer than 2 sites is refused by start_experiment: a site's view of the config lists only itself
        if e.encoding != "fp32":
            raise ValueError(
                f"secure aggregation sends fixed-point masked integers; encoding {e.encoding!r} does not apply "
                "(use fp32)"
            )
        if e.norm_bound_factor is not None or e.max_update_norm is not None:
            raise ValueError(
                "secure aggregation hides each update's norm from the central: set norm_bound_factor and "
                "max_update_norm to empty (client-level DP clips at the sites instead)"
            )
        if self.client_dp is not None and self.client_dp.adaptive_clip:
            raise ValueError(
                "adaptive clipping needs each site's clipped / not clipped bit at the central; with secure "
                "aggregation use a fixed clip_norm"
            )
        agg.check_capacity(len(e.sites), e.max_site_samples)
