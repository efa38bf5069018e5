"""What the experiment pages show, read from the model store as JSON-ready dicts (no HTML here).

The same views feed the pages (:mod:`jipfed.central.ui_html`), the exported report and the
OpenSearch round documents (:mod:`jipfed.indexing`). Everything is read on each call; the store is
the only source of truth.

Times: the store records when each plan step was dispatched (``steps/<s>/dispatch.json``), so a
round's duration is the time from its dispatch to the next step's dispatch; the last round's end
is unknown until the next one starts (or the experiment finishes: then it is left out of the mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from jipfed.federation.dispatch import (
    current_dispatch,
    experiment_config,
    load_dispatch,
    site_status,
    utcnow,
)
from jipfed.privacy.settings import PrivacySettings
from jipfed.storage.base import ObjectNotFoundError, json_object
from jipfed.storage.state import ExperimentStore

#: The per-round score of a task: sample-weighted mean of the sites' held-out scores.
METRIC_OF_TASK = {"segmentation": "val_dice_mean", "classification": "val_auc"}
#: Metrics plotted per round, by chart: (chart title, metric keys), in order.
CHARTS = {
    "segmentation": (
        ("Held-out Dice per round", ("val_dice_mean", "global_val_dice_mean")),
        ("Loss per round", ("train_loss", "val_loss", "global_val_loss")),
    ),
    "classification": (
        ("Held-out AUC per round", ("val_auc", "global_val_auc")),
        ("Loss per round", ("train_loss", "val_loss", "global_val_loss")),
    ),
}
METRIC_LABELS = {
    "val_dice_mean": "held-out Dice after local training",
    "global_val_dice_mean": "held-out Dice of the received global model",
    "val_auc": "held-out AUC after local training",
    "global_val_auc": "held-out AUC of the received global model",
    "train_loss": "training loss",
    "val_loss": "held-out loss after local training",
    "global_val_loss": "held-out loss of the received global model",
}
#: The federated evaluation of the final model: ``experiments/<exp>/evaluation/final/summary.json``
#: (format in docs/protocol.md, :mod:`jipfed.federation.evaluation`).
FINAL_EVALUATION = "final"

#: The HTML report stored with the final model: ``experiments/<exp>/final/report.html``.
REPORT = "report.html"

INCLUDED, MISSING, REJECTED, OPEN = "included", "missing", "rejected", "open"


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (bool, text, NaN and None are not numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def round_records(exp_store: ExperimentStore) -> list[dict[str, Any]]:
    """The ``aggregate.json`` of every closed round, by round number."""
    lay = exp_store.layout
    rounds = sorted(
        {
            r
            for key in exp_store.store.list(lay.rounds_prefix)
            if key.endswith("/aggregate.json") and (r := lay.round_of_key(key)) is not None
        }
    )
    return [json_object(exp_store.load_aggregate(r), lay.aggregate(r)) for r in rounds]


def experiment_summary(exp_store: ExperimentStore) -> dict[str, Any]:
    """Status and progress of one experiment (the list page, the header of its page)."""
    config = experiment_config(exp_store)
    state = exp_store.load_state()
    return {
        "experiment": exp_store.experiment,
        "status": state.status.value,
        "plan": config.plan,
        "strategy": config.strategy,
        "task": config.train.task,
        "metric": METRIC_OF_TASK.get(config.train.task, "val_dice_mean"),
        "sites": list(config.sites),
        "steps_done": state.next_step,
        "steps": config.make_plan().n_steps,
        "round": min(state.current_round, config.rounds),
        "rounds": config.rounds,
        "error": state.error,
    }


def step_times(exp_store: ExperimentStore, steps: int) -> list[datetime | None]:
    """When each plan step ``0 .. steps-1`` was (last) dispatched; None where it was not."""
    config = experiment_config(exp_store)
    plan = config.make_plan()
    times: list[datetime | None] = []
    for step in range(steps):
        dispatch = load_dispatch(exp_store, plan.step(step).round, step)
        times.append(dispatch.dispatched_at if dispatch is not None else None)
    return times


def timing(
    exp_store: ExperimentStore, summary: Mapping[str, Any], now: datetime | None = None
) -> dict[str, Any]:
    """Seconds per step (dispatch to next dispatch), their mean and the expected finish."""
    steps_done, n_steps = summary["steps_done"], summary["steps"]
    times = step_times(exp_store, min(steps_done + 1, n_steps))
    durations = [
        (later - earlier).total_seconds() if earlier is not None and later is not None else None
        for earlier, later in zip(times, times[1:], strict=False)
    ]
    known = [d for d in durations if d is not None]
    mean = sum(known) / len(known) if known else None
    expected = None
    last = times[-1] if times else None
    if summary["status"] == "running" and mean is not None and last is not None:
        expected = last + timedelta(seconds=mean * (n_steps - steps_done))
    return {
        "step_seconds": durations,
        "mean_step_seconds": mean,
        "started": _iso(times[0]) if times and times[0] is not None else None,
        "current_step_dispatched": _iso(last) if last is not None and steps_done < n_steps else None,
        "expected_finish": _iso(expected) if expected is not None else None,
        "now": _iso(now or utcnow()),
    }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def participation(record: Mapping[str, Any], site: str) -> tuple[str, str]:
    """(``included|missing|rejected``, why) of ``site`` in one round record ("" = not selected)."""
    if site in record.get("included", ()):
        bounded = record.get("bounded", {}).get(site)
        return INCLUDED, f"update bounded: {bounded}" if bounded else "update aggregated"
    if site in record.get("rejected", {}):
        return REJECTED, str(record["rejected"][site])
    if site in record.get("missing", ()):
        return MISSING, str(record.get("missing_reasons", {}).get(site) or "no reason recorded")
    return "", "not selected in this round"


def participation_grid(
    records: Sequence[Mapping[str, Any]], sites: Sequence[str], open_step: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per site: ``{"site", "cells": [{"round", "state", "why"}, ...]}`` (open step last)."""
    rows = []
    for site in sites:
        cells = [
            {"round": r["round"], "state": state, "why": why}
            for r in records
            for state, why in [participation(r, site)]
        ]
        if open_step is not None:
            status, detail = open_step["sites"].get(site, ("", "not selected in this step"))
            cells.append({"round": open_step["round"], "state": OPEN, "why": f"{status}: {detail}"})
        rows.append({"site": site, "cells": cells})
    return rows


