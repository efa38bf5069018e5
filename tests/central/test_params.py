"""The central DAG's form: PARAMS as JSON schema, experiment_config, Kaapana's ui_forms."""

from __future__ import annotations

import jsonschema
import pytest

from jipfed.central.params import (
    CHAIN_PARAMS,
    PARAMS,
    PRIVACY_PARAMS,
    experiment_config,
    submitted_values,
    ui_forms,
    validate,
    value_schema,
)
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.strategies import STRATEGIES
from jipfed.storage.layout import validate_slug
from jipfed.training.config import SIZES, TrainConfig

ALL = {**PARAMS, **CHAIN_PARAMS}


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_param_is_documented_and_its_default_fits_its_schema(name: str) -> None:
    spec = ALL[name]
    assert spec["title"].strip() and spec["description"].strip()
    assert "default" in spec
    jsonschema.validate(spec["default"], value_schema(name))
    assert "description" not in value_schema(name) and "default" not in value_schema(name)


def test_the_form_offers_what_the_core_knows() -> None:
    assert PARAMS["strategy"]["enum"] == sorted(STRATEGIES)
    assert PARAMS["model_size"]["enum"] == list(SIZES)
    assert PARAMS["plan"]["enum"] == ["parallel", "cyclic"]
    assert PARAMS["transport"]["enum"] == ["pull", "push"] and PARAMS["transport"]["default"] == "pull"
    assert PARAMS["encoding"]["enum"] == ["fp32", "fp16", "int8"]
    assert PARAMS["task"]["enum"] == ["segmentation", "classification"]
    assert set(PARAMS["model"]["enum"]) == {"unet", "segresnet", "densenet", "resnet"}
    assert PARAMS["sites"]["default"] == ["site-a", "site-b", "site-c"]
    assert PARAMS["min_sites"]["default"] is None
    for switch in PRIVACY_PARAMS:
        assert PARAMS[switch]["default"] is False
    assert PARAMS["dp_level"]["enum"] == ["client", "sample"]


@pytest.mark.parametrize("name", ["x", "site-a", "Site_1", "a" * 64, "a" * 65, "-a", "a/b", "a.b", "", "a b"])
def test_slug_pattern_agrees_with_the_store_rule(name: str) -> None:
    try:
        validate_slug(name)
        store_ok = True
    except ValueError:
        store_ok = False
    try:
        jsonschema.validate(name, value_schema("experiment"))
        form_ok = True
    except jsonschema.ValidationError:
        form_ok = False
    assert form_ok is store_ok


def test_defaults_build_a_valid_experiment() -> None:
    config = experiment_config({})
    assert config == ExperimentConfig(
        name="brats-fedavg",
        sites=("site-a", "site-b", "site-c"),
        rounds=5,
        train=TrainConfig(size="small", epochs=1, batch_size=2, lr=0.001),
    )


def test_each_param_reaches_the_experiment_config() -> None:
    config = experiment_config(
        {
            "experiment": "grade-fedadam",
            "sites": ["s1", "s2", "s3"],
            "rounds": 7,
            "task": "classification",
            "model": "densenet",
            "model_size": "medium",
            "datasets": {"s1": "BraTS-2021", "s3": "UPENN-GBM"},
            "local_epochs": 3,
            "learning_rate": 0.02,
            "batch_size": 4,
            "seed": 11,
            "strategy": "fedadam",
            "strategy_kwargs": {"eta": 0.05},
            "order": "rotating",
            "min_sites": 2,
            "round_timeout_s": 600,
            "transport": "push",
            "encoding": "fp16",
            "norm_bound_factor": 5.0,
            "max_update_norm": 40.0,
            "max_site_samples": 500,
            "step": None,
        }
    )
    assert config == ExperimentConfig(
        name="grade-fedadam",
        sites=("s1", "s2", "s3"),
        rounds=7,
        train=TrainConfig(
            task="classification", model="densenet", size="medium", epochs=3, lr=0.02, batch_size=4, seed=11
        ),
        strategy="fedadam",
        strategy_kwargs={"eta": 0.05},
        plan="parallel",
        order="rotating",
        min_sites=2,
        round_timeout_s=600.0,
        encoding="fp16",
        seed=11,
        datasets={"s1": "BraTS-2021", "s3": "UPENN-GBM"},
        transport="push",
        norm_bound_factor=5.0,
        max_update_norm=40.0,
        max_site_samples=500,
    )


