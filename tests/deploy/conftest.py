"""Fixtures of the deployment tests: the suite's wheel, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jipfed.packaging.sources import build_wheel

REPO = Path(__file__).resolve().parents[2]
AF2_PYTHON = REPO / ".venv-af2" / "bin" / "python"


@pytest.fixture(scope="session")
def jipfed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jip-federated wheel built from this checkout."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def isolated_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH and without any pip configuration (index, find-links,
    constraints), so a subprocess sees only what it installs itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """:func:`isolated_env` for an Airflow with its home and SQLite database in ``home``."""
    return isolated_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="false",
                        AIRFLOW__CORE__UNIT_TEST_MODE="true",
                        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db", **extra)
