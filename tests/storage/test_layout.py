"""Object key layout (docs/protocol.md) and name validation."""

from __future__ import annotations

import pytest

from jipfed.storage.base import validate_key, validate_prefix
from jipfed.storage.layout import ExperimentLayout, validate_round, validate_slug

BAD_NAMES = ["", "../x", "..", "a/b", "a..b", ".hidden", "x.y", "a b", "-lead", "ü", "x" * 65, None, 3]


def test_keys_follow_protocol() -> None:
    lay = ExperimentLayout("brats-2025")
    assert lay.config() == "experiments/brats-2025/config.json"
    assert lay.state() == "experiments/brats-2025/state.json"
    assert lay.global_model(3) == "experiments/brats-2025/rounds/3/global.safetensors"
    assert lay.global_manifest(3) == "experiments/brats-2025/rounds/3/global.json"
    assert lay.update(3, "site_A") == "experiments/brats-2025/rounds/3/updates/site_A.safetensors"
    assert lay.update_manifest(3, "site_A") == "experiments/brats-2025/rounds/3/updates/site_A.json"
    assert lay.aggregate(0) == "experiments/brats-2025/rounds/0/aggregate.json"
    assert lay.final("plots/loss.png") == "experiments/brats-2025/final/plots/loss.png"
    assert lay.updates_prefix(10) == "experiments/brats-2025/rounds/10/updates/"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_experiment_and_site_names_are_refused(name: object) -> None:
    with pytest.raises(ValueError, match="invalid experiment name"):
        ExperimentLayout(name)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid site id"):
        ExperimentLayout("e1").update(0, name)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "Site-01", "x" * 64, "7_b"])
def test_safe_slugs_pass(name: str) -> None:
    assert validate_slug(name) == name


@pytest.mark.parametrize("value", [-1, True, 1.0, "1", None])
def test_bad_rounds_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="round must be an int"):
        validate_round(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="round must be an int"):
        ExperimentLayout("e1").global_model(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["../config.json", "a/../../b", "/abs", "a//b", ".x", "a\\b", ""])
def test_final_names_cannot_escape(name: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        ExperimentLayout("e1").final(name)


@pytest.mark.parametrize("key", ["", "/a", "a/", "a//b", "a/../b", "./a", "a/.tmp", "a\\b", "a\nb", "é"])
def test_validate_key_refuses(key: str) -> None:
    with pytest.raises(ValueError):
        validate_key(key)


def test_validate_prefix_accepts_folders_and_partial_names() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("experiments/e1/") == "experiments/e1/"
    assert validate_prefix("experiments/e1/rounds/1") == "experiments/e1/rounds/1"
    with pytest.raises(ValueError):
        validate_prefix("../")


def test_parsing_keys_back() -> None:
    lay = ExperimentLayout("e1")
    assert lay.site_of_update(2, lay.update_manifest(2, "site-b")) == "site-b"
    assert lay.site_of_update(2, lay.update(2, "site-b")) is None  # the model, not the manifest
    assert lay.site_of_update(3, lay.update_manifest(2, "site-b")) is None
    assert lay.round_of_key(lay.aggregate(12)) == 12
    assert lay.round_of_key(lay.config()) is None
    assert lay.round_of_key("experiments/e1/rounds/012/global.json") is None
