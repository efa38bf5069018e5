"""Influence bounds: sample counts and update norms (jipfed.federation.bounds)."""

from __future__ import annotations

import pytest
import torch

from jipfed.federation.bounds import delta_norm, norm_clips, sample_bound, sample_count_problem, scaled
from jipfed.federation.update import ModelUpdate

HASH = "0" * 64


def _update(kind: str, values: list[float], site: str = "site-a") -> ModelUpdate:
    tensors = {"w": torch.tensor(values), "bn.num_batches_tracked": torch.tensor(5)}
    return ModelUpdate.build(
        tensors, experiment="e", round=0, site=site, kind=kind, n_samples=3, config_hash=HASH
    )


def test_sample_counts_are_bounded_by_the_cohort_and_the_cap_without_overflow() -> None:
    assert sample_bound(100, None) == 100 and sample_bound(100, 7) == 7 and sample_bound(5, 7) == 5
    assert sample_count_problem(7, 100, 7) is None
    assert "cohort of 7" in str(sample_count_problem(8, 100, 7))
    assert "max_site_samples 100" in str(sample_count_problem(101, 100, None))
    huge = 10**308
    assert "309-digit number" in str(sample_count_problem(huge, 100, 7))
    assert "int >= 1" in str(sample_count_problem(0, 100, 7))
    assert "int >= 1" in str(sample_count_problem(True, 100, 7))


def test_the_norm_covers_float_weights_only_and_weights_updates_relative_to_the_start() -> None:
    assert delta_norm(_update("delta", [3.0, 4.0]), {}) == pytest.approx(5.0)
    start = {"w": torch.tensor([1.0, 1.0])}
    assert delta_norm(_update("weights", [4.0, 5.0]), start) == pytest.approx(5.0)


def test_updates_above_the_factor_times_the_lower_median_are_clipped() -> None:
    assert norm_clips({"a": 1.0}, 3.0) == {} and norm_clips({"a": 1.0, "b": 100.0}, None) == {}
    clips = norm_clips({"a": 1.0, "b": 1.2, "c": 100.0}, 3.0)
    assert list(clips) == ["c"]
    assert clips["c"].bound == pytest.approx(3.6) and clips["c"].scale == pytest.approx(0.036)
    assert "clipped to 3.6" in clips["c"].reason()
    two = norm_clips({"a": 1.0, "b": 50.0}, 3.0)  # the lower median: the big one cannot set its own bound
    assert list(two) == ["b"] and two["b"].bound == pytest.approx(3.0)


def test_scaling_changes_only_the_float_weights() -> None:
    out = scaled(_update("delta", [30.0, 40.0]), {}, 0.1)
    assert torch.allclose(out.tensors["w"], torch.tensor([3.0, 4.0]))
    assert int(out.tensors["bn.num_batches_tracked"]) == 5
    start = {"w": torch.tensor([1.0, 1.0]), "bn.num_batches_tracked": torch.tensor(5)}
    weights = scaled(_update("weights", [11.0, 21.0]), start, 0.5)
    assert torch.allclose(weights.tensors["w"], torch.tensor([6.0, 11.0]))
