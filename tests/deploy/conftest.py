"""Fixtures of the deployment tests: the suite's wheel, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from jipfed.packaging.sources import build_wheel

REPO = Path(__file__).resolve().parents[2]
AF2_PYTHON = REPO / ".venv-af2" / "bin" / "python"


@pytest.fixture(scope="session")
def jipfed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jip-federated wheel built from this checkout."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))
