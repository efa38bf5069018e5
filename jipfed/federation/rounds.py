"""The central side of the round protocol: one function per action a central DAG task performs.

``start_experiment`` → for each plan step: ``open_step`` → (sites train and upload; each upload
goes through ``accept_update``) → ``aggregate_step`` → … → ``finalize``. See
``docs/protocol.md``. Every function reads what it needs from the object store and
writes write-once objects, so a cleared or crashed DAG run can call it again:

* ``start_experiment`` and ``open_step`` are idempotent; ``open_step`` changes nothing.
* ``aggregate_step`` first decides (which updates are in, which are rejected and why), writes that
  decision (``aggregate.json``, or ``hops/<h>-aggregate.json`` for a cyclic hop) and only then the
  outputs derived from it (server strategy state, next model) and finally the experiment state. A
  rerun after a crash anywhere in between completes the step from the stored decision and
  produces the same bytes; a rerun of a completed step returns its stored record.

Round numbering: ``rounds/<r>/global`` is the model round ``r`` starts from; the round's updates
and ``aggregate.json`` live under ``rounds/<r>/`` and its result is ``rounds/<r+1>/global``. A
cyclic round's hops pass their models on through ``rounds/<r>/hops/<h>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from jipfed.federation.bounds import Clip, delta_norm, norm_clips, sample_count_problem, scaled
from jipfed.federation.codec import EncodedUpdate, decode_update, encode_global
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.plans import PlanStep, local_steps_for
from jipfed.federation.strategies import Strategy, StrategyState
from jipfed.federation.tickets import (  # noqa: F401 (re-exported: the protocol names live there)
    ProtocolError,
    QuorumNotMet,
    StepTicket,
    UpdateRefused,
    load_config,
)
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected
from jipfed.storage.base import ObjectExistsError, StoreError, canonical_json
from jipfed.storage.layout import validate_round, validate_slug
from jipfed.storage.state import (
    ExperimentState,
    ExperimentStore,
    IntegrityError,
    Status,
    StepRecord,
    sha256_hex,
)
from jipfed.training.models import build_model, shared_parameter_names

logger = logging.getLogger(__name__)

MODEL_CARD = "model_card.json"
FINAL_MODEL = "model"
FINAL_METRICS = "metrics.json"
RECORD_FORMAT = 1
#: Why a selected site is missing when it reported nothing and no timeout was recorded.
NO_UPDATE_REASON = "no update received before the step closed"


# -- helpers -------------------------------------------------------------------------------------


def initial_weights(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model: the configured network drawn from ``config.seed`` (shared entries)."""
    train = replace(config.train, seed=config.seed)
    model = build_model(train, in_channels=config.in_channels)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in shared_parameter_names(model, train.bn_policy)}


def _running_state(exp_store: ExperimentStore, what: str) -> ExperimentState:
    state = exp_store.load_state()
    if state.status is not Status.RUNNING:
        raise ProtocolError(
            f"experiment {exp_store.experiment!r} is {state.status.value}, cannot {what}"
            + (f" (error: {state.error})" if state.error else "")
        )
    return state


def _input_keys(exp_store: ExperimentStore, ps: PlanStep) -> tuple[str, str]:
    """Keys (model, manifest) of the model step ``ps`` starts from."""
    lay = exp_store.layout
    if ps.hop:
        return lay.hop_model(ps.round, ps.hop - 1), lay.hop_manifest(ps.round, ps.hop - 1)
    return lay.global_model(ps.round), lay.global_manifest(ps.round)


def _output_keys(exp_store: ExperimentStore, ps: PlanStep) -> tuple[str, str, int]:
    """Keys (model, manifest) of the model step ``ps`` produces, and that model's round."""
    lay = exp_store.layout
    if ps.is_last_in_round:
        nxt = ps.round + 1
        return lay.global_model(nxt), lay.global_manifest(nxt), nxt
    return lay.hop_model(ps.round, ps.hop or 0), lay.hop_manifest(ps.round, ps.hop or 0), ps.round


