"""HTML of the experiment pages, shared by the Airflow 3 plugin app, the Airflow 2 view and the report.

Pages take the JSON views of :mod:`jipfed.central.ui_data` and a :class:`Links` that says where
things live in the host (the UI root, Airflow's DAG run pages). Charts are drawn in the browser by
uPlot, vendored under ``static/`` (no CDN); the exported report inlines it, so it opens offline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jipfed.central.ui_data import INCLUDED, MISSING, OPEN, REJECTED, number

#: Seconds between reloads of a running experiment's page.
REFRESH_S = 30
STATIC_FILES = ("uplot/uPlot.iife.min.js", "uplot/uPlot.min.css", "jipfed-charts.js")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
DASHES: tuple[list[int], ...] = ([], [8, 4], [2, 3])
_SYMBOL = {INCLUDED: "&#10003;", MISSING: "&ndash;", REJECTED: "&#10007;", OPEN: "&hellip;", "": ""}

_STYLE = """
.jipfed{font-family:system-ui,sans-serif;color:#222;max-width:1200px;padding:.5em 1em}
.jipfed h1{font-size:1.5em}.jipfed h2{font-size:1.15em;margin-top:1.6em}
.jipfed table{border-collapse:collapse;margin:.5em 0 1.2em}
.jipfed th,.jipfed td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
.jipfed th{background:#f3f3f3}.jipfed td.num{text-align:right;font-variant-numeric:tabular-nums}
.jipfed .failed{color:#b00}.jipfed .finished{color:#070}.jipfed .running{color:#05a}
.jipfed td.included{background:#dff3df}.jipfed td.missing{background:#fde9c8}.jipfed td.rejected{background:#f8d0d0}
.jipfed td.open{background:#e3ecfa}.jipfed td.grid{text-align:center;cursor:help;min-width:2em}
.jipfed .progress{background:#eee;border-radius:4px;height:.8em;width:20em;display:inline-block}
.jipfed .progress span{background:#05a;display:block;height:100%;border-radius:4px}
.jipfed table.settings td{max-width:36em;overflow-wrap:anywhere}
.jipfed .chart{width:100%;min-height:330px}.jipfed .differs{background:#fff6d5}.jipfed .muted{color:#777}
"""


@dataclass(frozen=True)
class Links:
    """Where the pages link to. ``base``: absolute path of the UI root (``/jipfed/ui``);
    ``dag_run(experiment, step)``: the Airflow page of that step's central run (None: no link)."""

    base: str
    dag_run: Callable[[str, int], str | None] = lambda experiment, step: None

    def experiment(self, name: str) -> str:
        return f"{self.base}/experiments/{name}"


def e(value: Any) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell (``-`` when missing or not finite)."""
    value_ = number(value)
    if value_ is None:
        return "-"
    return str(int(value_)) if isinstance(value, int) else f"{value_:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """An HTML table; ``rows`` hold HTML (escape the values first)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(cell: str) -> str:
    return cell if cell.startswith("<td") else f"<td>{cell}</td>"


def _json_script(element_id: str, data: Any) -> str:
    text = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    return f"<script type='application/json' id='{element_id}'>{text}</script>"


def static_text(name: str) -> str:
    """A vendored static file's text (``uplot/uPlot.iife.min.js``, ...)."""
    if name not in STATIC_FILES and name != "uplot/LICENSE":
        raise FileNotFoundError(f"no static file {name!r}")
    return resources.files("jipfed.central").joinpath("static", name).read_text(encoding="utf-8")


def _assets(links: Links | None) -> str:
    """uPlot and the chart script: linked from the package, or inlined (``links`` None: a report file)."""
    if links is None:
        css = f"<style>{static_text('uplot/uPlot.min.css')}</style>"
        scripts = "".join(f"<script>{static_text(n)}</script>" for n in STATIC_FILES if n.endswith(".js"))
        return css + scripts
    return f"<link rel='stylesheet' href='{links.base}/static/uplot/uPlot.min.css'>" + "".join(
        f"<script defer src='{links.base}/static/{n}'></script>" for n in STATIC_FILES if n.endswith(".js")
    )


@dataclass(frozen=True)
class Page:
    """A page in parts, so a host can wrap the body in its own layout (Airflow 2's main template)."""

    title: str
    head: str  # HTML for <head>: refresh, style, chart data and scripts
    body: str  # HTML inside <body>, starting with the <h1> title

    def html(self) -> str:
        """The page as a standalone HTML document."""
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>{self.head}"
            f"</head><body>{self.body}</body></html>"
        )


def page(
    title: str, body: str, *, links: Links | None, charts: Sequence[Any] = (), refresh_s: int = 0
) -> Page:
    """A page; ``charts`` are the specs drawn into ``<div data-chart=i>``."""
    head = f"<meta http-equiv='refresh' content='{refresh_s}'>" if refresh_s else ""
    head += f"<style>{_STYLE}</style>"
    if charts:
        head += _json_script("jipfed-charts", list(charts)) + _assets(links)
    return Page(title, head, f"<div class='jipfed'><h1>{e(title)}</h1>{body}</div>")


def _chart_divs(charts: Sequence[Mapping[str, Any]], first: int = 0) -> str:
    return "".join(
        f"<h2>{e(c['title'])}</h2><div class='chart' data-chart='{first + i}'></div>"
        for i, c in enumerate(charts)
    )


def _status(summary: Mapping[str, Any]) -> str:
    text = f"<b class='{e(summary['status'])}'>{e(summary['status'])}</b>"
    return text + (f": {e(summary['error'])}" if summary.get("error") else "")


# -- list -----------------------------------------------------------------------------------------


def list_page(summaries: Sequence[tuple[str, Mapping[str, Any] | Exception]], links: Links) -> Page:
    """Every experiment with status and progress, and a form to compare a selection."""
    rows = []
    for name, s in summaries:
        pick = f"<input type='checkbox' name='e' value='{e(name)}' aria-label='compare {e(name)}'>"
        link = f"<a href='{links.experiment(e(name))}'>{e(name)}</a>"
        if isinstance(s, Exception):  # one unreadable experiment does not hide the others
            rows.append(
                [
                    pick,
                    link,
                    f"<span class='failed'>unreadable ({e(type(s).__name__)}: {e(s)})</span>",
                    "",
                    "",
                    "",
                ]
            )
            continue
        rows.append(
            [
                pick,
                link,
                _status(s),
                f"{e(s['plan'])} / {e(s['strategy'])}",
                e(", ".join(s["sites"])),
                f"{s['round']} of {s['rounds']} rounds closed (step {s['steps_done']} of {s['steps']})",
            ]
        )
    if not rows:
        return page("JIP Federated experiments", "<p>No experiments in the model store yet.</p>", links=links)
    body = (
        f"<form method='get' action='{links.base}/compare'>"
        + table(["", "experiment", "status", "plan / strategy", "sites", "progress"], rows, "experiments")
        + "<button type='submit'>Compare selected</button></form>"
    )
    return page("JIP Federated experiments", body, links=links)


# -- one experiment -------------------------------------------------------------------------------


def _progress(view: Mapping[str, Any]) -> str:
    s, t = view["summary"], view["timing"]
    done = s["steps_done"] / s["steps"] if s["steps"] else 0.0
    parts = [
        f"<p>Status {_status(s)}. <b id='progress'>{len(view['rounds'])} of {s['rounds']} rounds closed</b> "
        f"(step {s['steps_done']} of {s['steps']} done) "
        f"<span class='progress'><span style='width:{100 * done:.0f}%'></span></span></p>",
        f"<p>{e(s['plan'])} plan, {e(s['strategy'])}, sites {e(', '.join(s['sites']))}. "
        f"Started {e(t['started'] or '-')}; ",
        f"time per round {fmt(t['mean_step_seconds'], 1)} s"
        if t["mean_step_seconds"] is not None
        else "time per round: -",
        f"; expected finish {e(t['expected_finish'])}" if t["expected_finish"] else "",
        f" (as of {e(t['now'])}, refreshes every {REFRESH_S} s)." if s["status"] == "running" else ".",
        "</p>",
    ]
    step = view["open_step"]
    if step is not None:
        rows = [[e(site), e(status), e(detail)] for site, (status, detail) in step["sites"].items()]
        parts.append(
            f"<h2>Open step {step['step']} (round {step['round']}), deadline {e(step['deadline'])}</h2>"
            + table(["site", "status", "detail"], rows)
        )
    return "".join(parts)


def _grid(view: Mapping[str, Any]) -> str:
    if not view["grid"] or not view["grid"][0]["cells"]:
        return ""
    rounds = [c["round"] for c in view["grid"][0]["cells"]]
    rows = []
    for row in view["grid"]:
        cells = [e(row["site"])]
        for c in row["cells"]:
            cells.append(
                f"<td class='grid {c['state']}' title='{e(c['state'])}: {e(c['why'])}' "
                f"data-site='{e(row['site'])}' data-round='{c['round']}'>{_SYMBOL[c['state']]}</td>"
            )
        rows.append(cells)
    legend = "<p class='muted'>&#10003; included, &ndash; missing, &#10007; rejected, &hellip; open; hover a cell for why.</p>"
    return (
        "<h2>Participation (site &times; round)</h2>"
        + table(["site", *(f"round {r}" for r in rounds)], rows, "participation")
        + legend
    )


def _rounds_table(view: Mapping[str, Any], links: Links | None) -> str:
    """The closed rounds; ``links`` None (a report file): no links into the pages or Airflow."""
    s = view["summary"]
    metric = s["metric"]
    exp = s["experiment"]
    rows = []
    for r in view["rounds"]:
        run = links.dag_run(exp, r["step"]) if links else None
        failures = " ".join(
            f"<a href='{links.experiment(e(exp))}/rounds/{r['round']}/failures/{e(site)}'>{e(site)}</a>"
            if links
            else e(site)
            for site in r["failures"]
        )
        rows.append(
            [
                str(r["round"]),
                f"<a target='_top' href='{e(run)}'>step {r['step']}</a>" if run else f"step {r['step']}",
                e(", ".join(r["included"]) or "-"),
                _reasons(r["missing"]),
                _reasons(r["rejected"]),
                f"<td class='num'>{fmt(r['n_samples'])}</td>",
                f"<td class='num metric'>{fmt(r['metrics'].get(metric))}</td>",
                f"<td class='num'>{fmt(r['metrics'].get('train_loss'))}</td>",
                failures or "-",
            ]
        )
    if not rows:
        return "<h2>Rounds</h2><p>No round closed yet.</p>"
    header = [
        "round",
        "central run",
        "included",
        "missing (why)",
        "rejected (why)",
        "cases",
        f"weighted {metric}",
        "weighted train_loss",
        "failure reports",
    ]
    return "<h2>Rounds</h2>" + table(header, rows, "rounds")


def _reasons(reasons: Mapping[str, str]) -> str:
    return (
        "<br>".join(
            f"<b>{e(site)}</b>: {e(why or 'no reason recorded')}" for site, why in sorted(reasons.items())
        )
        or "-"
    )


def _final(view: Mapping[str, Any], links: Links | None) -> str:
    final = view["final"]
    exp = view["summary"]["experiment"]
    if final is None:
        return "<h2>Final model</h2><p>Not published yet (the experiment has not finished).</p>"
    parts = [f"<h2>Final model</h2><p>sha256 <code id='model-sha256'>{e(final['sha256'])}</code></p>"]
    evaluation = final["evaluation"]
    if evaluation:
        parts.append(_scores(evaluation))
    else:
        parts.append("<p id='final-scores'>Final model on every site: <b>not scored</b>.</p>")
    if links is not None:
        parts.append(f"<p><a href='{links.experiment(e(exp))}/report.html'>HTML report (now)</a>")
        if final["report"]:
            parts.append(
                f" &middot; <a href='{links.experiment(e(exp))}/final/report.html'>"
                "HTML report stored with the final model</a>"
            )
        parts.append("</p>")
    return "".join(parts)


def _scores(evaluation: Mapping[str, Any]) -> str:
    """The final model's scores per site (federated evaluation summary), the weighted mean last."""
    parts = []
    for label in evaluation.get("models", {}):
        answers = {
            site: {"n_cases": a.get("n_cases"), **a.get("metrics", {}).get(label, {})}
            for site, a in sorted(evaluation.get("sites", {}).items())
        }
        weighted = evaluation.get("weighted", {}).get(label, {})
        names = sorted({m for v in answers.values() for m in v if m != "n_cases"} | set(weighted))
        rows = [
            [e(site), *(f"<td class='num'>{fmt(v.get(m))}</td>" for m in ["n_cases", *names])]
            for site, v in answers.items()
        ]
        rows.append(
            ["<b>case-weighted</b>", "", *(f"<td class='num'>{fmt(weighted.get(m))}</td>" for m in names)]
        )
        heading = "scored on every site" if "waiting" not in evaluation else "scored so far"
        parts.append(
            f"<p>Final model ({e(label)}) {heading}:</p>"
            + table(["site", "held-out cases", *names], rows, "final-scores")
        )
    failed = evaluation.get("failed", {})
    if failed:
        parts.append(f"<p>Not scored at: {_reasons(failed)}</p>")
    waiting = evaluation.get("waiting", [])
    if waiting:
        parts.append(f"<p>Still scoring at: {e(', '.join(waiting))} (answers so far are shown).</p>")
    return "".join(parts)


def experiment_charts(view: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Chart specs: the case-weighted value (black, thick) and each site's (one colour per site),
    one dash style per metric."""
    series, labels = view["series"], view["labels"]
    sites = list(series["sites"])
    charts = []
    for chart in view["charts"]:
        owners = [("all sites", "#000", 3, series["global"])]
        owners += [
            (site, COLORS[i % len(COLORS)], 1.5, series["sites"][site]) for i, site in enumerate(sites)
        ]
        lines = [
            {
                "label": f"{owner}: {labels[m]}",
                "values": values[m],
                "color": color,
                "width": width,
                "dash": DASHES[j % len(DASHES)],
            }
            for owner, color, width, values in owners
            for j, m in enumerate(chart["metrics"])
            if any(v is not None for v in values[m])
        ]
        charts.append(
            {
                "title": chart["title"],
                "xlabel": "round",
                "x": series["rounds"],
                "lines": lines,
                "integer_x": True,
            }
        )
    return charts


def experiment_body(view: Mapping[str, Any], links: Links | None) -> str:
    """The experiment's sections (shared by its page and its exported report)."""
    charts = experiment_charts(view) if view["rounds"] else []
    return "".join(
        [
            _progress(view),
            _grid(view),
            _chart_divs(charts),
            _rounds_table(view, links),
            _privacy(view.get("privacy")),
            _final(view, links),
        ]
    )


def _budget(budget: float | None) -> str:
    return fmt(budget, 3) if budget is not None else "none set"


def _privacy(privacy: Mapping[str, Any] | None) -> str:
    """ε spent: client level per round and in total, sample level per site and round (with δ, budget)."""
    if privacy is None:
        return ""
    parts = ["<h2>Privacy (&epsilon;, &delta;)</h2>"]
    client = privacy["client"]
    if client is not None:
        parts.append(
            "<p id='client-dp'>Client-level DP (DP-FedAvg): &epsilon; spent "
            f"<b class='epsilon-total'>{fmt(client['total'], 3)}</b> of budget "
            f"<span class='epsilon-budget'>{_budget(client['budget'])}</span> at &delta; = "
            f"<span class='delta'>{e(client['delta'])}</span> ({e(client['accountant'])} accountant)</p>"
        )
        rows = [
            [
                str(r["round"]),
                f"<td class='num'>{fmt(r['epsilon_round'], 3)}</td>",
                f"<td class='num'>{fmt(r['epsilon_total'], 3)}</td>",
                f"<td class='num'>{fmt(r['noise_multiplier'], 3)}</td>",
                f"<td class='num'>{fmt(r['clip_norm'], 4)}</td>",
            ]
            for r in client["rounds"]
        ]
        header = ["round", "ε this round", "ε total", "noise multiplier", "clip norm"]
        parts.append(table(header, rows, "client-epsilon"))
    sample = privacy["sample"]
    if sample is not None:
        latest = ", ".join(f"{e(site)} {fmt(eps, 3)}" for site, eps in sample["latest"].items()) or "-"
        parts.append(
            "<p id='sample-dp'>Sample-level DP (DP-SGD at each site): latest &epsilon; per site "
            f"<span class='epsilon-latest'>{latest}</span>; budget per site "
            f"<span class='epsilon-budget'>{_budget(sample['budget'])}</span> at &delta; = "
            f"<span class='delta'>{e(sample['delta'])}</span> ({e(sample['accountant'])} accountant)</p>"
        )
        sites = list(sample["sites"])
        rows = [
            [str(r), *(f"<td class='num'>{fmt(sample['sites'][s][i], 3)}</td>" for s in sites)]
            for i, r in enumerate(sample["rounds"])
        ]
        parts.append(table(["round", *(f"ε {s}" for s in sites)], rows, "sample-epsilon"))
    return "".join(parts)


def experiment_page(view: Mapping[str, Any], links: Links) -> Page:
    """One experiment's page; reloads itself every REFRESH_S seconds while it runs."""
    s = view["summary"]
    nav = f"<p><a href='{links.base}/experiments'>all experiments</a></p>"
    charts = experiment_charts(view) if view["rounds"] else []
    refresh = REFRESH_S if s["status"] == "running" else 0
    return page(
        f"Experiment {s['experiment']}",
        nav + experiment_body(view, links),
        links=links,
        charts=charts,
        refresh_s=refresh,
    )


def settings_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """Settings side by side; rows whose values differ are highlighted."""
    body = [
        [
            f"<td class='{'differs' if r['differs'] else ''}'>{e(r['key'])}</td>",
            *(e(json.dumps(v)) if v is not None else "-" for v in r["values"]),
        ]
        for r in rows
    ]
    return table(["setting", *names], body, "settings")


def report_page(view: Mapping[str, Any]) -> Page:
    """A self-contained HTML report (plots, per-round table, settings, model hash): opens offline."""
    s = view["summary"]
    rows = [{"key": k, "values": [v], "differs": False} for k, v in sorted(view["settings"].items())]
    body = experiment_body(view, None) + "<h2>Settings</h2>" + settings_table(rows, [s["experiment"]])
    charts = experiment_charts(view) if view["rounds"] else []
    return page(f"Report: experiment {s['experiment']}", body, links=None, charts=charts)


# -- comparison -----------------------------------------------------------------------------------


def comparison_charts(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Two overlays: the metric per round and per epoch-equivalent (x values merged, gaps bridged)."""
    charts = []
    for key, xlabel in (("rounds", "round"), ("epochs", "local epochs (cumulative, case-weighted)")):
        xs = sorted({x for c in data["curves"] for x in c[key] if x is not None})
        lines = []
        for curve in data["curves"]:
            at = {x: v for x, v in zip(curve[key], curve["values"], strict=True) if x is not None}
            lines.append(
                {
                    "label": f"{curve['experiment']}: {curve['metric']}",
                    "values": [at.get(x) for x in xs],
                    "width": 2,
                    "color": COLORS[len(lines) % len(COLORS)],
                }
            )
        metric = ", ".join(sorted({c["metric"] for c in data["curves"]}))
        charts.append(
            {
                "title": f"{metric} per {xlabel.split(' (')[0]}",
                "xlabel": xlabel,
                "x": xs,
                "lines": lines,
                "integer_x": key == "rounds",
            }
        )
    return charts


def comparison_page(data: Mapping[str, Any], links: Links) -> Page:
    """Curves of two or more experiments overlaid, their settings side by side."""
    names = data["experiments"]
    nav = f"<p><a href='{links.base}/experiments'>all experiments</a></p>"
    charts = comparison_charts(data)
    rows = [
        [
            f"<a href='{links.experiment(e(c['experiment']))}'>{e(c['experiment'])}</a>",
            *(f"<td class='num'>{fmt(v)}</td>" for v in c["values"]),
        ]
        for c in data["curves"]
    ]
    n_rounds = max((len(c["values"]) for c in data["curves"]), default=0)
    values = table(["experiment", *(f"round {r}" for r in range(n_rounds))], rows, "compare-values")
    body = nav + _chart_divs(charts) + "<h2>Values per round</h2>" + values
    body += "<h2>Settings</h2>" + settings_table(data["settings"], names)
    return page(f"Compare {', '.join(names)}", body, links=links, charts=charts)


def failure_page(experiment: str, round_: int, site: str, record: Mapping[str, Any], links: Links) -> Page:
    """A site's failure report of one round (already sanitised when it was recorded)."""
    rows = [[e(k), e(v)] for k, v in sorted(record.items())]
    nav = f"<p><a href='{links.experiment(e(experiment))}'>experiment {e(experiment)}</a></p>"
    return page(
        f"Failure report: {site}, round {round_} of {experiment}",
        nav + table(["field", "value"], rows),
        links=links,
    )
