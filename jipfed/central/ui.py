"""Experiment pages for people: a list of experiments and one page per experiment with its rounds.

``ui_router(store_factory, dependencies=[...])`` returns the routes; the Airflow plugin mounts them
under ``/jipfed/ui`` behind Airflow's own authentication (this module has no Airflow import)::

    GET /experiments                  every experiment: status, plan, progress
    GET /experiments/{exp}            status, the open step's sites, one row per closed round
                                      (included, missing with reasons, rejected, weighted val Dice)
    GET /experiments/{exp}/plot.png   the sites' val Dice per round (matplotlib, rendered here)

Everything is read from the model store on each request; nothing is cached.
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, Response

from jipfed import reporting
from jipfed.federation.dispatch import current_dispatch, experiment_config, experiments_in, site_status
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore

#: The per-round score shown, by task: sample-weighted mean of the sites' held-out scores.
METRIC_OF_TASK = {"segmentation": "val_dice_mean", "classification": "val_auc"}
_PLOT_LOCK = threading.Lock()  # pyplot keeps global state

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.failed{color:#b00}.finished{color:#070}.running{color:#05a}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; ``rows`` hold HTML (escape the values first)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _reasons(reasons: Mapping[str, str]) -> str:
    return "<br>".join(f"<b>{_e(site)}</b>: {_e(why)}" for site, why in sorted(reasons.items())) or "-"


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    return "-"


def experiment_summary(exp_store: ExperimentStore) -> dict[str, Any]:
    """Status and progress of one experiment (for the list page)."""
    config = experiment_config(exp_store)
    state = exp_store.load_state()
    n_steps = config.make_plan().n_steps
    return {
        "experiment": exp_store.experiment,
        "status": state.status.value,
        "plan": config.plan,
        "strategy": config.strategy,
        "sites": list(config.sites),
        "steps_done": state.next_step,
        "steps": n_steps,
        "round": min(state.current_round, config.rounds),
        "rounds": config.rounds,
        "error": state.error,
    }


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
    return [exp_store.load_aggregate(r) for r in rounds]


def plot_png(records: Sequence[Mapping[str, Any]], metric: str, title: str) -> bytes:
    """PNG of ``metric`` per round: the sample-weighted mean (thick) and each site's value."""
    rows = [
        {
            "round": record["round"],
            "global": {k: v for k, v in record.get("metrics", {}).items() if k == metric},
            "sites": {
                site: {metric: values[metric]}
                for site, values in record.get("sites", {}).items()
                if isinstance(values.get(metric), (int, float))
            },
        }
        for record in records
    ]
    with tempfile.TemporaryDirectory(prefix="jipfed-plot-") as folder, _PLOT_LOCK:
        path = reporting.plot_rounds(FilePath(folder) / "plot.png", rows, metric=metric, title=title)
        return path.read_bytes()


def _list_page(store: ModelStore) -> str:
    rows = []
    for name in experiments_in(store):
        link = f"<a href='experiments/{_e(name)}'>{_e(name)}</a>"
        try:
            s = experiment_summary(ExperimentStore(store, name))
        except Exception as exc:  # one unreadable experiment does not hide the others
            rows.append(
                [link, f"<span class='failed'>unreadable ({_e(type(exc).__name__)})</span>", "", "", ""]
            )
            continue
        status = f"<span class='{_e(s['status'])}'>{_e(s['status'])}</span>"
        if s["error"]:
            status += f"<br>{_e(s['error'])}"
        rows.append(
            [
                link,
                status,
                f"{_e(s['plan'])} / {_e(s['strategy'])}",
                _e(", ".join(s["sites"])),
                f"step {s['steps_done']} of {s['steps']} (round {s['round']} of {s['rounds']})",
            ]
        )
    body = (
        _table(["experiment", "status", "plan / strategy", "sites", "progress"], rows)
        if rows
        else "<p>No experiments in the model store yet.</p>"
    )
    return _page("JIP Federated experiments", body)


def _experiment_page(exp_store: ExperimentStore) -> str:
    s = experiment_summary(exp_store)
    config = experiment_config(exp_store)
    metric = METRIC_OF_TASK.get(config.train.task, "val_dice_mean")
    parts = [
        "<p><a href='../experiments'>all experiments</a></p>",
        f"<p>Status <b class='{_e(s['status'])}'>{_e(s['status'])}</b>"
        + (f": {_e(s['error'])}" if s["error"] else "")
        + f"; {_e(config.plan)} plan, {_e(config.strategy)}, {config.rounds} round(s), sites "
        f"{_e(', '.join(config.sites))}; step {s['steps_done']} of {s['steps']} done.</p>",
    ]
    dispatch = current_dispatch(exp_store)
    if dispatch is not None:
        ticket = dispatch.ticket
        site_rows = [[_e(site), *map(_e, site_status(exp_store, dispatch, site))] for site in ticket.sites]
        parts.append(
            f"<h2>Open step {ticket.step} (round {ticket.round}), deadline "
            f"{_e(dispatch.deadline.isoformat(timespec='seconds'))}</h2>"
            + _table(["site", "status", "detail"], site_rows)
        )
    records = round_records(exp_store)
    rows = [
        [
            str(r["round"]),
            _e(", ".join(r.get("included", [])) or "-"),
            _reasons(
                r.get("missing_reasons") or {site: "no reason recorded" for site in r.get("missing", [])}
            ),
            _reasons(r.get("rejected", {})),
            _number(r.get("n_samples")),
            _number(r.get("metrics", {}).get(metric)),
        ]
        for r in records
    ]
    parts.append("<h2>Rounds</h2>")
    if rows:
        parts.append(
            _table(
                ["round", "included", "missing (why)", "rejected (why)", "cases", f"weighted {metric}"], rows
            )
        )
        parts.append(f"<img src='{_e(exp_store.experiment)}/plot.png' alt='{_e(metric)} per round'>")
    else:
        parts.append("<p>No round closed yet.</p>")
    return _page(f"Experiment {exp_store.experiment}", "".join(parts))


def ui_router(store_factory: Callable[[], ModelStore], *, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """The experiment pages; ``dependencies`` guard every route (the plugin passes Airflow's auth)."""
    router = APIRouter(dependencies=list(dependencies))

    def experiment(name: str) -> ExperimentStore:
        store = store_factory()
        try:
            exp_store = ExperimentStore(store, name)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if not store.exists(exp_store.layout.state()):
            raise HTTPException(404, f"no experiment {name!r} in the model store")
        return exp_store

    @router.get("/experiments", response_class=HTMLResponse)
    def list_experiments() -> str:
        return _list_page(store_factory())

    @router.get("/experiments/{name}", response_class=HTMLResponse)
    def show_experiment(name: str) -> str:
        return _experiment_page(experiment(name))

    @router.get("/experiments/{name}/plot.png")
    def plot(name: str) -> Response:
        exp_store = experiment(name)
        config = experiment_config(exp_store)
        metric = METRIC_OF_TASK.get(config.train.task, "val_dice_mean")
        records = round_records(exp_store)
        if not records:
            raise HTTPException(404, f"experiment {name!r} has no closed round to plot yet")
        title = f"{name}: {metric} per round (sites' held-out cases after local training)"
        return Response(plot_png(records, metric, title), media_type="image/png")

    return router