def _record_key(exp_store: ExperimentStore, ps: PlanStep) -> str:
    if ps.is_last_in_round:
        return exp_store.layout.aggregate(ps.round)
    return exp_store.layout.hop_record(ps.round, ps.hop or 0)


def _load_model(
    exp_store: ExperimentStore, keys: tuple[str, str], config_hash: str
) -> tuple[dict[str, torch.Tensor], UpdateManifest, str]:
    """(weights, manifest, sha256) of a stored global / hop model, validated by the codec."""
    model_key, manifest_key = keys
    store = exp_store.store
    try:
        manifest = UpdateManifest.from_dict(store.get_json(manifest_key))
        payload = store.get_bytes(model_key)
        expected = ExpectedUpdate.for_global(
            experiment=exp_store.experiment,
            round=manifest.round,
            config_hash=config_hash,
            tensors=manifest.tensors,
        )
        update = decode_update(payload, manifest, expected)
    except (ValueError, UpdateRejected) as exc:
        raise IntegrityError(f"stored model {model_key!r} is invalid: {exc}") from exc
    return dict(update.tensors), update.manifest, sha256_hex(payload)


def _put_once(exp_store: ExperimentStore, key: str, data: bytes) -> None:
    exp_store.store.put_if_absent_or_same(key, data)


def _local_work(config: ExperimentConfig, site: str) -> dict[str, int]:
    train = config.train
    if train.steps is None:
        return {"epochs": int(train.epochs or 1)}
    if config.proportional_steps:
        return {"steps": local_steps_for(site, train.steps, config.site_samples, proportional=True)}
    return {"steps": train.steps}


def _kind(config: ExperimentConfig) -> str:
    return "weights" if config.plan == "cyclic" else "delta"


def _expected(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    start: Mapping[str, torch.Tensor],
) -> ExpectedUpdate:
    kind = _kind(config)
    return ExpectedUpdate.from_weights(
        start,
        keep_reference=config.max_update_norm is not None and kind == "weights",
        experiment=exp_store.experiment,
        round=round_,
        site=site,
        config_hash=config_hash,
        kinds=(kind,),
        min_samples=1,
        max_delta_norm=config.max_update_norm,
    )


# -- start ---------------------------------------------------------------------------------------


def start_experiment(exp_store: ExperimentStore, config: ExperimentConfig) -> ExperimentState:
    """Store the (immutable) config and the seeded round-0 global model; mark the experiment running.

    Idempotent: calling it again with the same config returns the current state (a failed
    experiment goes back to running, a finished one stays finished).

    Raises:
        ValueError: ``config.name`` is not the store's experiment.
        ConfigConflictError: a different config is already stored.
    """
    if config.name != exp_store.experiment:
        raise ValueError(f"config is for experiment {config.name!r}, the store for {exp_store.experiment!r}")
    config_hash = exp_store.save_config(config.to_dict())
    state = exp_store.load_or_create_state()
    if not exp_store.has_global(0):
        encoded = encode_global(
            initial_weights(config), experiment=config.name, round=0, config_hash=config_hash
        )
        exp_store.save_global(0, encoded.payload, encoded.manifest.to_dict())
        logger.info("experiment %s: initial global model %s", config.name, encoded.manifest.sha256)
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


# -- open ----------------------------------------------------------------------------------------


