"""The central DAG's trigger form: one JSON schema per param, the ExperimentConfig built from it.

``PARAMS`` (name → JSON-schema property with ``title``, ``description`` and ``default``) is the
single source of the form. The DAG turns each entry into an Airflow ``Param`` (Airflow's trigger
form renders type, enum, minimum/maximum, items, title, description and section);
:func:`ui_forms` renders the same schema as Kaapana's ``ui_forms["workflow_form"]``. Values
submitted through either form become an :class:`~jipfed.federation.experiment.ExperimentConfig`
with :func:`experiment_config`. No Airflow import here.

``CHAIN_PARAMS`` are set by the DAG itself when it triggers the experiment's next step; they are
not experiment settings.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from jipfed.federation.experiment import DISPATCH_TRANSPORTS, ExperimentConfig
from jipfed.federation.names import (
    DEFAULT_MAX_SITE_SAMPLES,
    DEFAULT_NORM_BOUND_FACTOR,
    ENCODINGS,
    STRATEGY_NAMES,
)
from jipfed.federation.plans import ORDERS, PLANS
from jipfed.storage.layout import _SLUG_RE
from jipfed.training.config import MODELS_BY_TASK, SIZES, TASKS, TrainConfig

#: The slug rule of experiment and site names (``jipfed.storage.layout.validate_slug``).
SLUG_PATTERN = _SLUG_RE.pattern
#: The privacy switches; the ``dp_*`` params configure differential privacy when it is on.
PRIVACY_PARAMS = ("differential_privacy", "secure_aggregation")
DP_LEVELS = ("client", "sample")

_EXPERIMENT, _TRAINING, _FEDERATION, _PRIVACY = "Experiment", "Local training", "Federation", "Privacy"
_SLUG_TEXT = "1-64 letters, digits, '_' or '-', starting with a letter or digit"

PARAMS: dict[str, dict[str, Any]] = {
    "experiment": {
        "type": "string",
        "pattern": SLUG_PATTERN,
        "default": "brats-fedavg",
        "title": "Experiment name",
        "description": f"Names the experiment in the model store ({_SLUG_TEXT}). Triggering again "
        "with the same name and settings resumes it; other settings under a used name are refused.",
        "section": _EXPERIMENT,
    },
    "sites": {
        "type": "array",
        "items": {"type": "string", "pattern": SLUG_PATTERN},
        "minItems": 1,
        "uniqueItems": True,
        "default": ["site-a", "site-b", "site-c"],
        "title": "Sites",
        "description": f"Participating site ids ({_SLUG_TEXT}), in plan order.",
        "section": _EXPERIMENT,
    },
    "initial_model": {
        "type": ["string", "null"],
        "pattern": SLUG_PATTERN,
        "default": None,
        "title": "Start from experiment",
        "description": "Empty: the model starts from the seed. Otherwise the name of a finished "
        "experiment in the same store whose final model is round 0's model (a warm start, e.g. "
        "pretrained on public data); it must be the same network (model, size, channels).",
        "section": _EXPERIMENT,
    },
    "rounds": {
        "type": "integer",
        "minimum": 1,
        "maximum": 1000,
        "default": 5,
        "title": "Rounds",
        "description": "Federated rounds (parallel plan: aggregations; cyclic plan: passes over all sites).",
        "section": _EXPERIMENT,
    },
    "task": {
        "type": "string",
        "enum": list(TASKS),
        "default": "segmentation",
        "title": "Task",
        "description": "Segmentation (WT/TC/ET regions) or classification (tumour grade).",
        "section": _EXPERIMENT,
    },
    "model": {
        "type": "string",
        "enum": [m for task in TASKS for m in MODELS_BY_TASK[task]],
        "default": "unet",
        "title": "Model",
        "description": "Network; "
        + "; ".join(f"{task}: {', '.join(MODELS_BY_TASK[task])}" for task in TASKS)
        + ".",
        "section": _EXPERIMENT,
    },
    "model_size": {
        "type": "string",
        "enum": list(SIZES),
        "default": "small",
        "title": "Model size",
        "description": "Channel preset: micro (a few thousand weights, for sample-level DP), tiny (tests), small, medium.",
        "section": _EXPERIMENT,
    },
    "datasets": {
        "type": "object",
        "propertyNames": {"pattern": SLUG_PATTERN},
        "additionalProperties": {"type": "string", "minLength": 1},
        "default": {},
        "title": "Dataset per site",
        "description": 'Site id -> StudyDescription of the studies it trains on, e.g. {"site-a": "BraTS"}; '
        "a site without an entry uses its own default.",
        "section": _EXPERIMENT,
    },
    "local_epochs": {
        "type": "integer",
        "minimum": 1,
        "default": 1,
        "title": "Local epochs",
        "description": "Passes over each site's training cases per round (ignored when local steps is set).",
        "section": _TRAINING,
    },
    "local_steps": {
        "type": ["integer", "null"],
        "minimum": 1,
        "default": None,
        "title": "Local steps",
        "description": "Optimiser steps per round instead of epochs; empty = use local epochs.",
        "section": _TRAINING,
    },
    "learning_rate": {
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 0.001,
        "title": "Learning rate",
        "description": "Learning rate of the sites' local optimiser (Adam).",
        "section": _TRAINING,
    },
    "batch_size": {
        "type": "integer",
        "minimum": 1,
        "maximum": 256,
        "default": 2,
        "title": "Batch size",
        "description": "Cases per local optimiser step.",
        "section": _TRAINING,
    },
    "seed": {
        "type": "integer",
        "minimum": 0,
        "default": 0,
        "title": "Seed",
        "description": "Seeds the initial global model, the sites' shuffling and the cyclic rotation.",
        "section": _TRAINING,
    },
    "strategy": {
        "type": "string",
        "enum": sorted(STRATEGY_NAMES),
        "default": "fedavg",
        "title": "Strategy",
        "description": "Server aggregation strategy (the cyclic plan takes fedavg or fedprox). For "
        "heterogeneous sites: fednova (unequal local steps), scaffold (control variates), feddyn "
        "(dynamic regulariser), fedbn (normalisation layers stay at the sites).",
        "section": _FEDERATION,
    },
    "strategy_kwargs": {
        "type": "object",
        "default": {},
        "title": "Strategy settings",
        "description": 'Keyword arguments of the strategy, e.g. {"eta": 0.05} for fedadam or {"mu": 0.01} '
        "for fedprox; empty = the strategy's defaults. FedAvg- and FedOpt-family strategies also take "
        '"local_patterns" (names kept at the sites, e.g. ["*norm*"]) and "local_lr_schedule", FedOpt-family '
        '"server_lr_schedule" (e.g. {"kind": "cosine", "rounds": 40, "final": 0.1}).',
        "section": _FEDERATION,
    },
    "plan": {
        "type": "string",
        "enum": list(PLANS),
        "default": "parallel",
        "title": "Compute plan",
        "description": "parallel: every site trains from the same global model each round; cyclic: the "
        "model travels from site to site (one DAG run per hop).",
        "section": _FEDERATION,
    },
    "order": {
        "type": "string",
        "enum": list(ORDERS),
        "default": "fixed",
        "title": "Cyclic order",
        "description": "Cyclic plan only: the same site order every round (fixed) or shifted by one (rotating).",
        "section": _FEDERATION,
    },
    "min_sites": {
        "type": ["integer", "null"],
        "minimum": 1,
        "default": None,
        "title": "Quorum (min sites)",
        "description": "Fewest valid updates a round aggregates; empty = every site.",
        "section": _FEDERATION,
    },
    "round_timeout_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 3600,
        "title": "Round timeout (s)",
        "description": "How long the central waits for a step's updates; a site that has not answered "
        "by then is recorded as timed out.",
        "section": _FEDERATION,
    },
    "norm_bound_factor": {
        "type": ["number", "null"],
        "minimum": 1,
        "default": DEFAULT_NORM_BOUND_FACTOR,
        "title": "Update norm bound (x median)",
        "description": "An update whose change to the model is larger than this many times the round's "
        "median update norm is clipped to it (recorded in aggregate.json); empty = off.",
        "section": _FEDERATION,
    },
    "max_update_norm": {
        "type": ["number", "null"],
        "exclusiveMinimum": 0,
        "default": None,
        "title": "Update norm limit (absolute)",
        "description": "Reject an update whose change to the model has a larger L2 norm; empty = no limit.",
        "section": _FEDERATION,
    },
    "max_site_samples": {
        "type": "integer",
        "minimum": 1,
        "default": DEFAULT_MAX_SITE_SAMPLES,
        "title": "Max cases per site",
        "description": "The most training cases one site's update may claim (its aggregation weight); "
        "a site's claim is also bounded by the cohort size it reported for the step.",
        "section": _FEDERATION,
    },
    "transport": {
        "type": "string",
        "enum": list(DISPATCH_TRANSPORTS),
        "default": "pull",
        "title": "Transport",
        "description": "pull: sites poll the central endpoint (no inbound port at a site); push: the "
        "central triggers each site's DAG through Connection jipfed_site_<site-id>.",
        "section": _FEDERATION,
    },
    "encoding": {
        "type": "string",
        "enum": list(ENCODINGS),
        "default": "fp32",
        "title": "Update encoding",
        "description": "How updates travel: fp32, fp16 or int8 (int8 needs the parallel plan).",
        "section": _FEDERATION,
    },
    "differential_privacy": {
        "type": "boolean",
        "default": False,
        "title": "Differential privacy",
        "description": "Train with (epsilon, delta) differential privacy at the level below; epsilon per "
        "round and in total is recorded in every round's aggregate.json. A plan whose rounds would exceed "
        "the budget is refused when it starts.",
        "section": _PRIVACY,
    },
    "dp_level": {
        "type": "string",
        "enum": list(DP_LEVELS),
        "default": "client",
        "title": "DP level",
        "description": "client: each site's update is clipped and the central adds Gaussian noise to their "
        "sum (DP-FedAvg; protects a whole site; needs a mean-based strategy and the parallel plan; with "
        "secure aggregation each site adds its share of the noise instead). "
        "sample: DP-SGD at each site (protects one case; opacus; unet only; each site's epsilon is "
        "recorded with its update and a site refuses a round beyond the budget).",
        "section": _PRIVACY,
    },
    "dp_epsilon": {
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 8.0,
        "title": "DP budget epsilon",
        "description": "Total epsilon after all rounds; with an empty noise multiplier the noise is chosen "
        "to spend exactly this.",
        "section": _PRIVACY,
    },
    "dp_delta": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 0.1,
        "default": 1e-5,
        "title": "DP delta",
        "description": "delta of the (epsilon, delta) guarantee; well below 1 / number of protected units.",
        "section": _PRIVACY,
    },
    "dp_clip_norm": {
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 0.5,
        "title": "DP clip norm",
        "description": "client: the L2 norm each site's model change is clipped to (the initial one with "
        "adaptive clipping); sample: per-case gradient norm.",
        "section": _PRIVACY,
    },
    "dp_noise_multiplier": {
        "type": ["number", "null"],
        "exclusiveMinimum": 0,
        "default": None,
        "title": "DP noise multiplier",
        "description": "Noise std / clip norm; empty = the smallest that keeps the budget after all rounds "
        "(sample level: each site chooses its own from its number of cases and steps in its first round).",
        "section": _PRIVACY,
    },
    "dp_adaptive_clip": {
        "type": "boolean",
        "default": False,
        "title": "DP adaptive clipping",
        "description": "client: adapt the clip norm towards the median update norm each round (Andrew et "
        "al. 2021; the count is noised and accounted). Not with secure aggregation.",
        "section": _PRIVACY,
    },
    "dp_ema_decay": {
        "type": ["number", "null"],
        "minimum": 0,
        "exclusiveMaximum": 1,
        "default": None,
        "title": "DP-SGD iterate averaging",
        "description": "sample level: each site sends the exponential moving average of its DP-SGD weights "
        "over the round with this decay (e.g. 0.9) instead of the last step's; averages part of the noise "
        "out at no privacy cost. Empty = off.",
        "section": _PRIVACY,
    },
    "dp_augment_views": {
        "type": "integer",
        "minimum": 1,
        "maximum": 32,
        "default": 1,
        "title": "DP-SGD augmented views",
        "description": "sample level: each case's gradient is the mean over this many augmented views (flips, "
        "small shifts) before clipping (augmentation multiplicity); no privacy cost, this many times the "
        "training work. 1 = off.",
        "section": _PRIVACY,
    },
    "dp_trainable": {
        "type": "array",
        "items": {"type": "string", "minLength": 1},
        "default": [],
        "title": "DP-SGD trainable parameters",
        "description": "sample level: parameter name patterns (fnmatch, e.g. model.2.*) DP-SGD trains; the "
        "others keep the global model's values (fewer noised weights, e.g. when fine-tuning from another "
        "experiment's model). Empty = all.",
        "section": _PRIVACY,
    },
    "secure_aggregation": {
        "type": "boolean",
        "default": False,
        "title": "Secure aggregation",
        "description": "Pairwise-masked updates so the central learns only their sum (X25519 + ChaCha20 "
        "masks; a site that drops out after key agreement makes the round retry without it). Needs a "
        "mean-based strategy, the parallel plan, fp32 and an empty norm bound. With client DP the sites add "
        "the noise themselves (fixed clip norm only).",
        "section": _PRIVACY,
    },
    "secagg_key_timeout_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 900.0,
        "title": "Secure aggregation: key deadline (s)",
        "description": "Seconds after an attempt's first key within which every site must post its key (a slow "
        "site trains longer, so be generous); a site without a key then dropped out before key agreement and "
        "the round goes on without it if the others make the quorum.",
        "section": _PRIVACY,
    },
    "secagg_upload_timeout_s": {
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 300.0,
        "title": "Secure aggregation: upload deadline (s)",
        "description": "Seconds after the last key within which every site must upload its masked update; a "
        "site still missing then dropped out and the round is retried without it (reason recorded).",
        "section": _PRIVACY,
    },
}

CHAIN_PARAMS: dict[str, dict[str, Any]] = {
    "step": {
        "type": ["integer", "null"],
        "minimum": 0,
        "default": None,
        "title": "Step (set by the DAG)",
        "description": "Leave empty to start or resume an experiment with the settings above. The DAG "
        "sets it (with the experiment name) when it triggers the experiment's next step; such a run "
        "reads the stored settings, not the form.",
        "section": "Chain",
    },
}

#: Keys of a param entry that are not part of its value's JSON schema.
NON_SCHEMA_KEYS = ("default", "description", "section")


def value_schema(name: str) -> dict[str, Any]:
    """The JSON schema a value of param ``name`` must match (its entry without default/description)."""
    spec = PARAMS.get(name) or CHAIN_PARAMS.get(name)
    if spec is None:
        raise KeyError(f"unknown param {name!r}; known: {sorted({**PARAMS, **CHAIN_PARAMS})}")
    return {k: copy.deepcopy(v) for k, v in spec.items() if k not in NON_SCHEMA_KEYS}


def form_schema() -> dict[str, Any]:
    """All params as one JSON schema of an object (unknown keys allowed: Airflow adds its own)."""
    return {
        "type": "object",
        "properties": {name: value_schema(name) for name in {**PARAMS, **CHAIN_PARAMS}},
    }


def with_defaults(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over the defaults of every param."""
    values = {name: copy.deepcopy(spec["default"]) for name, spec in {**PARAMS, **CHAIN_PARAMS}.items()}
    values.update(params)
    return values


