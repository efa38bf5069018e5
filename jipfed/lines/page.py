"""The line pages: every line, and per line its versions and each site's held-out score over time.

:func:`lines_router` is a FastAPI router factory (the plugin mounts it, e.g. at ``/lines``);
:func:`render_line_page` and :func:`render_lines_page` build the HTML from the store alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse, PlainTextResponse

from jipfed.lines.store import LineStore, list_lines
from jipfed.storage.base import ModelStore

_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    ".released{color:#17603a}.rejected{color:#a4161a}.skipped,.failed,.running{color:#555}"
)
CHART_W, CHART_H = 480, 160


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] = ()) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        f"<tr class='{escape(row_classes[i]) if i < len(row_classes) else ''}'>"
        + "".join(f"<td>{escape(_text(c))}</td>" for c in row)
        + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def site_scores(versions: Sequence[dict[str, Any]], metric: str) -> dict[str, list[tuple[str, float | None]]]:
    """Per site, (version, candidate score) of every version in order (None: not evaluated)."""
    sites = sorted(
        {s for v in versions for s in v["evaluation"].get("sites", {})}
        | {s for v in versions for s in v["evaluation"].get("failed", {})}
    )
    return {
        site: [
            (
                v["version"],
                v["evaluation"]
                .get("sites", {})
                .get(site, {})
                .get("metrics", {})
                .get("candidate", {})
                .get(metric),
            )
            for v in versions
        ]
        for site in sites
    }


def _chart(series: dict[str, list[tuple[str, float | None]]]) -> str:
    """An inline SVG: one polyline per site, versions along x, score (0..1) along y."""
    n = max((len(points) for points in series.values()), default=0)
    if n == 0:
        return ""
    step = CHART_W / max(n - 1, 1)
    lines = []
    for i, (site, points) in enumerate(sorted(series.items())):
        xy = [
            f"{k * step:.1f},{CHART_H - (score or 0.0) * CHART_H:.1f}"
            for k, (_, score) in enumerate(points)
            if score is not None
        ]
        hue = (i * 137) % 360
        lines.append(
            f"<polyline fill='none' stroke='hsl({hue},60%,40%)' stroke-width='2' points='{' '.join(xy)}'>"
            f"<title>{escape(site)}</title></polyline>"
        )
    return f"<svg width='{CHART_W}' height='{CHART_H}' role='img' aria-label='score per site over versions'>{''.join(lines)}</svg>"


def render_line_page(store: ModelStore, name: str) -> str:
    """The page of line ``name``: definition, released version, versions, per-site scores, runs."""
    lines = LineStore(store, name)
    line = lines.load()
    metric = line.rule.metric
    versions = lines.versions()
    released = lines.released()
    version_rows = []
    for v in versions:
        weighted = v["evaluation"].get("weighted", {})
        version_rows.append(
            [
                v["version"],
                v["status"],
                v["date"],
                v.get("parent"),
                sum(v["trained"]["n_samples"].values()),
                weighted.get("candidate", {}).get(metric),
                weighted.get("released", {}).get(metric),
                "; ".join(v["verdict"]["reasons"]),
            ]
        )
    scores = site_scores(versions, metric)
    score_rows = [[site, *(score for _, score in points)] for site, points in scores.items()]
    run_rows = [
        [r["slot"], r["status"], r.get("stage"), r.get("version"), r.get("reason", "")] for r in lines.runs()
    ]
    body = (
        f"<p>Sites: {escape(', '.join(line.sites))}; schedule <code>{escape(line.schedule)}</code>; "
        f"replay {line.replay}; rule {escape(str(line.rule.to_dict()))}</p>"
        f"<p>Released: <b id='released'>{escape(released['version']) if released else 'none yet'}</b></p>"
        "<h2>Versions</h2>"
        + _table(
            [
                "version",
                "status",
                "date",
                "parent",
                "cases trained",
                f"weighted {metric}",
                "parent's",
                "verdict",
            ],
            version_rows,
            [v["status"] for v in versions],
        )
        + f"<h2>Held-out {escape(metric)} per site</h2>"
        + _table(["site", *(v["version"] for v in versions)], score_rows)
        + _chart(scores)
        + "<h2>Runs</h2>"
        + _table(["slot", "status", "stage", "version", "reason"], run_rows, [r[1] for r in run_rows])
    )
    return _page(f"Model line {name}", body)


def render_lines_page(store: ModelStore) -> str:
    """Every line with its released version and number of versions."""
    rows = []
    for name in list_lines(store):
        lines = LineStore(store, name)
        released = lines.released()
        rows.append([name, released["version"] if released else None, len(lines.versions())])
    return _page("Model lines", _table(["line", "released", "versions"], rows))


def lines_router(
    store_factory: Callable[[], ModelStore], *, dependencies: Sequence[Depends] = ()
) -> APIRouter:
    """Routes ``/`` (all lines), ``/{line}`` (its page) and ``/{line}/versions/{version}/card``."""
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/", response_class=HTMLResponse)
    def all_lines() -> HTMLResponse:
        return HTMLResponse(render_lines_page(store_factory()))

    @router.get("/{line}", response_class=HTMLResponse)
    def one_line(line: str) -> HTMLResponse:
        try:
            return HTMLResponse(render_line_page(store_factory(), line))
        except (KeyError, ValueError) as exc:
            raise HTTPException(404, str(exc)) from None

    @router.get("/{line}/versions/{version}/card", response_class=PlainTextResponse)
    def card(line: str, version: str) -> PlainTextResponse:
        try:
            return PlainTextResponse(
                LineStore(store_factory(), line).card(version), media_type="text/markdown"
            )
        except (KeyError, ValueError, LookupError) as exc:
            raise HTTPException(404, f"no model card for {line} {version}: {exc}") from None

    return router