def open_step(exp_store: ExperimentStore, step: int) -> StepTicket:
    """The ticket of plan step ``step``: the model to start from and what each selected site does.

    Reads only; a completed step may be opened again (same ticket), a step after the next one may not.

    Raises:
        ProtocolError: the experiment is not running, or ``step`` is beyond the next step.
        ObjectNotFoundError / IntegrityError: the start model is missing or corrupt.
    """
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    state = _running_state(exp_store, f"open step {step}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < plan.n_steps:
        raise ProtocolError(f"experiment {config.name!r}: step must be in [0, {plan.n_steps}), got {step!r}")
    if step > state.next_step:
        raise ProtocolError(
            f"experiment {config.name!r}: step {step} cannot open before step {state.next_step}"
        )
    ps = plan.step(step)
    keys = _input_keys(exp_store, ps)
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
        kind=_kind(config),
        encoding=config.encoding,
        model_key=keys[0],
        manifest_key=keys[1],
        model_sha256=manifest.sha256,
        fit_config=strategy.configure_fit(ps.round),
        local_work={site: _local_work(config, site) for site in ps.sites},
        timeout_s=config.round_timeout_s,
    )


# -- accept --------------------------------------------------------------------------------------


def _refuser(exp_store: ExperimentStore, site: str, round: int) -> Any:
    def refuse(code: str, reason: str) -> UpdateRefused:
        logger.warning(
            "experiment %s: refused update of %s for round %d: %s", exp_store.experiment, site, round, reason
        )
        return UpdateRefused(exp_store.experiment, site, round, code, reason)

    return refuse


def check_upload_allowed(
    exp_store: ExperimentStore, site: str, round: int
) -> tuple[ExperimentConfig, str, PlanStep]:
    """Whether ``site`` may upload its update of ``round`` now: ``(config, config_hash, plan step)``.

    Reads only small objects (config, state, markers), so the endpoint calls it before it reads
    an upload's body. A payload without its manifest (a half-written update) does not count as
    uploaded: the retry replaces it.

    Raises:
        UpdateRefused: the round is closed (``code="late"``), not the current one, the site is not
            selected for the current step, it already uploaded, or the experiment is not running.
    """
    validate_slug(site, "site id")
    validate_round(round)
    refuse = _refuser(exp_store, site, round)
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    if exp_store.store.exists(exp_store.layout.aggregate(round)):
        raise refuse("late", f"late update refused: round {round} is already closed (aggregated)")
    state = exp_store.load_state()
    if state.status is not Status.RUNNING:
        raise refuse("not_running", f"the experiment is {state.status.value}")
    if state.next_step >= plan.n_steps:
        raise refuse("late", "late update refused: every step of the plan is complete")
    ps = plan.step(state.next_step)
    if round != ps.round:
        code = "late" if round < ps.round else "wrong_round"
        raise refuse(code, f"the current step {ps.step} belongs to round {ps.round}, not round {round}")
    if exp_store.store.exists(_record_key(exp_store, ps)):
        raise refuse("late", f"late update refused: step {ps.step} of round {round} is already decided")
    if exp_store.update_committed(round, site):
        raise refuse(
            "duplicate", f"site {site!r} already uploaded an update for round {round}; never overwritten"
        )
    if site not in ps.sites:
        raise refuse(
            "not_selected", f"site {site!r} is not selected for step {ps.step} (selected: {list(ps.sites)})"
        )
    return config, config_hash, ps


def validate_upload(
    exp_store: ExperimentStore, site: str, round: int, payload: bytes, manifest_json: str | bytes
) -> ModelUpdate:
    """Check an upload is allowed and decode it against the step's start model (nothing stored).

    Raises:
        UpdateRefused: as :func:`check_upload_allowed`, or ``code="rejected"`` with the codec's reason.
    """
    config, config_hash, ps = check_upload_allowed(exp_store, site, round)
    start, _, _ = _load_model(exp_store, _input_keys(exp_store, ps), config_hash)
    try:
        update = decode_update(
            payload, manifest_json, _expected(exp_store, config, config_hash, round, site, start)
        )
        _check_sample_bound(exp_store, config, update)
    except UpdateRejected as exc:
        raise _refuser(exp_store, site, round)("rejected", exc.reason) from exc
    return update


