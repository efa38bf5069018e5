"""RecordMetricsOperator and the experiment's progress report (``experiments/<exp>/report/``).

The report is rebuilt from every round's ``aggregate.json`` after each step: ``metrics.json``
(one row per round: included sites, missing and rejected sites with reasons, sample-weighted
metrics, per-site metrics), ``metrics.csv`` and a plot (``dice.png`` for segmentation, else the
training loss). Progress reports are overwritten as the experiment advances; the final model and
card stay under ``final/`` (write-once).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment
from jipfed.operators.compat import BaseOperator, Context

from jipfed.reporting import plot_rounds, write_json, write_rounds_csv
from jipfed.storage.state import ExperimentStore

REPORT_DIR = "report/"
#: Metrics the table and the plot prefer, in order (the first one present is plotted).
PLOT_METRICS = ("val_dice_mean", "val_auc", "train_loss")
TABLE_METRICS = ("val_dice_mean", "val_auc", "train_loss")


def report_key(exp_store: ExperimentStore, name: str) -> str:
    """Store key of a report file: ``experiments/<exp>/report/<name>``."""
    return f"{exp_store.layout.prefix}{REPORT_DIR}{name}"


def round_rows(exp_store: ExperimentStore) -> list[dict[str, Any]]:
    """One row per round that has an ``aggregate.json`` so far, in round order."""
    state = exp_store.load_state()
    rows = []
    for round_ in sorted({record.round for record in state.history}):
        key = exp_store.layout.aggregate(round_)
        if not exp_store.store.exists(key):
            continue  # a cyclic round whose last hop is still open
        record = exp_store.store.get_json(key)
        rows.append(
            {
                "round": round_,
                "step": record["step"],
                "included": list(record["included"]),
                "missing": dict(record.get("missing_reasons") or {s: "" for s in record["missing"]}),
                "rejected": dict(record["rejected"]),
                "n_samples": record["n_samples"],
                "global": {"n_samples": record["n_samples"], **record["metrics"]},
                "sites": dict(record["sites"]),
            }
        )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a fixed-width text table for the task log."""
    metrics = [m for m in TABLE_METRICS if any(m in row["global"] for row in rows)]
    header = ["round", "included", "n_samples", *metrics, "missing / rejected (reason)"]
    lines = []
    for row in rows:
        absent = [f"{site} ({reason})" for site, reason in row["missing"].items()]
        absent += [f"{site} (rejected: {reason})" for site, reason in row["rejected"].items()]
        lines.append(
            [
                str(row["round"]),
                ",".join(row["included"]) or "-",
                str(row["n_samples"]),
                *(_number(row["global"].get(m)) for m in metrics),
                "; ".join(absent) or "-",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in [header, *lines]
    )


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.4f}"
    return "-"


def write_report(exp_store: ExperimentStore) -> dict[str, Any]:
    """Rebuild the progress report in the store; returns ``{"rows", "keys", "table"}``."""
    rows = round_rows(exp_store)
    keys = {}
    with tempfile.TemporaryDirectory(prefix="jipfed-report-") as tmp:
        folder = Path(tmp)
        files = [
            write_json(folder / "metrics.json", {"experiment": exp_store.experiment, "rounds": rows}),
            write_rounds_csv(folder / "metrics.csv", rows),
        ]
        metric = next((m for m in PLOT_METRICS if any(m in row["global"] for row in rows)), None)
        if metric is not None:
            name = "dice.png" if metric == "val_dice_mean" else f"{metric}.png"
            files.append(
                plot_rounds(
                    folder / name,
                    rows,
                    metric=metric,
                    title=f"{exp_store.experiment}: {metric} per round (sites' held-out cases after local training)",
                )
            )
        for path in files:
            key = report_key(exp_store, path.name)
            exp_store.store.put_bytes(key, path.read_bytes(), overwrite=True)
            keys[path.name] = key
    return {"rows": rows, "keys": keys, "table": format_table(rows)}


class RecordMetricsOperator(BaseOperator):
    """Rebuild the experiment's progress report after a step and print the per-round table.

    Writes ``metrics.json``, ``metrics.csv`` and a plot under ``experiments/<exp>/report/``
    (overwritten each step) and returns the report's store keys.

    Args:
        experiment: Experiment name (templated).
        model_store_conn_id: Connection of the model store (templated).
    """

    template_fields: Sequence[str] = ("experiment", "model_store_conn_id")

    def __init__(
        self, *, experiment: str, model_store_conn_id: str = DEFAULT_STORE_CONN_ID, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.experiment = experiment
        self.model_store_conn_id = model_store_conn_id

    def execute(self, context: Context) -> dict[str, str]:
        report = write_report(open_experiment(self.model_store_conn_id, self.experiment))
        self.log.info("experiment %s, rounds so far:\n%s", self.experiment, report["table"])
        self.log.info("experiment %s: report written to %s", self.experiment, sorted(report["keys"].values()))
        return report["keys"]
