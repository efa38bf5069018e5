"""Shared fixtures of the line tests: a folder store and two tiny synthetic sites."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jipfed.lines.definition import LineConfig
from jipfed.lines.rule import ReleaseRule
from jipfed.storage.local import LocalFolderStore

#: A tiny, fast line: tiny U-Net, 10 local steps (enough to score clearly above a broken model),
#: one round, one replay case per site.
TINY_EXPERIMENT = {
    "train": {"size": "tiny", "steps": 10, "batch_size": 2, "lr": 0.01, "val_fraction": 0.25},
    "round_timeout_s": 120,
    "min_sites": 1,
}


def tiny_line(
    name: str = "glioma", sites: tuple[str, ...] = ("site-a", "site-b"), **changes: object
) -> LineConfig:
    values: dict = {
        "name": name,
        "sites": list(sites),
        "experiment": TINY_EXPERIMENT,
        "replay": 1,
        "rule": ReleaseRule(metric="dice_mean", site_tolerance=0.05).to_dict(),
        "evaluation_timeout_s": 120,
        "census_timeout_s": 120,
    }
    values.update(changes)
    return LineConfig.from_dict(values)


@pytest.fixture
def store(tmp_path: Path) -> LocalFolderStore:
    torch.set_num_threads(1)
    return LocalFolderStore(tmp_path / "central")
