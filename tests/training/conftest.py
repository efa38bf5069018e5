"""Fixtures for the training tests: one torch thread, tiny synthetic sites."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .synth import write_site


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def site_factory(tmp_path: Path) -> Callable[..., Path]:
    """Call ``site_factory(name, n_cases, **kw)`` to get a site folder under tmp_path."""

    def make(name: str, n_cases: int, **kwargs) -> Path:
        return write_site(tmp_path / name, n_cases, **kwargs)

    return make
