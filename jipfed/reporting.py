"""Per-round metrics as JSON, CSV and PNG plots (matplotlib, Agg backend: no display needed).

A *round row* is ``{"round": r, "global": {metric: value}, "sites": {site: {metric: value}}}``:
the global model of round ``r`` (round 0 = the untrained initial model) scored on every site's
held-out cases, with ``global`` the case-weighted mean over sites.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RoundRow = Mapping[str, Any]
#: Characters per title line that fit the 7-inch-wide plots at the default title size.
TITLE_WIDTH = 60


def weighted_mean(
    per_site: Mapping[str, Mapping[str, float]], weight_key: str = "n_cases"
) -> dict[str, float]:
    """Mean of each metric over sites, weighted by ``weight_key`` (summed, not averaged).

    Non-finite values (e.g. an undefined AUC) are left out of their metric's mean.
    """
    names = sorted({name for metrics in per_site.values() for name in metrics if name != weight_key})
    out: dict[str, float] = {}
    for name in names:
        pairs = [
            (float(m[weight_key]), float(m[name]))
            for m in per_site.values()
            if name in m and math.isfinite(float(m[name]))
        ]
        total = sum(w for w, _ in pairs)
        if total > 0:
            out[name] = sum(w * v for w, v in pairs) / total
    out[weight_key] = float(sum(float(m.get(weight_key, 0.0)) for m in per_site.values()))
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON (NaN/inf become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def write_rounds_csv(path: Path, rows: Sequence[RoundRow]) -> Path:
    """One CSV line per round and scope: ``round, scope ("global" | "site"), site, <metrics>``."""
    names = sorted(
        {n for row in rows for n in row["global"]}
        | {n for row in rows for m in row["sites"].values() for n in m}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["round", "scope", "site", *names])
        for row in rows:
            writer.writerow([row["round"], "global", "", *(_cell(row["global"].get(n)) for n in names)])
            for site, metrics in sorted(row["sites"].items()):
                writer.writerow([row["round"], "site", site, *(_cell(metrics.get(n)) for n in names)])
    return path


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot_rounds(path: Path, rows: Sequence[RoundRow], metric: str = "dice_mean", title: str = "") -> Path:
    """PNG of ``metric`` per round: the global mean (thick) and each site (thin, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        rounds = [row["round"] for row in rows]
        sites = sorted({site for row in rows for site in row["sites"]})
        for site in sites:
            values = [row["sites"].get(site, {}).get(metric, math.nan) for row in rows]
            ax.plot(rounds, values, "--", marker=".", linewidth=1, label=site)
        ax.plot(
            rounds,
            [row["global"].get(metric, math.nan) for row in rows],
            "k-",
            marker="o",
            linewidth=2.5,
            label="global (case-weighted)",
        )
        ax.set_xlabel("round (0 = initial model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        _finish(fig, ax, path, title or f"{metric} of the global model on each site's held-out cases")
    finally:
        plt.close(fig)
    return path


def wrap_title(title: str, width: int = TITLE_WIDTH) -> str:
    """``title`` broken into lines of at most ``width`` characters (long words are kept whole)."""
    return (
        "\n".join(textwrap.wrap(title, width, break_long_words=False, break_on_hyphens=False))
        if title
        else ""
    )


def _finish(fig: Any, ax: Any, path: Path, title: str) -> None:
    """Title (wrapped to fit the figure), grid, legend, layout; save as ``path``."""
    if title:
        ax.set_title(wrap_title(title), fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(
    path: Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """PNG with one line per named curve of (x, y) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for name, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _finish(fig, ax, path, title)
    finally:
        plt.close(fig)
    return path
