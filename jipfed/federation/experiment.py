"""``ExperimentConfig``: what a federated experiment is, fixed when it starts.

The central stores it as ``experiments/<name>/config.json`` (write-once); its sha256 goes into
every manifest, so a site can tell which experiment and which exact settings a model belongs to.
It is frozen, validated when built (ValueError naming the experiment and the bad value) and
round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jipfed.federation.names import (
    DEFAULT_MAX_SITE_SAMPLES,
    DEFAULT_NORM_BOUND_FACTOR,
    ENCODINGS,
    GLOBAL_SITE,
)
from jipfed.federation.plans import ORDERS, PLANS, Plan, make_plan
from jipfed.storage.base import canonical_json
from jipfed.storage.layout import validate_slug
from jipfed.training.config import TrainConfig

if TYPE_CHECKING:  # torch: only when a strategy is built, never when the central DAG is parsed
    from jipfed.federation.strategies import Strategy

CONFIG_FORMAT = 1
#: Strategies whose aggregation a cyclic plan can honour: it passes weights on, it does not average.
CYCLIC_STRATEGIES = ("fedavg", "fedprox")
#: How the central hands a step to the sites: it triggers their site DAG (push) or they poll it (pull).
DISPATCH_TRANSPORTS = ("pull", "push")


@dataclass(frozen=True)
class ExperimentConfig:
    """A federated experiment.

    Attributes:
        name: experiment name (slug); names the store prefix ``experiments/<name>/``.
        sites: participating site ids (slugs), in plan order.
        rounds: number of rounds (parallel: aggregations; cyclic: passes over all sites), >= 1.
        train: local training settings shared by every site (its ``epochs`` / ``steps`` are the
            local work per round; see ``proportional_steps`` for cyclic plans).
        strategy: server strategy name, see :func:`jipfed.federation.strategies.make_strategy`.
        strategy_kwargs: keyword arguments of the strategy (JSON values).
        plan: ``"parallel"`` (one step = one round, all sites from the same global model) or
            ``"cyclic"`` (one step = one hop, one site trains from the previous site's model).
        order: cyclic site order, ``"fixed"`` or ``"rotating"`` (shifted by one each round).
        proportional_steps: cyclic only: each site's local steps proportional to its training
            cases (``site_samples``), ``train.steps`` for a site of average size (with
            ``train.epochs`` the local work is proportional to site size already).
        site_samples: training cases per site declared up front (needed by
            ``proportional_steps``); empty when unknown.
        min_sites: quorum: the fewest valid updates a parallel step aggregates (a cyclic hop
            always needs its one site); None = every site.
        round_timeout_s: how long the central waits for a step's updates, in seconds.
        encoding: how updates travel, ``"fp32"``, ``"fp16"`` or ``"int8"`` (int8 needs deltas, so
            not the cyclic plan, which sends weights).
        max_update_norm: reject updates whose delta has a larger L2 norm; None = no bound.
        max_site_samples: the most training cases one site's update may claim (its FedAvg
            weight); a site's claim is also bounded by the cohort size it reported for the step.
        norm_bound_factor: clip an update whose delta norm exceeds this many times the lower
            median of the round's update norms (:mod:`jipfed.federation.bounds`); None = off.
        privacy: privacy settings (:mod:`jipfed.privacy.settings`: ``client_dp``, ``sample_dp``,
            ``secure_aggregation``); empty = off. Stored with every default spelled out.
        seed: seeds the initial global model and the plan's rotation.
        in_channels: image channels of the model input (4 = FLAIR, T1, T1c, T2).
        datasets: per-site cohort selector (the StudyDescription of the studies a site trains
            on); a site without an entry uses its own default.
        transport: how steps reach the sites: ``"pull"`` (sites poll the central endpoint, no
            inbound port at a site) or ``"push"`` (the central triggers each site's DAG).
        case_selection: per site, which of its cases it trains on (a model line's run:
            ``{"line", "since", "until", "replay", "seed"}``, see :mod:`jipfed.lines.selection`);
            a site without an entry trains on its whole training split. Empty: left out of
            ``to_dict`` (the config hash of experiments without it is unchanged).
        initial_model: the name of a finished experiment in the same store whose final model is
            this experiment's round-0 global model (a warm start, e.g. a model pretrained on public
            data that DP then only fine-tunes); its tensors must match this config's model. None:
            the network drawn from ``seed``; left out of ``to_dict`` (config hashes unchanged).
    """

    name: str
    sites: tuple[str, ...]
    rounds: int
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: str = "fedavg"
    strategy_kwargs: Mapping[str, Any] = field(default_factory=dict)
    plan: str = "parallel"
    order: str = "fixed"
    proportional_steps: bool = False
    site_samples: Mapping[str, int] = field(default_factory=dict)
    min_sites: int | None = None
    round_timeout_s: float = 3600.0
    encoding: str = "fp32"
    max_update_norm: float | None = None
    max_site_samples: int = DEFAULT_MAX_SITE_SAMPLES
    norm_bound_factor: float | None = DEFAULT_NORM_BOUND_FACTOR
    privacy: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    in_channels: int = 4
    datasets: Mapping[str, str] = field(default_factory=dict)
    transport: str = "pull"
    case_selection: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    initial_model: str | None = None

    def __post_init__(self) -> None:
        validate_slug(self.name, "experiment name")
        where = f"experiment {self.name!r}"
        sites = tuple(self.sites) if isinstance(self.sites, (list, tuple)) else None
        if not sites:
            raise ValueError(f"{where}: sites must be a non-empty list of site ids, got {self.sites!r}")
        for site in sites:
            validate_slug(site, "site id")
            if site == GLOBAL_SITE:
                raise ValueError(f"{where}: site id {GLOBAL_SITE!r} is reserved for the global model")
        if len(set(sites)) != len(sites):
            raise ValueError(f"{where}: duplicate site ids in {list(sites)}")
        object.__setattr__(self, "sites", sites)
        _check_int(self.rounds, f"{where}: rounds", 1)
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"{where}: train must be a TrainConfig, got {type(self.train).__name__}")
        if self.plan not in PLANS:
            raise ValueError(f"{where}: plan must be one of {tuple(PLANS)}, got {self.plan!r}")
        if self.order not in ORDERS:
            raise ValueError(f"{where}: order must be one of {ORDERS}, got {self.order!r}")
        if not isinstance(self.proportional_steps, bool):
            raise ValueError(
                f"{where}: proportional_steps must be a boolean, got {self.proportional_steps!r}"
            )
        object.__setattr__(
            self, "strategy_kwargs", _json_mapping(self.strategy_kwargs, f"{where}: strategy_kwargs")
        )
        object.__setattr__(self, "privacy", _json_mapping(self.privacy, f"{where}: privacy"))
        samples = _json_mapping(self.site_samples, f"{where}: site_samples")
        unknown = sorted(set(samples) - set(sites))
        if unknown:
            raise ValueError(f"{where}: site_samples names sites that are not in the experiment: {unknown}")
        for site, n in samples.items():
            _check_int(n, f"{where}: site_samples[{site!r}]", 1)
        object.__setattr__(self, "site_samples", samples)
        if self.proportional_steps:
            if self.plan != "cyclic":
                raise ValueError(f"{where}: proportional_steps applies to the cyclic plan only")
            if self.train.steps is None:
                raise ValueError(
                    f"{where}: proportional_steps needs train.steps (with train.epochs each site's "
                    "local work is proportional to its size already)"
                )
            missing = sorted(set(sites) - set(samples))
            if missing:
                raise ValueError(
                    f"{where}: proportional_steps needs site_samples for every site; missing {missing}"
                )
        min_sites = len(sites) if self.min_sites is None else self.min_sites
        _check_int(min_sites, f"{where}: min_sites", 1)
        if min_sites > len(sites):
            raise ValueError(f"{where}: min_sites {min_sites} exceeds the {len(sites)} site(s)")
        object.__setattr__(self, "min_sites", min_sites)
        timeout = self.round_timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"{where}: round_timeout_s must be a finite number > 0, got {timeout!r}")
        object.__setattr__(self, "round_timeout_s", float(timeout))
        if self.encoding not in ENCODINGS:
            raise ValueError(f"{where}: encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        if self.plan == "cyclic" and self.encoding == "int8":
            raise ValueError(f"{where}: int8 encoding needs delta updates; the cyclic plan sends weights")
        if self.plan == "cyclic" and self.strategy not in CYCLIC_STRATEGIES:
            raise ValueError(
                f"{where}: the cyclic plan passes the model from site to site and aggregates nothing; "
                f"strategy {self.strategy!r} would have no effect (use one of {CYCLIC_STRATEGIES})"
            )
        bound = self.max_update_norm
        if bound is not None and (
            isinstance(bound, bool)
            or not isinstance(bound, (int, float))
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ValueError(f"{where}: max_update_norm must be a finite number > 0 or None, got {bound!r}")
        _check_int(self.max_site_samples, f"{where}: max_site_samples", 1)
        factor = self.norm_bound_factor
        if factor is not None and (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or not math.isfinite(factor)
            or factor < 1
        ):
            raise ValueError(
                f"{where}: norm_bound_factor must be a finite number >= 1 or None, got {factor!r}"
            )
        _check_int(self.seed, f"{where}: seed", 0)
        _check_int(self.in_channels, f"{where}: in_channels", 1)
        datasets = _json_mapping(self.datasets, f"{where}: datasets")
        unknown = sorted(set(datasets) - set(sites))
        if unknown:
            raise ValueError(f"{where}: datasets names sites that are not in the experiment: {unknown}")
        for site, selector in datasets.items():
            if not isinstance(selector, str) or not selector.strip():
                raise ValueError(f"{where}: datasets[{site!r}] must be a non-empty string, got {selector!r}")
        object.__setattr__(self, "datasets", datasets)
        if self.transport not in DISPATCH_TRANSPORTS:
            raise ValueError(
                f"{where}: transport must be one of {DISPATCH_TRANSPORTS}, got {self.transport!r}"
            )
        selection = _json_mapping(self.case_selection, f"{where}: case_selection")
        unknown = sorted(set(selection) - set(sites))
        if unknown:
            raise ValueError(f"{where}: case_selection names sites that are not in the experiment: {unknown}")
        for site, rule in selection.items():
            _json_mapping(rule, f"{where}: case_selection[{site!r}]")
        object.__setattr__(self, "case_selection", selection)
        if self.initial_model is not None:
            validate_slug(self.initial_model, f"{where}: initial_model (an experiment name)")
            if self.initial_model == self.name:
                raise ValueError(f"{where}: initial_model cannot be the experiment itself")
        object.__setattr__(self, "privacy", self._checked_privacy(where))
        self.make_strategy()  # unknown strategy names and bad kwargs fail now, not in round 5

    def _checked_privacy(self, where: str) -> dict[str, Any]:
        """``privacy`` with every default spelled out; ValueError when it cannot work with the rest."""
        if not self.privacy:
            return {}
        from jipfed.privacy.settings import PrivacySettings

        try:
            settings = PrivacySettings.from_mapping(self.privacy)
            settings.check_combination(self)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return settings.to_dict()

    @property
    def min_quorum(self) -> int:
        """``min_sites`` as an int (never None after validation)."""
        return int(self.min_sites or len(self.sites))

    def make_strategy(self) -> Strategy:
        """A fresh server strategy built from ``strategy`` and ``strategy_kwargs``."""
        from jipfed.federation.strategies import make_strategy

        try:
            strategy = make_strategy(self.strategy, **dict(self.strategy_kwargs))
            if self.privacy.get("sample_dp"):
                from jipfed.federation.strategies.dp_sgd_fit import DPSGDFit
                from jipfed.privacy.settings import SampleDP

                sample_dp = dict(self.privacy["sample_dp"])
                if sample_dp.get("planned_rounds") is None:  # what a noise chosen from the budget spans
                    sample_dp["planned_rounds"] = self.rounds
                strategy = DPSGDFit(inner=strategy, dp=SampleDP(**sample_dp))
            if self.privacy.get("client_dp"):
                from jipfed.federation.strategies.dp_fedavg import DPFedAvg
                from jipfed.privacy.settings import ClientDP

                strategy = DPFedAvg(
                    inner=strategy,
                    dp=ClientDP(**self.privacy["client_dp"]),
                    rounds=self.rounds,
                    n_sites=len(self.sites),
                )
            return strategy
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"experiment {self.name!r}: strategy {self.strategy!r}: {exc}") from exc

    def make_plan(self) -> Plan:
        """The compute plan: which sites train in which step."""
        if self.plan == "cyclic":
            return make_plan("cyclic", sites=self.sites, rounds=self.rounds, order=self.order, seed=self.seed)
        return make_plan("parallel", sites=self.sites, rounds=self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (the content of ``config.json``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(
            format=CONFIG_FORMAT,
            sites=list(self.sites),
            train=self.train.to_dict(),
            strategy_kwargs=dict(self.strategy_kwargs),
            site_samples=dict(self.site_samples),
            privacy=dict(self.privacy),
            datasets=dict(self.datasets),
            case_selection=dict(self.case_selection),
        )
        if not self.case_selection:
            del data["case_selection"]
        if self.initial_model is None:
            del data["initial_model"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`; unknown keys and other formats are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"experiment config must be a JSON object, got {type(data).__name__}")
        values = dict(data)
        fmt = values.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ValueError(f"unsupported experiment config format {fmt!r}; expected {CONFIG_FORMAT}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown experiment config key(s) {unknown}")
        train = values.get("train", {})
        if not isinstance(train, Mapping):
            raise ValueError(f"experiment config 'train' must be an object, got {type(train).__name__}")
        values["train"] = TrainConfig.from_dict(dict(train))
        if isinstance(values.get("sites"), list):
            values["sites"] = tuple(values["sites"])
        return cls(**values)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): the bytes whose sha256 is the config hash."""
        return canonical_json(self.to_dict()).decode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> ExperimentConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _json_mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{what} must be a mapping with string keys, got {value!r}")
    try:
        canonical_json(dict(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must hold JSON values only (no NaN): {exc}") from exc
    return dict(value)