def test_local_steps_replace_epochs_and_cyclic_plans_map() -> None:
    config = experiment_config(
        {"plan": "cyclic", "strategy": "fedprox", "strategy_kwargs": {"mu": 0.01}, "local_steps": 5}
    )
    assert (config.plan, config.strategy, dict(config.strategy_kwargs)) == ("cyclic", "fedprox", {"mu": 0.01})
    assert (config.train.epochs, config.train.steps) == (None, 5)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rounds": 0}, "param 'rounds'"),
        ({"rounds": 2.5}, "param 'rounds'"),
        ({"strategy": "fedsgd"}, "param 'strategy'"),
        ({"experiment": "bad/name"}, "param 'experiment'"),
        ({"sites": ["site-a", "site-a"]}, "param 'sites'"),
        ({"sites": []}, "param 'sites'"),
        ({"datasets": {"site a": "x"}}, "param 'datasets'"),
        ({"datasets": {"site-a": ""}}, "param 'datasets'"),
        ({"local_steps": 0}, "param 'local_steps'"),
        ({"learning_rate": 0}, "param 'learning_rate'"),
        ({"encoding": "int4"}, "param 'encoding'"),
        ({"transport": "carrier-pigeon"}, "param 'transport'"),
        ({"round_timeout_s": -1}, "param 'round_timeout_s'"),
        ({"strategy_kwargs": [1]}, "param 'strategy_kwargs'"),
        ({"step": -1}, "param 'step'"),
        ({"min_sites": 4}, "min_sites 4 exceeds the 3 site"),
        ({"task": "classification"}, "params task/model"),
        ({"strategy": "fedadam", "strategy_kwargs": {"lr": 1}}, "strategy 'fedadam'"),
        ({"plan": "cyclic", "strategy": "median"}, "cyclic plan"),
        ({"datasets": {"site-z": "x"}}, "datasets names sites that are not in the experiment"),
        ({"rouns": 3}, "unknown param(s) ['rouns']"),
    ],
)
def test_invalid_values_name_the_param(params: dict, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        experiment_config(params)
    assert message in str(raised.value)


def test_client_dp_from_the_form_is_stored_with_the_experiment() -> None:
    config = experiment_config({"differential_privacy": True, "dp_epsilon": 6.0, "dp_clip_norm": 0.3})
    assert config.privacy["client_dp"]["epsilon"] == 6.0 and config.privacy["client_dp"]["clip_norm"] == 0.3
    assert config.make_strategy().report() == {}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"secure_aggregation": True, "strategy": "median"}, "needs the individual updates"),
        ({"secure_aggregation": True, "plan": "cyclic"}, "secure aggregation needs the parallel plan"),
        (
            {
                "secure_aggregation": True,
                "norm_bound_factor": None,
                "differential_privacy": True,
                "dp_adaptive_clip": True,
            },
            "use a fixed clip_norm",
        ),
        ({"secure_aggregation": True}, "hides each update's norm"),
        ({"differential_privacy": True, "dp_level": "sample", "model": "segresnet"}, "supports the models"),
        ({"differential_privacy": True, "dp_noise_multiplier": 0.5}, "beyond the budget 8"),
    ],
)
def test_privacy_switches_that_cannot_work_are_refused_with_the_reason(params: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        experiment_config(params)


def test_secure_aggregation_from_the_form_is_stored_with_the_experiment() -> None:
    config = experiment_config({"secure_aggregation": True, "norm_bound_factor": None})
    assert config.privacy["secure_aggregation"]["upload_timeout_s"] == 300.0
    assert config.privacy["secure_aggregation"]["key_timeout_s"] == 900.0
    config = experiment_config(
        {
            "secure_aggregation": True,
            "norm_bound_factor": None,
            "secagg_key_timeout_s": 120,
            "secagg_upload_timeout_s": 60.5,
        }
    )
    assert config.privacy["secure_aggregation"]["key_timeout_s"] == 120.0
    assert config.privacy["secure_aggregation"]["upload_timeout_s"] == 60.5
    with pytest.raises(ValueError, match="secagg_key_timeout_s"):
        experiment_config({"secure_aggregation": True, "norm_bound_factor": None, "secagg_key_timeout_s": 0})


def test_client_dp_with_secure_aggregation_from_the_form_is_stored() -> None:
    config = experiment_config(
        {
            "secure_aggregation": True,
            "norm_bound_factor": None,
            "differential_privacy": True,
            "dp_epsilon": 6.0,
        }
    )
    assert config.privacy["client_dp"]["epsilon"] == 6.0 and "secure_aggregation" in config.privacy


def test_validate_fills_in_defaults() -> None:
    values = validate({"rounds": 3})
    assert values["rounds"] == 3 and values["strategy"] == "fedavg" and values["step"] is None
    assert set(values) == set(ALL)


def test_ui_forms_mirror_params_for_kaapana() -> None:
    forms = ui_forms()
    assert list(forms) == ["workflow_form"]
    form = forms["workflow_form"]
    assert form["type"] == "object"
    assert list(form["properties"]) == list(PARAMS)  # same order as the Airflow form
    for name, prop in form["properties"].items():
        spec = PARAMS[name]
        for key in ("type", "title", "description", "default", "enum", "items", "minimum", "maximum"):
            assert prop.get(key) == spec.get(key), (name, key)
        assert prop["readOnly"] is False
        assert prop["required"] is (name in ("experiment", "sites"))
    forms["workflow_form"]["properties"]["sites"]["default"].append("site-z")
    assert PARAMS["sites"]["default"] == ["site-a", "site-b", "site-c"]  # a copy, not the shared schema


def test_submitted_values_take_kaapanas_workflow_form_over_params() -> None:
    params = {"experiment": "from-params", "rounds": 2, "airflow_internal": 1}
    assert submitted_values(params, None) == {"experiment": "from-params", "rounds": 2}
    conf = {"workflow_form": {"experiment": "from-kaapana", "strategy": "fedprox"}}
    assert submitted_values(params, conf) == {
        "experiment": "from-kaapana",
        "rounds": 2,
        "strategy": "fedprox",
    }
    with pytest.raises(ValueError, match=r"unknown param\(s\) \['single_execution'\]"):
        submitted_values(params, {"workflow_form": {"single_execution": True}})
    with pytest.raises(ValueError, match="must be an object"):
        submitted_values(params, {"workflow_form": ["x"]})


def test_airflow_params_built_from_the_schema_validate_the_same_way() -> None:
    from jipfed.operators.compat import Param, ParamValidationError

    for name, spec in ALL.items():
        param = Param(**spec)
        assert param.resolve() == spec["default"], name
        assert param.description == spec["description"]
    with pytest.raises(ParamValidationError):
        Param(**PARAMS["strategy"]).resolve("fedsgd")
    with pytest.raises(ParamValidationError):
        Param(**PARAMS["sites"]).resolve(["site-a", "no/slash"])


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [
        ("scaffold", {"server_lr": 1.0}),
        ("fednova", {"server_lr_schedule": {"kind": "cosine", "rounds": 5, "final": 0.1}}),
        ("feddyn", {"alpha": 0.01}),
        ("fedbn", {"local_patterns": ["*norm*"]}),
        ("fedavg", {"local_lr_schedule": {"kind": "step", "every": 2, "gamma": 0.5}}),
    ],
)
def test_the_form_builds_the_heterogeneity_strategies(strategy: str, kwargs: dict) -> None:
    assert strategy in PARAMS["strategy"]["enum"]
    config = experiment_config({"strategy": strategy, "strategy_kwargs": kwargs})
    assert config.strategy == strategy
    assert config.make_strategy().config() == {**config.make_strategy().config(), **kwargs}


def test_initial_model_from_the_form_is_stored_with_the_experiment() -> None:
    assert experiment_config({}).initial_model is None
    config = experiment_config({"experiment": "dp-fine", "initial_model": "public-pre"})
    assert config.initial_model == "public-pre"
    assert ExperimentConfig.from_json(config.to_json()).initial_model == "public-pre"
    with pytest.raises(ValueError, match="param 'initial_model'"):
        experiment_config({"initial_model": "no/slug"})
    with pytest.raises(ValueError, match="initial_model cannot be the experiment itself"):
        experiment_config({"experiment": "same", "initial_model": "same"})
    assert ui_forms()["workflow_form"]["properties"]["initial_model"]["default"] is None
