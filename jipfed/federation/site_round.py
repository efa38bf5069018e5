"""The site side of one plan step: verify the model received, train, build and encode the update.

``run_site_step`` is what the site DAG's training task calls (and what the simulator calls for
every site). What it returns is all that leaves the site: named tensors plus a manifest holding
aggregate numbers only (sample count, losses, Dice of the site's held-out cases) — no case keys,
file names, UIDs or patient attributes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone

import torch

from jipfed.federation.codec import EncodedUpdate, decode_update, encode_update
from jipfed.federation.rounds import StepTicket
from jipfed.federation.update import (
    ModelUpdate,
    UpdateManifest,
    control_name,
    control_specs,
    spec_of,
    split_controls,
)
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected
from jipfed.training.fit import FIT_KEYS, FitSettings
from jipfed.training.local import LocalResult, LocalTrainer

logger = logging.getLogger(__name__)

__all__ = ["FIT_KEYS", "SiteStepError", "run_site_step", "site_metrics", "update_tensors", "verify_global"]


class SiteStepError(Exception):
    """The site cannot run the step it was given (wrong ticket, model not matching its hash, ...)."""


def verify_global(
    ticket: StepTicket,
    payload: bytes,
    manifest: UpdateManifest | str | bytes | Mapping[str, object],
    expected_tensors: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Decode the model received for ``ticket`` after checking its sha256 against the ticket.

    Raises:
        SiteStepError: the payload is not the model the ticket names, or it does not fit the
            site's network (names, shapes, dtypes) or holds NaN/Inf.
    """
    digest = hashlib.sha256(payload).hexdigest()
    where = f"experiment {ticket.experiment!r}, round {ticket.round}, step {ticket.step}"
    if digest != ticket.model_sha256:
        raise SiteStepError(
            f"{where}: the model received has sha256 {digest[:12]}..., the ticket names "
            f"{ticket.model_sha256[:12]}...; refusing to train on it"
        )
    try:
        parsed = manifest if isinstance(manifest, UpdateManifest) else _parse(manifest)
        expected = ExpectedUpdate.for_global(
            experiment=ticket.experiment,
            round=parsed.round,
            config_hash=ticket.config_hash,
            tensors=spec_of(expected_tensors),
        )
        update = decode_update(payload, parsed, expected)
    except (ValueError, UpdateRejected) as exc:
        raise SiteStepError(f"{where}: the model received is not usable: {exc}") from exc
    return dict(update.tensors)


def _parse(manifest: str | bytes | Mapping[str, object]) -> UpdateManifest:
    if isinstance(manifest, (str, bytes)):
        return UpdateManifest.from_json(manifest)
    return UpdateManifest.from_dict(manifest)


def _train(
    trainer: LocalTrainer, ticket: StepTicket, site_id: str, start: Mapping[str, torch.Tensor]
) -> LocalResult:
    work = dict(ticket.local_work.get(site_id, {}))
    unknown = sorted(set(work) - {"epochs", "steps"})
    if unknown or len(work) != 1:
        raise SiteStepError(
            f"round {ticket.round}: local work for {site_id!r} must be epochs or steps, got {work}"
        )
    try:
        fit = FitSettings.from_config(ticket.fit_config)
    except ValueError as exc:
        raise SiteStepError(f"round {ticket.round}: {exc}") from None
    base = trainer.config
    trainer.config = replace(base, epochs=work.get("epochs"), steps=work.get("steps"))
    try:
        return trainer.train(start, round=ticket.round, fit=fit)
    finally:
        trainer.config = base