def _check_sample_bound(exp_store: ExperimentStore, config: ExperimentConfig, update: ModelUpdate) -> None:
    """UpdateRejected when the update claims more cases than its site's cohort or the configured cap."""
    cohort = exp_store.reported_cohort(update.round, update.site)
    problem = sample_count_problem(update.n_samples, config.max_site_samples, cohort)
    if problem is not None:
        raise UpdateRejected(update.site, update.round, problem)


def accept_update(
    exp_store: ExperimentStore, site: str, round: int, payload: bytes, manifest_json: str | bytes
) -> UpdateManifest:
    """Validate one site's upload for the current step and store it (never overwriting).

    Raises:
        UpdateRefused: as :func:`validate_upload`; ``code="duplicate"`` also when a concurrent upload
            of the same site committed first.
    """
    update = validate_upload(exp_store, site, round, payload, manifest_json)
    try:
        exp_store.save_update(round, site, payload, update.manifest.to_dict())
    except ObjectExistsError as exc:
        raise _refuser(exp_store, site, round)("duplicate", str(exc)) from exc
    logger.info("experiment %s: accepted update of %s for round %d", exp_store.experiment, site, round)
    return update.manifest


# -- aggregate -----------------------------------------------------------------------------------


@dataclass
class _Decision:
    included: list[str]
    rejected: dict[str, str]
    missing: list[str]
    manifests: dict[str, UpdateManifest]
    missing_reasons: dict[str, str] = field(default_factory=dict)
    clips: dict[str, Clip] = field(default_factory=dict)


def _decide(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    start: Mapping[str, torch.Tensor],
) -> _Decision:
    """Validate every stored update of the step's round that this step could use."""
    decision = _Decision(included=[], rejected={}, missing=[], manifests={})
    norms: dict[str, float] = {}
    present = set(exp_store.list_updates(ps.round))
    for site in sorted(present):
        if site not in ps.sites:
            # Another hop's site in a cyclic round, or an upload that bypassed accept_update.
            if config.plan == "parallel":
                decision.rejected[site] = f"site {site!r} was not selected for round {ps.round}"
            continue
        try:
            update = _read_update(exp_store, config, config_hash, ps.round, site, start)
            _check_sample_bound(exp_store, config, update)
            if config.plan == "parallel":
                norms[site] = delta_norm(update, start)
        except UpdateRejected as exc:
            decision.rejected[site] = exc.reason
            logger.warning(
                "experiment %s: round %d: rejected %s: %s", config.name, ps.round, site, exc.reason
            )
            continue
        except Exception as exc:  # one unreadable update never blocks the step
            logger.exception(
                "experiment %s: round %d: cannot use the update of %s", config.name, ps.round, site
            )
            decision.rejected[site] = f"the update could not be used ({type(exc).__name__})"
            continue
        decision.included.append(site)
        decision.manifests[site] = update.manifest
    decision.clips = norm_clips(norms, config.norm_bound_factor)
    for site, clip in decision.clips.items():
        logger.warning("experiment %s: round %d: %s: %s", config.name, ps.round, site, clip.reason())
    decision.missing = [s for s in ps.sites if s not in present]
    failures = exp_store.site_failures(ps.round) if decision.missing else {}
    decision.missing_reasons = {
        site: str(failures.get(site, {}).get("reason") or NO_UPDATE_REASON) for site in decision.missing
    }
    return decision


def _read_update(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    start: Mapping[str, torch.Tensor],
) -> ModelUpdate:
    try:
        payload, manifest = exp_store.load_update(round_, site)
    except (IntegrityError, StoreError) as exc:
        raise UpdateRejected(site, round_, str(exc)) from exc
    return decode_update(payload, manifest, _expected(exp_store, config, config_hash, round_, site, start))