def validate(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` (missing ones take their defaults) against the schema; return the full values.

    Raises:
        ValueError: a value does not match its param's schema (the message names the param), or
            a key is not a param (a typo must not fall back to a default silently).
    """
    import jsonschema  # shipped with Airflow; the core has no hard dependency on it

    values = with_defaults(params)
    unknown = sorted(set(values) - set(PARAMS) - set(CHAIN_PARAMS))
    if unknown:
        raise ValueError(f"unknown param(s) {unknown}; known: {sorted({**PARAMS, **CHAIN_PARAMS})}")
    for name, value in values.items():
        try:
            jsonschema.validate(value, value_schema(name))
        except jsonschema.ValidationError as exc:
            raise ValueError(f"param {name!r}: {exc.message}") from None
    return values


def experiment_config(params: Mapping[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig the form's values describe (``step`` is ignored).

    Raises:
        ValueError: a value is invalid (the message names the param), or the values do not form a
            valid experiment together (e.g. secure aggregation with median aggregation: the reason).
    """
    p = validate(params)
    name = p["experiment"]
    try:
        train = TrainConfig(
            task=p["task"],
            model=p["model"],
            size=p["model_size"],
            epochs=None if p["local_steps"] is not None else p["local_epochs"],
            steps=p["local_steps"],
            batch_size=p["batch_size"],
            lr=float(p["learning_rate"]),
            seed=p["seed"],
        )
    except ValueError as exc:
        raise ValueError(
            f"experiment {name!r}: params task/model/model_size/local_epochs/local_steps/learning_rate/"
            f"batch_size: {exc}"
        ) from None
    privacy = privacy_settings(p)
    try:
        return ExperimentConfig(
            name=name,
            sites=tuple(p["sites"]),
            rounds=p["rounds"],
            train=train,
            strategy=p["strategy"],
            strategy_kwargs=p["strategy_kwargs"],
            plan=p["plan"],
            order=p["order"],
            min_sites=p["min_sites"],
            round_timeout_s=p["round_timeout_s"],
            encoding=p["encoding"],
            norm_bound_factor=p["norm_bound_factor"],
            max_update_norm=p["max_update_norm"],
            max_site_samples=p["max_site_samples"],
            privacy=privacy,
            seed=p["seed"],
            datasets=p["datasets"],
            transport=p["transport"],
            initial_model=p["initial_model"],
        )
    except ValueError as exc:
        raise ValueError(f"the params do not form a valid experiment: {exc}") from None


def privacy_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """``ExperimentConfig.privacy`` from the validated form values (``{}`` with both switches off)."""
    privacy: dict[str, Any] = {}
    if values["differential_privacy"]:
        if values["dp_level"] == "client":
            privacy["client_dp"] = {
                "epsilon": values["dp_epsilon"],
                "delta": values["dp_delta"],
                "clip_norm": values["dp_clip_norm"],
                "noise_multiplier": values["dp_noise_multiplier"],
                "adaptive_clip": values["dp_adaptive_clip"],
            }
        else:
            privacy["sample_dp"] = {
                "epsilon": values["dp_epsilon"],
                "delta": values["dp_delta"],
                "max_grad_norm": values["dp_clip_norm"],
                "noise_multiplier": values["dp_noise_multiplier"],
                "ema_decay": values["dp_ema_decay"],
                "augment_views": values["dp_augment_views"],
                "trainable": list(values["dp_trainable"]) or None,
            }
    if values["secure_aggregation"]:
        privacy["secure_aggregation"] = {
            "key_timeout_s": values["secagg_key_timeout_s"],
            "upload_timeout_s": values["secagg_upload_timeout_s"],
        }
    return privacy


#: Keys of a param entry Kaapana's workflow form does not take.
_NOT_IN_KAAPANA = ("section",)


def ui_forms() -> dict[str, Any]:
    """Kaapana's ``ui_forms``: the same params as ``{"workflow_form": {"type": "object", "properties"}}``.

    Kaapana's frontend renders each property (title, description, type, default, enum, items,
    minimum/maximum, ``readOnly``, ``required``) and passes the values to the run as
    ``conf["workflow_form"]`` (see :func:`submitted_values`).
    """
    properties = {}
    for name, spec in PARAMS.items():
        prop = {k: copy.deepcopy(v) for k, v in spec.items() if k not in _NOT_IN_KAAPANA}
        prop["readOnly"] = False
        prop["required"] = name in ("experiment", "sites")
        properties[name] = prop
    return {"workflow_form": {"type": "object", "properties": properties}}


def submitted_values(params: Mapping[str, Any], conf: Mapping[str, Any] | None) -> dict[str, Any]:
    """The form values of a run: Airflow's params, overlaid by Kaapana's ``conf["workflow_form"]``.

    Only the keys of ``PARAMS`` and ``CHAIN_PARAMS`` are kept from ``params`` (Airflow may hold
    others); a ``workflow_form`` must be an object whose keys are params.
    """
    known = {**PARAMS, **CHAIN_PARAMS}
    values = {k: v for k, v in params.items() if k in known}
    form = (conf or {}).get("workflow_form")
    if form is not None:
        if not isinstance(form, Mapping):
            raise ValueError(f"conf['workflow_form'] must be an object, got {type(form).__name__}")
        unknown = sorted(set(form) - set(known))
        if unknown:
            raise ValueError(f"conf['workflow_form'] has unknown param(s) {unknown}")
        values.update(form)
    return values
