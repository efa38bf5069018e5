"""The privacy mapping: parsed with defaults, bad settings and impossible combinations refused with the reason."""

from __future__ import annotations

from typing import Any

import pytest

from jipfed.federation.experiment import ExperimentConfig
from jipfed.privacy.settings import PrivacySettings
from jipfed.training.config import TrainConfig

SITES = ("site-a", "site-b", "site-c")


def make(privacy: dict[str, Any], **overrides: Any) -> ExperimentConfig:
    return ExperimentConfig(name="exp1", sites=SITES, rounds=5, privacy=privacy, **overrides)


def test_client_dp_is_stored_with_its_defaults_and_round_trips() -> None:
    config = make({"client_dp": {"epsilon": 4.0}})
    assert config.privacy["client_dp"]["delta"] == 1e-5 and config.privacy["client_dp"]["clip_norm"] == 0.5
    assert ExperimentConfig.from_json(config.to_json()) == config
    assert PrivacySettings.from_mapping(config.privacy).to_dict() == config.privacy


@pytest.mark.parametrize(
    ("privacy", "overrides", "match"),
    [
        ({"laplace": {}}, {}, r"unknown key\(s\) \['laplace'\]"),
        ({"client_dp": {"epsilon": 8, "sigma": 1}}, {}, r"client_dp: unknown setting\(s\) \['sigma'\]"),
        ({"client_dp": {"epsilon": -1}}, {}, "epsilon must be a finite number"),
        ({"client_dp": {"epsilon": None}}, {}, "set epsilon .* or noise_multiplier"),
        ({"client_dp": {"delta": 0.5}}, {}, "delta must be"),
        ({"client_dp": {"accountant": "gdp"}}, {}, "accountant must be one of"),
        ({"client_dp": {"epsilon": 8, "noise_multiplier": 0.5}}, {}, "beyond the budget 8"),
        ({"client_dp": {}}, {"strategy": "median"}, "does not aggregate a mean"),
        ({"client_dp": {}}, {"plan": "cyclic"}, "needs the parallel plan"),
        ({"client_dp": {"adaptive_clip": True, "clip_count_stddev": 0.1}}, {}, "clip_count_stddev >"),
        ({"secure_aggregation": True}, {"strategy": "trimmed_mean"}, "needs the individual updates"),
        ({"secure_aggregation": True}, {"plan": "cyclic"}, "secure aggregation needs the parallel plan"),
        ({"secure_aggregation": True}, {"encoding": "int8"}, "encoding 'int8' does not apply"),
        ({"secure_aggregation": True}, {}, "hides each update's norm"),
        (
            {"secure_aggregation": {"fraction_bits": 40}},
            {"norm_bound_factor": None},
            "would overflow",
        ),
        (
            {"secure_aggregation": True, "client_dp": {"adaptive_clip": True}},
            {"norm_bound_factor": None},
            "use a fixed clip_norm",
        ),
        ({"sample_dp": True}, {"train": TrainConfig(model="segresnet")}, "supports the models"),
        ({"sample_dp": True}, {"strategy": "scaffold"}, "per-case gradients of the task loss only"),
    ],
)
def test_refused_with_the_reason(privacy: dict[str, Any], overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        make(privacy, **overrides)
    assert "exp1" in str(info.value)


def test_client_dp_with_secure_aggregation_is_accepted_with_a_fixed_clip_norm() -> None:
    config = make({"secure_aggregation": True, "client_dp": {"epsilon": 8.0}}, norm_bound_factor=None)
    assert set(config.privacy) == {"client_dp", "secure_aggregation"}
    assert config.make_strategy().name == "dp_fedavg"


def test_secure_aggregation_capacity_is_checked_against_sites_and_weights() -> None:
    agg = PrivacySettings.from_mapping({"secure_aggregation": {"fraction_bits": 24, "value_bound": 1000.0}})
    assert agg.secure_aggregation is not None
    agg.secure_aggregation.check_capacity(3, 100_000)  # 3 * 1e5 * 1e3 * 2^24 < 2^63
    with pytest.raises(ValueError, match="would overflow"):
        agg.secure_aggregation.check_capacity(10_000, 100_000)
