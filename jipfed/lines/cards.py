"""The model card of a released line version (Markdown): what it is, what it was trained on, how it scored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jipfed.lines.definition import LineConfig
from jipfed.training.config import TrainConfig


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def metric_rows(evaluation: Mapping[str, Any], metric: str) -> list[tuple[str, str, str, str]]:
    """(site, held-out cases, candidate score, released score) per site, then the weighted row."""
    rows = []
    for site, record in sorted(evaluation.get("sites", {}).items()):
        metrics = record.get("metrics", {})
        rows.append(
            (
                site,
                str(record.get("n_cases")),
                _fmt(metrics.get("candidate", {}).get(metric)),
                _fmt(metrics.get("released", {}).get(metric)),
            )
        )
    for site, reason in sorted(evaluation.get("failed", {}).items()):
        rows.append((site, "–", f"not evaluated: {reason}", "–"))
    weighted = evaluation.get("weighted", {})
    rows.append(
        (
            "weighted",
            str(sum(int(r.get("n_cases", 0)) for r in evaluation.get("sites", {}).values())),
            _fmt(weighted.get("candidate", {}).get(metric)),
            _fmt(weighted.get("released", {}).get(metric)),
        )
    )
    return rows


def model_card(line: LineConfig, record: Mapping[str, Any]) -> str:
    """Markdown model card of version ``record`` (see :meth:`LineStore.save_version`)."""
    train = TrainConfig.from_dict(dict(record["train"]))
    metric = line.rule.metric
    census = record["census"]["sites"]
    lines = [
        f"# {line.name} {record['version']}",
        "",
        f"- released: {record['date']} (run of {record['slot']})",
        f"- parent version: {record.get('parent') or 'none (first version)'}",
        f"- model: {train.task}, {train.model} ({train.size}); sha256 `{record['sha256']}`",
        f"- local training: {train.steps or train.epochs} {'steps' if train.steps else 'epochs'}, "
        f"{train.optimizer} lr {train.lr}, batch {train.batch_size}",
        f"- training: experiment `{record['experiment']}`, {line.rounds} round(s) from the parent, "
        f"replay sample {line.replay} case(s) per site",
        f"- release rule: {line.rule.to_dict()}",
        f"- verdict: {'; '.join(record['verdict']['reasons'])}",
        "- intended use: research; not for clinical use",
        "",
        "## Data per site (counts only)",
        "",
        "| site | new cases | total cases | trained on (new + replay) |",
        "|---|---|---|---|",
    ]
    trained = record["trained"]["n_samples"]
    for site in sorted(census):
        counts = census[site]
        lines.append(
            f"| {site} | {counts['new_cases']} | {counts['total_cases']} | "
            f"{trained.get(site, 0)} ({counts['train_new']} + {counts['train_replay']}) |"
        )
    lines += [
        "",
        f"## Held-out {metric} (federated evaluation)",
        "",
        "| site | cases | this version | parent |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in metric_rows(record["evaluation"], metric)]
    return "\n".join(lines) + "\n"
