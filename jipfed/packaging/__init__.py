"""Deployment packaging: image build contexts, Kaapana extension charts, the offline bundle.

Build-time tools run from a source checkout (they read ``dags/``, ``helm/``, ``containers/`` and
``requirements/``); nothing here is imported by the DAGs, operators or tasks.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (this package lives in ``<root>/jipfed/packaging``).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def source_root() -> Path:
    """The source checkout; ValueError when this is an installed copy without one."""
    missing = [name for name in ("setup.py", "dags", "helm", "containers") if not (SOURCE_ROOT / name).exists()]
    if missing:
        raise ValueError(
            f"{SOURCE_ROOT} is not a JIP Federated source checkout (missing {', '.join(missing)}): "
            "run the packaging tools from a clone of the repository"
        )
    return SOURCE_ROOT
