"""RecordMetricsOperator and the experiment's progress report (``experiments/<exp>/report/``).

The report is rebuilt from every round's ``aggregate.json`` after each step: ``metrics.json``
(one row per round: included sites, missing and rejected sites with reasons, sample-weighted
metrics, per-site metrics), ``metrics.csv`` and a plot (``dice.png`` for segmentation, else the
training loss). Progress reports are overwritten as the experiment advances; the final model and
card stay under ``final/`` (write-once).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment
from jipfed.operators.compat import (
    AirflowNotFoundException,
    AirflowSkipException,
    BaseHook,
    BaseOperator,
    Context,
)

from jipfed.reporting import plot_rounds, write_json, write_rounds_csv
from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

REPORT_DIR = "report/"
#: The OpenSearch Connection RecordMetrics indexes the round records with, when it exists.
DEFAULT_OPENSEARCH_CONN_ID = "jipfed_opensearch_default"
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
    """Rebuild the experiment's progress report from the steps aggregated so far; print the per-round table.

    Writes ``metrics.json``, ``metrics.csv`` and a plot under ``experiments/<exp>/report/``
    (overwritten each step) and returns the report's store keys. In the central DAG it runs while
    the sites train (so a run reports the steps before its own, off the rounds' critical path), as
    a leaf of the run (a failure fails the run, the step still closes); it writes again when a step
    was aggregated meanwhile (:func:`write_settled_report`). A run without a step (``step`` None:
    finished, or finalizing, which writes the report itself) skips it.

    Also collects complete final-model evaluations and rewrites their HTML reports
    (:func:`refresh_html_reports`) and, when the Connection ``opensearch_conn_id`` exists, indexes
    the experiment's round records in OpenSearch (down → logged, caught up by a later run).

    Args:
        experiment: Experiment name (templated).
        step: The step the run handles (templated); None: skipped.
        model_store_conn_id: Connection of the model store (templated).
        opensearch_conn_id: OpenSearch Connection (optional; absent → no indexing).
    """

    template_fields: Sequence[str] = ("experiment", "step", "model_store_conn_id", "opensearch_conn_id")

    def __init__(
        self,
        *,
        experiment: str,
        step: Any = 0,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        opensearch_conn_id: str = DEFAULT_OPENSEARCH_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.experiment = experiment
        self.step = step
        self.model_store_conn_id = model_store_conn_id
        self.opensearch_conn_id = opensearch_conn_id

    def execute(self, context: Context) -> dict[str, str]:
        if self.step is None:
            raise AirflowSkipException(
                f"experiment {self.experiment}: no step in this run, nothing new to report"
            )
        exp_store = open_experiment(self.model_store_conn_id, self.experiment)
        report = write_settled_report(exp_store)
        self.log.info("experiment %s, rounds so far:\n%s", self.experiment, report["table"])
        self.log.info("experiment %s: report written to %s", self.experiment, sorted(report["keys"].values()))
        refresh_html_reports(exp_store)
        index_rounds(exp_store, self.opensearch_conn_id)
        return report["keys"]


def write_settled_report(exp_store: ExperimentStore, tries: int = 5) -> dict[str, Any]:
    """:func:`write_report`, again while a step was aggregated during the writing (at most ``tries``).

    A report task beside the step's own close would otherwise overwrite the report the close wrote
    at the end with one that misses the step: when the history did not change between reading it
    and the end of the writing, the close's own report (written after its aggregation) comes later.
    """
    history = exp_store.load_state().history
    for _ in range(tries):
        report = write_report(exp_store)
        now = exp_store.load_state().history
        if now == history:
            break
        history = now
    return report


def refresh_html_reports(exp_store: ExperimentStore) -> str | None:
    """Collect the final-model evaluations that are complete (any experiment in the store) and
    rewrite their experiments' HTML reports, and ``exp_store``'s when it is finished.

    Returns the key of ``exp_store``'s HTML report when it has a final model, else None.
    """
    from jipfed.central.ui_pages import write_report as write_html_report
    from jipfed.federation.evaluation import collect_final_evaluations
    from jipfed.federation.finalize import FINAL_MODEL

    store = exp_store.store
    for experiment in collect_final_evaluations(store):
        if experiment != exp_store.experiment:
            key = write_html_report(ExperimentStore(store, experiment))
            logger.info(
                "experiment %s: final model scored on its sites; report %s rewritten", experiment, key
            )
    if not store.exists(exp_store.layout.final(f"{FINAL_MODEL}.safetensors")):
        return None
    return write_html_report(exp_store)


def index_rounds(exp_store: ExperimentStore, conn_id: str) -> int | None:
    """Index the experiment's round records in OpenSearch when the Connection ``conn_id`` exists.

    OpenSearch down or refusing never fails the task (the next run catches up); a Connection with
    unknown extra fields is a configuration error and fails it.
    """
    from jipfed.indexing.opensearch import index_quietly, settings_from_connection

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    settings = settings_from_connection(conn.host, conn.port, conn.login, conn.password, conn.extra_dejson)
    return index_quietly(settings, exp_store)