def _check_quorum(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    ps: PlanStep,
    state: ExperimentState,
    decision: _Decision,
) -> None:
    if config.plan == "parallel":
        required = config.min_quorum
        ok = len(decision.included) >= required
    else:
        # A cyclic hop without a valid update passes the model on unchanged, as long as the round
        # can still have min_sites successful hops.
        required = 1
        failed_before = sum(1 for r in state.history if r.round == ps.round and not r.included)
        ok = bool(decision.included) or failed_before + 1 <= len(config.sites) - config.min_quorum
    if not ok:
        raise QuorumNotMet(
            config.name,
            ps.step,
            ps.round,
            required,
            decision.included,
            decision.rejected,
            decision.missing,
            decision.missing_reasons,
        )


def _weighted_metrics(manifests: Mapping[str, UpdateManifest]) -> dict[str, float]:
    """Sample-weighted mean of each metric every included site reported."""
    if not manifests:
        return {}
    common = set.intersection(*(set(m.metrics) for m in manifests.values()))
    total = sum(m.n_samples for m in manifests.values())
    return {
        name: sum(m.metrics[name] * m.n_samples for m in manifests.values()) / total
        for name in sorted(common)
    }


def _strategy_for(exp_store: ExperimentStore, config: ExperimentConfig, round_: int) -> Strategy:
    """The strategy with the server state it had after round ``round_ - 1``."""
    strategy = config.make_strategy()
    if round_ == 0:
        return strategy
    lay = exp_store.layout
    try:
        payload = exp_store.store.get_bytes(lay.strategy_state(round_ - 1))
        text = exp_store.store.get_bytes(lay.strategy_state_manifest(round_ - 1))
        strategy.load_state_dict(StrategyState.from_payload(payload, text))
    except (StoreError, ValueError) as exc:
        raise IntegrityError(
            f"experiment {config.name!r}: server strategy state after round {round_ - 1} is missing or invalid: {exc}"
        ) from exc
    return strategy


def _compute(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    start: Mapping[str, torch.Tensor],
    included: Sequence[str],
    clips: Mapping[str, Clip],
) -> tuple[EncodedUpdate, StrategyState | None]:
    """The step's output model (encoded) and, for parallel plans, the new server state."""
    _, _, out_round = _output_keys(exp_store, ps)
    state: StrategyState | None = None
    n_samples = 0

    def updates() -> Iterator[ModelUpdate]:
        nonlocal n_samples
        for site in included:  # decoded one at a time: the strategy streams over them
            update = _read_update(exp_store, config, config_hash, ps.round, site, start)
            n_samples += update.n_samples
            yield scaled(update, start, clips[site].scale) if site in clips else update

    if config.plan == "parallel":
        strategy = _strategy_for(exp_store, config, ps.round)
        weights = strategy.aggregate(start, updates(), ps.round)
        state = strategy.state_dict()
    elif included:
        weights = dict(next(updates()).tensors)
    else:
        weights = dict(start)
    encoded = encode_global(
        weights, experiment=config.name, round=out_round, config_hash=config_hash, n_samples=n_samples
    )
    return encoded, state


def _record_dict(
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    decision: _Decision,
    input_sha: str,
    output_sha: str,
) -> dict[str, Any]:
    site_metrics = {
        site: {"n_samples": m.n_samples, **dict(m.metrics)} for site, m in sorted(decision.manifests.items())
    }
    return {
        "format": RECORD_FORMAT,
        "experiment": config.name,
        "config_hash": config_hash,
        "plan": config.plan,
        "strategy": config.strategy,
        "step": ps.step,
        "round": ps.round,
        "hop": ps.hop,
        "selected": list(ps.sites),
        "included": list(decision.included),
        "rejected": dict(sorted(decision.rejected.items())),
        "bounded": {site: clip.to_dict() for site, clip in sorted(decision.clips.items())},
        "missing": list(decision.missing),
        "missing_reasons": dict(sorted(decision.missing_reasons.items())),
        "n_samples": sum(m.n_samples for m in decision.manifests.values()),
        "metrics": _weighted_metrics(decision.manifests),
        "sites": site_metrics,
        "input_sha256": input_sha,
        "output_sha256": output_sha,
    }


