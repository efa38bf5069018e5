"""Kaapana extension charts: stage a chart with its dag-installer-chart dependency, package it.

Our charts share one templates folder (a symbolic link); staging copies the files it points to, and
puts Kaapana's ``dag-installer-chart`` into ``charts/`` as ``helm dependency update`` would from a
Kaapana source tree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jipfed.packaging import source_root

CHARTS = ("jipfed-site-workflow", "jipfed-central-workflow")
DAG_INSTALLER = "dag-installer-chart"


def stage_chart(name: str, dag_installer: Path, dest: Path) -> Path:
    """Copy chart ``name`` to ``dest/<name>`` (links resolved) with ``dag_installer`` in its charts/."""
    if not (dag_installer / "Chart.yaml").is_file():
        raise ValueError(
            f"{dag_installer} is not a chart folder (no Chart.yaml): pass Kaapana's "
            f"services/utils/{DAG_INSTALLER} from a Kaapana source tree of the platform's version"
        )
    target = dest / name
    shutil.copytree(source_root() / "helm" / name, target, symlinks=False)
    shutil.copytree(dag_installer, target / "charts" / DAG_INSTALLER, symlinks=False)
    return target


def package_charts(dag_installer: Path, out: Path, work: Path) -> list[Path]:
    """Package every chart to ``out/<name>-<version>.tgz`` (staged under ``work``)."""
    import helm_python  # build-time only (helm-python-sdk, in the [test] extra)

    out.mkdir(parents=True, exist_ok=True)
    return [
        Path(helm_python.package(stage_chart(name, dag_installer, work), destination=out)) for name in CHARTS
    ]
