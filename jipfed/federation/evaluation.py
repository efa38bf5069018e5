"""Federated evaluation: every site scores one or more given models on its held-out cases.

The central stores the models to score and a site request (:mod:`jipfed.federation.site_requests`)
under ``experiments/<exp>/evaluation/<name>/`` (format in ``docs/protocol.md``); each site
downloads the models, checks their sha256 and decodes them like a global model, scores them with
its trainer on its held-out split and answers with numbers only (``n_cases`` and the metrics per
model). :func:`summarise` adds the case-weighted mean per model and writes ``summary.json``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jipfed.federation import site_requests
from jipfed.federation.site_requests import SiteRequest
from jipfed.storage.base import ModelStore, canonical_json
from jipfed.storage.layout import validate_slug
from jipfed.storage.state import ExperimentStore

if TYPE_CHECKING:
    import torch

    from jipfed.training.local import LocalTrainer

SUMMARY = "summary.json"


class EvaluationError(Exception):
    """A site cannot score the models it was given (wrong sha256, unusable tensors, no held-out cases)."""


def evaluation_prefix(exp_store: ExperimentStore, name: str) -> str:
    """``experiments/<exp>/evaluation/<name>``."""
    return f"{exp_store.layout.prefix.rstrip('/')}/evaluation/{validate_slug(name, 'evaluation name')}"


def request_evaluation(
    exp_store: ExperimentStore,
    name: str,
    models: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    sites: Sequence[str],
    timeout_s: float,
    now: datetime | None = None,
) -> SiteRequest:
    """Ask ``sites`` to score ``models`` (label → shared weights); idempotent per ``name``.

    The request carries the experiment's ``train`` settings: the site builds the network and its
    held-out split from them.
    """
    from jipfed.federation.codec import encode_global

    prefix = evaluation_prefix(exp_store, name)
    store = exp_store.store
    if store.exists(f"{prefix}/request.json"):
        return site_requests.load_request(store, prefix)
    config_hash = exp_store.config_hash()
    listed = {}
    for label, weights in models.items():
        validate_slug(label, "model label")
        encoded = encode_global(weights, experiment=exp_store.experiment, round=0, config_hash=config_hash)
        key = f"{prefix}/models/{label}.safetensors"
        store.put_if_absent_or_same(key, encoded.payload)
        store.put_if_absent_or_same(
            f"{prefix}/models/{label}.json", canonical_json(encoded.manifest.to_dict())
        )
        listed[label] = {"key": key, "sha256": encoded.manifest.sha256}
    train = exp_store.load_config()["train"]
    body = {"experiment": exp_store.experiment, "config_hash": config_hash, "train": train, "models": listed}
    return site_requests.open_request(
        store,
        kind="evaluate",
        request_id=f"{exp_store.experiment}.{name}",
        prefix=prefix,
        sites=sites,
        timeout_s=timeout_s,
        body=body,
        now=now,
    )


def pending_evaluations(store: ModelStore, site: str, now: datetime | None = None) -> list[SiteRequest]:
    """Open evaluation requests ``site`` has not answered."""
    return site_requests.pending_requests(store, site, "evaluate", now)


def model_for_evaluation(
    store: ModelStore, request: SiteRequest, label: str, site: str
) -> tuple[bytes, dict[str, Any]]:
    """(payload, manifest) of model ``label`` of ``request``, for a site it asks."""
    if site not in request.sites:
        raise PermissionError(f"evaluation {request.id!r}: site {site!r} is not asked")
    entry = request.body["models"].get(label)
    if entry is None:
        raise KeyError(f"evaluation {request.id!r} has no model {label!r}")
    key = entry["key"]
    return store.get_bytes(key), store.get_json(key[: -len(".safetensors")] + ".json")


def decode_model(
    request: SiteRequest,
    label: str,
    payload: bytes,
    manifest: Mapping[str, Any],
    expected: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Check ``payload`` against the sha256 the request names and decode it (the site's side)."""
    from jipfed.federation.codec import decode_update
    from jipfed.federation.update import UpdateManifest, spec_of
    from jipfed.federation.validation import ExpectedUpdate, UpdateRejected

    where = f"evaluation {request.id!r}, model {label!r}"
    digest = hashlib.sha256(payload).hexdigest()
    if digest != request.body["models"][label]["sha256"]:
        raise EvaluationError(
            f"{where}: sha256 {digest[:12]}... is not the one requested; refusing to score it"
        )
    try:
        parsed = UpdateManifest.from_dict(manifest)
        check = ExpectedUpdate.for_global(
            experiment=request.body["experiment"],
            round=parsed.round,
            config_hash=request.body["config_hash"],
            tensors=spec_of(expected),
        )
        return dict(decode_update(payload, parsed, check).tensors)
    except (ValueError, UpdateRejected) as exc:
        raise EvaluationError(f"{where}: not usable: {exc}") from exc