def _step_record(record: Mapping[str, Any]) -> StepRecord:
    return StepRecord(
        step=record["step"],
        round=record["round"],
        included=tuple(record["included"]),
        rejected=record["rejected"],
        metrics={
            "n_samples": record["n_samples"],
            **record["metrics"],
            "missing": record["missing"],
            "sites": record["sites"],
            "output_sha256": record["output_sha256"],
        },
    )


def _write_outputs(
    exp_store: ExperimentStore, ps: PlanStep, encoded: EncodedUpdate, strategy_state: StrategyState | None
) -> None:
    lay = exp_store.layout
    if strategy_state is not None:
        payload, text = strategy_state.to_payload()
        _put_once(exp_store, lay.strategy_state(ps.round), payload)
        _put_once(exp_store, lay.strategy_state_manifest(ps.round), text.encode("utf-8"))
    model_key, manifest_key, _ = _output_keys(exp_store, ps)
    _put_once(exp_store, model_key, encoded.payload)
    _put_once(exp_store, manifest_key, canonical_json(encoded.manifest.to_dict()))


def aggregate_step(exp_store: ExperimentStore, step: int) -> StepRecord:
    """Close plan step ``step``: validate its updates, check the quorum, aggregate, persist.

    Writes the step's decision record (``aggregate.json`` with included / rejected sites and
    reasons, missing sites and metrics; a non-final cyclic hop writes ``hops/<h>-aggregate.json``),
    the server strategy state, the next model, and completes the step in the experiment state.
    Re-running a completed step returns its stored record and changes nothing.

    Raises:
        QuorumNotMet: too few valid updates; nothing is written.
        ProtocolError: the experiment is not running or ``step`` is not the next step.
    """
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    state = exp_store.load_state()
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < plan.n_steps:
        raise ProtocolError(f"experiment {config.name!r}: step must be in [0, {plan.n_steps}), got {step!r}")
    if step < state.next_step:
        logger.info("experiment %s: step %d is already complete", config.name, step)
        return state.history[step]
    state = _running_state(exp_store, f"aggregate step {step}")
    if step > state.next_step:
        raise ProtocolError(
            f"experiment {config.name!r}: step {step} cannot run before step {state.next_step}"
        )
    ps = plan.step(step)
    start, _, input_sha = _load_model(exp_store, _input_keys(exp_store, ps), config_hash)
    record_key = _record_key(exp_store, ps)
    if exp_store.store.exists(record_key):
        record = exp_store.store.get_json(record_key)
        logger.info("experiment %s: step %d was decided before a restart; completing it", config.name, step)
        decision = _Decision(list(record["included"]), dict(record["rejected"]), list(record["missing"]), {})
        decision.clips = {
            site: Clip(b["norm"], b["bound"], b["scale"]) for site, b in record.get("bounded", {}).items()
        }
    else:
        decision = _decide(exp_store, config, config_hash, ps, start)
        _check_quorum(exp_store, config, ps, state, decision)
        record = None
    encoded, strategy_state = _compute(
        exp_store, config, config_hash, ps, start, decision.included, decision.clips
    )
    if record is None:
        record = _record_dict(config, config_hash, ps, decision, input_sha, encoded.manifest.sha256 or "")
        if ps.is_last_in_round and ps.hop is not None:
            record["hops"] = [_hop_summary(r) for r in state.history if r.round == ps.round]
        _put_once(exp_store, record_key, canonical_json(record))
    elif record["output_sha256"] != encoded.manifest.sha256:
        raise IntegrityError(
            f"experiment {config.name!r}, step {step}: recomputed model {encoded.manifest.sha256} differs from "
            f"the recorded {record['output_sha256']}"
        )
    _write_outputs(exp_store, ps, encoded, strategy_state)
    step_record = _step_record(record)
    next_round = plan.step(step + 1).round if step + 1 < plan.n_steps else ps.round + 1
    exp_store.save_state(state.complete_step(step_record, next_round=next_round))
    logger.info(
        "experiment %s: step %d (round %d) aggregated: included %s, rejected %s, missing %s",
        config.name,
        step,
        ps.round,
        list(decision.included),
        sorted(decision.rejected),
        decision.missing,
    )
    return step_record