def open_step(exp_store: ExperimentStore) -> dict[str, Any] | None:
    """The dispatched step the sites are working on: round, step, deadline and each site's status."""
    dispatch = current_dispatch(exp_store)
    if dispatch is None:
        return None
    ticket = dispatch.ticket
    return {
        "round": ticket.round,
        "step": ticket.step,
        "deadline": _iso(dispatch.deadline),
        "sites": {site: site_status(exp_store, dispatch, site) for site in ticket.sites},
    }


def series(records: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Per-round values for the charts: ``{"rounds", "global": {m: [...]}, "sites": {site: {m: [...]}}}``.

    Missing or non-finite values are None (a gap in the line).
    """
    sites = sorted({site for r in records for site in r.get("sites", {})})
    return {
        "rounds": [r["round"] for r in records],
        "global": {m: [number(r.get("metrics", {}).get(m)) for r in records] for m in metrics},
        "sites": {
            site: {m: [number(r.get("sites", {}).get(site, {}).get(m)) for r in records] for m in metrics}
            for site in sites
        },
    }


def epoch_equivalents(records: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Cumulative local epochs after each round (the sample-weighted mean of the sites' ``epochs``)."""
    total, out = 0.0, []
    for record in records:
        epochs = number(record.get("metrics", {}).get("epochs"))
        if epochs is None:
            out.append(None)
            continue
        total += epochs
        out.append(total)
    return out


def final_evaluation(exp_store: ExperimentStore) -> dict[str, Any] | None:
    """The final model's federated evaluation summary (None: not asked for).

    Before the summary is written (by the central's next ``record_metrics``), the sites' answers
    so far are shown, with the sites still ``waiting``; nothing is written here.
    """
    from jipfed.federation import site_requests
    from jipfed.federation.evaluation import evaluation_prefix, provisional_summary

    prefix = evaluation_prefix(exp_store, FINAL_EVALUATION)
    key = f"{prefix}/summary.json"
    try:
        return json_object(exp_store.store.get_json(key), key)
    except ObjectNotFoundError:
        pass
    try:
        request = site_requests.load_request(exp_store.store, prefix)
    except ObjectNotFoundError:
        return None
    return provisional_summary(exp_store.store, request)


def final_model(exp_store: ExperimentStore) -> dict[str, Any] | None:
    """The final model's card and its federated evaluation (None before the experiment finished)."""
    lay = exp_store.layout
    store = exp_store.store
    try:
        card = json_object(store.get_json(lay.final("model_card.json")), lay.final("model_card.json"))
    except ObjectNotFoundError:
        return None
    return {
        "sha256": card.get("model", {}).get("sha256"),
        "card": card,
        "evaluation": final_evaluation(exp_store),
        "report": lay.final(REPORT) if store.exists(lay.final(REPORT)) else None,
    }


def experiment_view(exp_store: ExperimentStore, now: datetime | None = None) -> dict[str, Any]:
    """Everything one experiment page shows, JSON-ready."""
    summary = experiment_summary(exp_store)
    config = experiment_config(exp_store)
    records = round_records(exp_store)
    step = open_step(exp_store)
    charts = CHARTS.get(config.train.task, CHARTS["segmentation"])
    metrics = [m for _, keys in charts for m in keys]
    return {
        "summary": summary,
        "settings": settings(exp_store),
        "timing": timing(exp_store, summary, now),
        "open_step": step,
        "rounds": [_round_row(r, exp_store) for r in records],
        "grid": participation_grid(records, summary["sites"], step),
        "charts": [{"title": title, "metrics": list(keys)} for title, keys in charts],
        "labels": {m: METRIC_LABELS.get(m, m) for m in metrics},
        "series": series(records, metrics),
        "epochs": epoch_equivalents(records),
        "final": final_model(exp_store),
        "privacy": privacy_view(records, config.privacy),
    }


def privacy_view(records: Sequence[Mapping[str, Any]], privacy: Mapping[str, Any]) -> dict[str, Any] | None:
    """ε spent, from the round records (None: no DP configured).

    ``client``: DP-FedAvg's per-round release (``aggregate.json["privacy"]``): ε of the round, ε in
    total so far, noise multiplier, clip norm; with δ and the budget from the config.
    ``sample``: DP-SGD at the sites: each site's ε after each round (``dp_epsilon`` in the round's
    site metrics; None where the site was not aggregated), its latest, δ and the per-site budget.
    """
    parsed = PrivacySettings.from_mapping(privacy)
    client_cfg, sample_cfg = parsed.client_dp, parsed.sample_dp
    if client_cfg is None and sample_cfg is None:
        return None
    out: dict[str, Any] = {"client": None, "sample": None}
    if client_cfg is not None:
        rows = [
            {
                "round": r["round"],
                **{
                    k: number((r.get("privacy") or {}).get(k))
                    for k in ("epsilon_round", "epsilon_total", "noise_multiplier", "clip_norm")
                },
            }
            for r in records
        ]
        spent = [row["epsilon_total"] for row in rows if row["epsilon_total"] is not None]
        out["client"] = {
            "delta": client_cfg.delta,
            "budget": client_cfg.epsilon,
            "accountant": client_cfg.accountant,
            "total": spent[-1] if spent else 0.0,
            "rounds": rows,
        }
    if sample_cfg is not None:
        sites = sorted({site for r in records for site in r.get("sites", {})})
        per_site = {
            site: [number(r.get("sites", {}).get(site, {}).get("dp_epsilon")) for r in records]
            for site in sites
        }
        out["sample"] = {
            "delta": sample_cfg.delta,
            "budget": sample_cfg.epsilon,
            "accountant": sample_cfg.accountant,
            "rounds": [r["round"] for r in records],
            "sites": per_site,
            "latest": {
                site: next((v for v in reversed(values) if v is not None), None)
                for site, values in per_site.items()
            },
        }
    return out


def _round_row(record: Mapping[str, Any], exp_store: ExperimentStore) -> dict[str, Any]:
    return {
        "round": record["round"],
        "step": record.get("step", record["round"]),
        "included": list(record.get("included", [])),
        "missing": dict(record.get("missing_reasons") or dict.fromkeys(record.get("missing", []), "")),
        "rejected": dict(record.get("rejected", {})),
        "n_samples": record.get("n_samples"),
        "metrics": {k: v for k, v in record.get("metrics", {}).items() if number(v) is not None},
        "failures": sorted(exp_store.site_failures(record["round"])),
        "output_sha256": record.get("output_sha256"),
    }


def settings(exp_store: ExperimentStore) -> dict[str, Any]:
    """The stored config, flattened to ``dotted.key -> value`` (for settings side by side)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key in sorted(value):
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            flat[prefix] = value

    walk("", exp_store.load_config())
    flat["config_hash"] = exp_store.config_hash()
    return flat


def comparison(exp_stores: Sequence[ExperimentStore]) -> dict[str, Any]:
    """Curves of several experiments on shared axes and their settings side by side."""
    if len(exp_stores) < 2:
        raise ValueError("pick two or more experiments to compare")
    curves, all_settings = [], {}
    for exp_store in exp_stores:
        summary = experiment_summary(exp_store)
        records = round_records(exp_store)
        metric = summary["metric"]
        curves.append(
            {
                "experiment": exp_store.experiment,
                "metric": metric,
                "rounds": [r["round"] for r in records],
                "epochs": epoch_equivalents(records),
                "values": [number(r.get("metrics", {}).get(metric)) for r in records],
            }
        )
        all_settings[exp_store.experiment] = settings(exp_store)
    keys = sorted({k for s in all_settings.values() for k in s})
    rows = [{"key": k, "values": [all_settings[e.experiment].get(k) for e in exp_stores]} for k in keys]
    for row in rows:
        row["differs"] = len({repr(v) for v in row["values"]}) > 1
    return {"experiments": [e.experiment for e in exp_stores], "curves": curves, "settings": rows}