def score_models(trainer: LocalTrainer, models: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """``{"n_cases": held-out cases, "metrics": {label: {metric: value}}}``: finite numbers only."""
    if not trainer.val_records:
        raise EvaluationError("no held-out cases at this site (val_fraction = 0 or too few cases)")
    metrics = {}
    for label, weights in models.items():
        scores = trainer.evaluate(weights)
        metrics[label] = {k: float(v) for k, v in scores.items() if k != "n_cases" and math.isfinite(v)}
    return {"n_cases": len(trainer.val_records), "metrics": metrics}


def evaluate_at_site(
    store: ModelStore, request: SiteRequest, site: str, trainer: LocalTrainer
) -> dict[str, Any]:
    """Download, verify and score every model of ``request`` at ``site``; record the answer.

    A failure is recorded with its reason (and raised as EvaluationError): the central counts the
    site as not evaluated, as the line's rule says.
    """
    shared = {n: t for n, t in trainer.get_weights().items() if n in trainer.shared_names}
    try:
        models = {
            label: decode_model(request, label, *model_for_evaluation(store, request, label, site), shared)
            for label in request.body["models"]
        }
        result = score_models(trainer, models)
    except (EvaluationError, ValueError) as exc:
        site_requests.fail(store, request, site, str(exc))
        raise EvaluationError(str(exc)) from exc
    site_requests.answer(store, request, site, result)
    return result


def summarise(store: ModelStore, request: SiteRequest, now: datetime | None = None) -> dict[str, Any] | None:
    """The evaluation's summary, or None while sites may still answer; written as ``summary.json``.

    ``{"evaluation", "models", "sites": {site: {"n_cases", "metrics": {label: {...}}}},
    "failed": {site: reason}, "weighted": {label: {metric: case-weighted mean}}}``.
    """
    key = f"{request.prefix}/{SUMMARY}"
    if store.exists(key):
        return store.get_json(key)
    answers, failures, waiting = site_requests.collect(store, request, now)
    if waiting:
        return None
    store.put_if_absent_or_same(key, canonical_json(_summary(request, answers, failures)))
    site_requests.close_request(store, request)
    return store.get_json(key)


def _summary(request: SiteRequest, answers: Mapping[str, Any], failures: Mapping[str, str]) -> dict[str, Any]:
    return {
        "evaluation": request.id,
        "models": {label: entry["sha256"] for label, entry in request.body["models"].items()},
        "sites": dict(answers),
        "failed": dict(failures),
        "weighted": {label: weighted_metrics(answers, label) for label in request.body["models"]},
    }


def provisional_summary(store: ModelStore, request: SiteRequest, now: datetime | None = None) -> dict[str, Any]:
    """The summary of what the sites answered so far, plus ``waiting`` (sites not yet answered);
    written nowhere, so a read-only page can show it before :func:`summarise` is called."""
    answers, failures, waiting = site_requests.collect(store, request, now)
    return {**_summary(request, answers, failures), "waiting": waiting}


def weighted_metrics(answers: Mapping[str, Mapping[str, Any]], label: str) -> dict[str, float]:
    """Per metric, the mean over the sites that reported it, weighted by their held-out cases."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in answers.values():
        n = int(record.get("n_cases", 0))
        for metric, value in record.get("metrics", {}).get(label, {}).items():
            sums[metric] = sums.get(metric, 0.0) + n * float(value)
            counts[metric] = counts.get(metric, 0) + n
    return {metric: sums[metric] / counts[metric] for metric in sums if counts[metric]}


#: The federated evaluation of an experiment's final model: ``experiments/<exp>/evaluation/final/``.
FINAL = "final"


def request_final_evaluation(
    exp_store: ExperimentStore, timeout_s: float | None = None, now: datetime | None = None
) -> SiteRequest:
    """Ask every site of the finished experiment to score its final model (label ``final``); idempotent.

    ``timeout_s`` defaults to the experiment's ``round_timeout_s``. Raises ObjectNotFoundError
    before the experiment was finalized.
    """
    from safetensors.torch import load as load_tensors

    from jipfed.federation.finalize import FINAL_MODEL

    config = exp_store.load_config()
    payload = exp_store.store.get_bytes(exp_store.layout.final(f"{FINAL_MODEL}.safetensors"))
    return request_evaluation(
        exp_store,
        FINAL,
        {FINAL: load_tensors(payload)},
        sites=list(config["sites"]),
        timeout_s=float(timeout_s if timeout_s is not None else config.get("round_timeout_s", 3600.0)),
        now=now,
    )


def collect_final_evaluations(store: ModelStore, now: datetime | None = None) -> list[str]:
    """Write the summary of every open final-model evaluation that is complete (all sites answered
    or failed, or its deadline passed); returns the experiments summarised now."""
    done = []
    for key in store.list(f"{site_requests.INDEX_PREFIX}evaluate/"):
        prefix = str(store.get_json(key)["prefix"])
        if not prefix.endswith(f"/evaluation/{FINAL}"):
            continue  # another evaluation (a model line's release check collects its own)
        request = site_requests.load_request(store, prefix)
        if summarise(store, request, now) is not None:
            done.append(str(request.body["experiment"]))
    return done