def _hop_summary(record: StepRecord) -> dict[str, Any]:
    return {
        "step": record.step,
        "included": list(record.included),
        "rejected": dict(record.rejected),
        "n_samples": record.metrics.get("n_samples", 0),
    }


# -- finalize ------------------------------------------------------------------------------------


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finalize(exp_store: ExperimentStore, evaluation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Publish the final model, a short model card and the metrics under ``final/``; finish.

    ``evaluation`` (optional, JSON numbers) is added to the model card, e.g. the simulator's
    held-out Dice of the final model. Idempotent: a finished experiment returns its stored card.

    Raises:
        ProtocolError: steps of the plan are still open.
    """
    config, config_hash = load_config(exp_store)
    plan = config.make_plan()
    state = exp_store.load_state()
    lay = exp_store.layout
    if state.status is Status.FINISHED:
        return exp_store.store.get_json(lay.final(MODEL_CARD))
    state = _running_state(exp_store, "finalize")
    if state.next_step < plan.n_steps:
        raise ProtocolError(
            f"experiment {config.name!r}: cannot finalize, {plan.n_steps - state.next_step} step(s) still open "
            f"(next is step {state.next_step})"
        )
    payload, manifest = exp_store.load_global(config.rounds)
    last_round = [r for r in state.history if r.round == config.rounds - 1]
    card = {
        "experiment": config.name,
        "config_hash": config_hash,
        "model": {
            "task": config.train.task,
            "architecture": config.train.model,
            "size": config.train.size,
            "in_channels": config.in_channels,
            "outputs": "3 sigmoid region channels WT, TC, ET"
            if config.train.task == "segmentation"
            else "2 logits (LGG, HGG)",
            "sha256": manifest.get("sha256"),
            "file": f"{FINAL_MODEL}.safetensors",
        },
        "training": {
            "plan": config.plan,
            "strategy": config.strategy,
            "strategy_kwargs": dict(config.strategy_kwargs),
            "rounds": config.rounds,
            "sites": list(config.sites),
            "local_epochs": config.train.epochs,
            "local_steps": config.train.steps,
            "proportional_steps": config.proportional_steps,
            "encoding": config.encoding,
            "privacy": dict(config.privacy) or "off",
        },
        "participation": {
            "steps": len(state.history),
            "included_per_step": [len(r.included) for r in state.history],
            "rejected": {str(r.step): dict(r.rejected) for r in state.history if r.rejected},
            "training_cases_last_round": sum(int(r.metrics.get("n_samples", 0)) for r in last_round),
        },
        "evaluation": {k: _finite_or_none(v) for k, v in (evaluation or {}).items()},
        "intended_use": "research; trained on the sites' data under the stored config; not for clinical use",
    }
    metrics = {"experiment": config.name, "steps": [r.to_dict() for r in state.history]}
    store = exp_store.store
    store.put_if_absent_or_same(lay.final(f"{FINAL_MODEL}.safetensors"), payload)
    store.put_if_absent_or_same(lay.final(f"{FINAL_MODEL}.json"), canonical_json(manifest))
    store.put_if_absent_or_same(lay.final(FINAL_METRICS), canonical_json(metrics))
    store.put_if_absent_or_same(lay.final(MODEL_CARD), canonical_json(card))
    exp_store.save_state(state.finish())
    logger.info("experiment %s: finished; final model %s", config.name, manifest.get("sha256"))
    return card
