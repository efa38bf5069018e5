from __future__ import annotations

import pytest
import torch

from jipfed.federation.update import TensorSpec
from jipfed.federation.validation import (
    ExpectedUpdate,
    UpdateRejected,
    check_finite,
    check_manifest,
    check_specs,
    check_tensors,
)

from .helpers import CONFIG_HASH, EXPERIMENT, t, update

SPECS = {"w": TensorSpec((2,), "float32"), "n": TensorSpec((), "int64")}


def _expected(**changes: object) -> ExpectedUpdate:
    values = {
        "experiment": EXPERIMENT,
        "round": 1,
        "site": "site-a",
        "config_hash": CONFIG_HASH,
        "tensors": SPECS,
    }
    values.update(changes)
    return ExpectedUpdate(**values)  # type: ignore[arg-type]


def test_rejection_carries_site_round_and_reason() -> None:
    exc = UpdateRejected("site-a", 4, "tensor 'w' has 1 NaN/Inf values")
    assert (exc.site, exc.round, exc.reason) == ("site-a", 4, "tensor 'w' has 1 NaN/Inf values")
    assert str(exc) == "update from site 'site-a' for round 4 rejected: tensor 'w' has 1 NaN/Inf values"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"site": "a/b"}, "invalid site"),
        ({"round": -1}, "round"),
        ({"config_hash": "x"}, "config_hash"),
        ({"tensors": {}}, "non-empty"),
        ({"kinds": ("gradient",)}, "kinds"),
        ({"min_samples": -1}, "min_samples"),
        ({"max_delta_norm": 0.0, "kinds": ("delta",)}, "max_delta_norm"),
        ({"max_delta_norm": float("inf"), "kinds": ("delta",)}, "max_delta_norm"),
        ({"reference": {"w": t(1, 2)}}, "reference weights do not match"),
    ],
)
def test_expected_update_validates_its_arguments(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _expected(**changes)


def test_check_manifest_accepts_the_expected_update() -> None:
    u = update({"w": t(1, 2), "n": torch.tensor(1)}, n_samples=2)
    check_manifest(u.manifest, _expected())
    with pytest.raises(UpdateRejected, match="n_samples 2 < 3"):
        check_manifest(u.manifest, _expected(min_samples=3))


def test_check_specs_names_the_first_difference() -> None:
    got = {"w": TensorSpec((2,), "float32"), "n": TensorSpec((1,), "int64")}
    with pytest.raises(UpdateRejected, match=r"payload tensor 'n' has shape \(1,\), expected \(\)"):
        check_specs(got, SPECS, "site-a", 1, what="payload")


def test_check_finite_ignores_integers_and_counts_bad_values() -> None:
    check_finite("n", torch.tensor([1, 2]), "site-a", 1)
    with pytest.raises(UpdateRejected, match="2 NaN/Inf"):
        check_finite("w", t(float("nan"), 1, float("-inf")), "site-a", 1)


def test_check_tensors_bounds_the_delta_norm_over_float_tensors_only() -> None:
    u = update({"w": t(6, 8), "n": torch.tensor(1000)})
    check_tensors(u.tensors, u.manifest, _expected(max_delta_norm=10.0, kinds=("delta",)))
    with pytest.raises(UpdateRejected, match="delta L2 norm 10 exceeds"):
        check_tensors(u.tensors, u.manifest, _expected(max_delta_norm=9.99, kinds=("delta",)))
