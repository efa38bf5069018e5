"""Starting an experiment (config + round-0 model), failing it, and opening a plan step.

The round-0 global model is drawn from the config's seed, or (``initial_model``) is another
finished experiment's final model: a warm start. ``start_experiment`` and ``open_step`` are
idempotent; ``open_step`` changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from jipfed.federation.codec import encode_global
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.finalize import FINAL_MODEL
from jipfed.federation.plans import local_steps_for
from jipfed.federation.round_io import input_keys, running_state, update_kind
from jipfed.federation.tickets import ProtocolError, StepTicket, load_config
from jipfed.federation.update import UpdateManifest
from jipfed.storage.base import ObjectNotFoundError
from jipfed.storage.state import ExperimentState, ExperimentStore, IntegrityError, Status, sha256_hex
from jipfed.training.models import build_model, shared_parameter_names

logger = logging.getLogger(__name__)


def initial_weights(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model: the configured network drawn from ``config.seed`` (shared entries)."""
    train = replace(config.train, seed=config.seed)
    model = build_model(train, in_channels=config.in_channels)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in shared_parameter_names(model, train.bn_policy)}


def warm_start_weights(exp_store: ExperimentStore, config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The final model of ``config.initial_model`` (same store), checked against this config's model.

    Raises:
        ValueError: the source experiment is missing or unfinished, its final model does not match
            its manifest, or its tensors (names, shapes, dtypes) are not this config's model's;
            the message names both experiments.
    """
    from safetensors.torch import load as load_tensors  # safetensors: never a pickle

    source = config.initial_model
    where = f"experiment {config.name!r}: initial_model {source!r}"
    src = ExperimentStore(exp_store.store, str(source))
    try:
        status = src.load_state().status
    except ObjectNotFoundError:
        raise ValueError(f"{where}: no such experiment in the store") from None
    if status is not Status.FINISHED:
        raise ValueError(
            f"{where} is {status.value}, not finished: only a final model can start another experiment"
        )
    payload = src.store.get_bytes(src.layout.final(f"{FINAL_MODEL}.safetensors"))
    manifest = src.store.get_json(src.layout.final(f"{FINAL_MODEL}.json"))
    if sha256_hex(payload) != manifest.get("sha256"):
        raise ValueError(f"{where}: its final model does not match the sha256 of its manifest")
    weights = load_tensors(payload)
    expected = initial_weights(config)
    mismatch = [
        f"{name}: {_spec(weights.get(name))} != {_spec(expected.get(name))}"
        for name in sorted(set(weights) | set(expected))
        if _spec(weights.get(name)) != _spec(expected.get(name))
    ]
    if mismatch:
        raise ValueError(
            f"{where}: its final model is not this experiment's model ({config.train.model} "
            f"{config.train.size}, {config.in_channels} input channels): {len(mismatch)} tensor(s) differ "
            f"(source != expected), e.g. {'; '.join(mismatch[:3])}"
        )
    return weights


def _spec(tensor: torch.Tensor | None) -> str:
    return (
        "missing" if tensor is None else f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
    )


def save_initial_global(
    exp_store: ExperimentStore, config: ExperimentConfig, config_hash: str, weights: dict[str, torch.Tensor]
) -> None:
    """Store ``weights`` as the round-0 global model unless one is stored already (write-once)."""
    if exp_store.has_global(0):
        return
    encoded = encode_global(weights, experiment=config.name, round=0, config_hash=config_hash)
    exp_store.save_global(0, encoded.payload, encoded.manifest.to_dict())
    logger.info("experiment %s: initial global model %s", config.name, encoded.manifest.sha256)


def _local_work(config: ExperimentConfig, site: str) -> dict[str, int]:
    train = config.train
    if train.steps is None:
        return {"epochs": int(train.epochs or 1)}
    if config.proportional_steps:
        return {"steps": local_steps_for(site, train.steps, config.site_samples, proportional=True)}
    return {"steps": train.steps}


def start_experiment(exp_store: ExperimentStore, config: ExperimentConfig) -> ExperimentState:
    """Store the (immutable) config and the round-0 global model; mark the experiment running.

    The round-0 model is drawn from ``config.seed``, or is ``config.initial_model``'s final model
    (checked before anything is stored). Idempotent: calling it again with the same config returns
    the current state (a failed experiment goes back to running, a finished one stays finished).

    Raises:
        ValueError: ``config.name`` is not the store's experiment, or the initial model is refused
            (see :func:`warm_start_weights`).
        ConfigConflictError: a different config is already stored.
    """
    if config.name != exp_store.experiment:
        raise ValueError(f"config is for experiment {config.name!r}, the store for {exp_store.experiment!r}")
    if config.privacy.get("secure_aggregation") and len(config.sites) < 2:  # a site's view has 1 site: here
        raise ValueError(
            f"experiment {config.name!r}: secure aggregation needs at least 2 sites (a sum of one update is the update)"
        )
    weights = None
    if not exp_store.has_global(0):
        weights = warm_start_weights(exp_store, config) if config.initial_model else initial_weights(config)
    config_hash = exp_store.save_config(config.to_dict())
    state = exp_store.load_or_create_state()
    if weights is not None:
        save_initial_global(exp_store, config, config_hash, weights)
    if state.status in (Status.CREATED, Status.FAILED):
        state = state.start()
        exp_store.save_state(state)
        logger.info(
            "experiment %s: running (config %s, %d steps)",
            config.name,
            config_hash[:12],
            config.make_plan().n_steps,
        )
    return state


def fail_experiment(exp_store: ExperimentStore, reason: str) -> ExperimentState:
    """Mark the experiment failed with ``reason`` (e.g. a quorum missed after the timeout).

    Uploads are refused while it is failed; ``start_experiment`` resumes it at the step it stopped.
    """
    state = exp_store.load_state().fail(reason)
    exp_store.save_state(state)
    logger.warning("experiment %s failed: %s", exp_store.experiment, reason)
    return state


def open_step(exp_store: ExperimentStore, step: int) -> StepTicket:
    """The ticket of plan step ``step``: the model to start from and what each selected site does.

    Reads only; a completed step may be opened again (same ticket), a step after the next one may not.

    Raises:
        ProtocolError: the experiment is not running, or ``step`` is beyond the next step.
        ObjectNotFoundError / IntegrityError: the start model is missing or corrupt.
    """
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    state = running_state(exp_store, f"open step {step}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < plan.n_steps:
        raise ProtocolError(f"experiment {config.name!r}: step must be in [0, {plan.n_steps}), got {step!r}")
    if step > state.next_step:
        raise ProtocolError(
            f"experiment {config.name!r}: step {step} cannot open before step {state.next_step}"
        )
    ps = plan.step(step)
    keys = input_keys(exp_store, ps)
    manifest = UpdateManifest.from_dict(exp_store.store.get_json(keys[1]))
    if manifest.sha256 is None:
        raise IntegrityError(f"manifest {keys[1]!r} has no sha256")
    strategy = config.make_strategy()
    return StepTicket(
        experiment=config.name,
        config_hash=config_hash,
        step=ps.step,
        round=ps.round,
        hop=ps.hop,
        sites=ps.sites,
        is_last_in_round=ps.is_last_in_round,
        kind=update_kind(config),
        encoding=config.encoding,
        model_key=keys[0],
        manifest_key=keys[1],
        model_sha256=manifest.sha256,
        fit_config=strategy.configure_fit(ps.round),
        local_work={site: _local_work(config, site) for site in ps.sites},
        timeout_s=config.round_timeout_s,
    )
