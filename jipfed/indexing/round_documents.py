"""Round records as flat OpenSearch documents: one per round (all sites) and one per site and round.

A document carries the experiment's settings that filter well in OpenSearch Dashboards (plan,
strategy, config hash), the site's participation (included / missing / rejected, and why), its
sample count and metrics (``metrics.<name>``, numbers only), and the round's duration. The id is
deterministic (``<experiment>:<round>:<site>``, ``_all`` for the round), so indexing is idempotent
and the catch-up can tell what is missing. No patient data is in a round record, so none is here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jipfed.central.ui_data import (
    experiment_summary,
    number,
    participation,
    round_records,
    step_times,
    timing,
)
from jipfed.storage.state import ExperimentStore

ALL_SITES = "_all"


def document_id(experiment: str, round_: int, site: str = ALL_SITES) -> str:
    """The id of a round document (``site`` ``_all``: the round's case-weighted values)."""
    return f"{experiment}:{round_}:{site}"


def _metrics(values: Mapping[str, Any]) -> dict[str, float]:
    return {name: v for name, value in sorted(values.items()) if (v := number(value)) is not None}


def round_documents(exp_store: ExperimentStore) -> dict[str, dict[str, Any]]:
    """``id -> document`` for every closed round of the experiment, read from the store."""
    summary = experiment_summary(exp_store)
    records = round_records(exp_store)
    if not records:
        return {}
    durations = timing(exp_store, summary)["step_seconds"]
    times = step_times(exp_store, max(r["step"] for r in records) + 1)
    docs: dict[str, dict[str, Any]] = {}
    for record in records:
        step = record["step"]
        dispatched = times[step]
        base = {
            "@timestamp": dispatched.isoformat(timespec="milliseconds") if dispatched else None,
            "experiment": summary["experiment"],
            "plan": record.get("plan", summary["plan"]),
            "strategy": record.get("strategy", summary["strategy"]),
            "config_hash": record.get("config_hash"),
            "round": record["round"],
            "step": step,
            "duration_s": durations[step] if step < len(durations) else None,
            "n_included": len(record.get("included", [])),
            "n_selected": len(record.get("selected", summary["sites"])),
        }
        docs[document_id(summary["experiment"], record["round"])] = {
            **base,
            "scope": "round",
            "site": ALL_SITES,
            "n_samples": record.get("n_samples"),
            "output_sha256": record.get("output_sha256"),
            "metrics": _metrics(record.get("metrics", {})),
        }
        for site in record.get("selected", summary["sites"]):
            status, why = participation(record, site)
            site_values = record.get("sites", {}).get(site, {})
            docs[document_id(summary["experiment"], record["round"], site)] = {
                **base,
                "scope": "site",
                "site": site,
                "status": status or "not_selected",
                "reason": why,
                "n_samples": site_values.get("n_samples"),
                "metrics": _metrics({k: v for k, v in site_values.items() if k != "n_samples"}),
            }
    return docs