def site_metrics(
    result: LocalResult,
    evaluation: Mapping[str, float] | None,
    start_evaluation: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The aggregate numbers a site reports: training loss, steps and held-out scores.

    ``val_*`` scores the model the site trained; ``global_val_*`` the model it received (federated
    evaluation of the round's global model on the site's held-out cases, before training).
    """
    metrics = {k: result.metrics[k] for k in ("train_loss", "train_loss_last") if k in result.metrics}
    metrics.update(epochs=result.metrics["epochs"], steps=float(result.steps))
    if "epsilon" in result.privacy:  # DP-SGD: this site's epsilon so far
        metrics["dp_epsilon"] = float(result.privacy["epsilon"])
    for prefix, scores in (("val_", evaluation), ("global_val_", start_evaluation)):
        for name, value in (scores or {}).items():
            if math.isfinite(value):
                metrics[f"{prefix}{name}"] = float(value)
    return metrics


def update_tensors(
    result: LocalResult, start: Mapping[str, torch.Tensor], kind: str, local_names: frozenset[str]
) -> dict[str, torch.Tensor]:
    """What the site sends: per weight of ``start`` the delta (``kind="delta"``) or the trained value.

    Site-local entries go back unchanged (a zero delta): they never leave the site. With SCAFFOLD
    (``result.controls``) the control corrections follow as ``control/<weight>``, one per trainable
    float weight (zero for site-local ones).
    """
    model, _ = split_controls(start)
    trained = {n: start[n] if n in local_names else result.weights[n] for n in model}
    tensors = {n: trained[n] - model[n] for n in model} if kind == "delta" else dict(trained)
    if result.controls:
        for name in control_specs(spec_of(model)):
            weight = name[len(control_name("")) :]
            change = result.controls.get(weight)
            tensors[name] = (
                torch.zeros_like(model[weight]) if change is None else change.to(model[weight].dtype)
            )
    return tensors


def run_site_step(
    ticket: StepTicket,
    global_payload: bytes,
    global_manifest: UpdateManifest | str | bytes | Mapping[str, object],
    trainer: LocalTrainer,
    site_id: str,
    experiment: str,
    config_hash: str,
    *,
    evaluate: bool = True,
) -> EncodedUpdate:
    """Train this site's part of a plan step and return the encoded update to upload.

    Args:
        ticket: the step ticket from the central (``open_step``).
        global_payload, global_manifest: the model the ticket names (``ticket.model_key``).
        trainer: this site's trainer, built from the experiment's ``train`` config.
        site_id, experiment, config_hash: this site's identity and the experiment it joined
            (from its configuration); the ticket must agree.
        evaluate: also score the trained model on the site's held-out cases (``val_*`` metrics).

    Returns:
        The update: a delta (``trained - received``) for parallel plans, the trained weights for
        cyclic ones, encoded as the ticket says.

    Raises:
        SiteStepError: the ticket is for another experiment / config / site, or the model
            received does not match the ticket's sha256.
    """
    if ticket.experiment != experiment or ticket.config_hash != config_hash:
        raise SiteStepError(
            f"ticket is for experiment {ticket.experiment!r} (config {ticket.config_hash[:12]}), this site "
            f"joined {experiment!r} (config {config_hash[:12]})"
        )
    if site_id not in ticket.sites:
        raise SiteStepError(
            f"experiment {experiment!r}, step {ticket.step}: site {site_id!r} is not selected ({list(ticket.sites)})"
        )
    shared = {name: tensor for name, tensor in trainer.get_weights().items() if name in trainer.shared_names}
    start = verify_global(ticket, global_payload, global_manifest, shared)
    start_evaluation = trainer.evaluate(start) if evaluate and trainer.val_records else None
    result = _train(trainer, ticket, site_id, start)
    evaluation = None
    if evaluate and trainer.val_records:
        evaluation = trainer.evaluate(result.weights)
    tensors = update_tensors(result, start, ticket.kind, trainer.local_names)
    update = ModelUpdate.build(
        tensors,
        experiment=experiment,
        round=ticket.round,
        site=site_id,
        kind=ticket.kind,
        n_samples=result.n_samples,
        config_hash=config_hash,
        metrics=site_metrics(result, evaluation, start_evaluation),
        privacy=result.privacy,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    encoded = encode_update(update, ticket.encoding)
    logger.info(
        "site %s: round %d step %d trained (%d steps, loss %.4f), update %s %s %d bytes",
        site_id,
        ticket.round,
        ticket.step,
        result.steps,
        result.metrics.get("train_loss", float("nan")),
        ticket.kind,
        ticket.encoding,
        len(encoded.payload),
    )
    return encoded
