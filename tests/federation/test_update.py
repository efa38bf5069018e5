from __future__ import annotations

import dataclasses

import pytest
import torch

from jipfed.federation.update import GLOBAL_SITE, ModelUpdate, TensorSpec, UpdateManifest, spec_of

from .helpers import CONFIG_HASH, t, update


def _manifest(**changes: object) -> UpdateManifest:
    base = {
        "experiment": "exp1",
        "round": 2,
        "site": "site-a",
        "kind": "delta",
        "n_samples": 10,
        "tensors": {"w": TensorSpec((2, 3), "float32"), "bn.num_batches_tracked": TensorSpec((), "int64")},
        "config_hash": CONFIG_HASH,
        "encoding": "int8",
        "sha256": "ab" * 32,
        "metrics": {"loss": 0.25, "dice": 0.75},
        "privacy": {"epsilon": 1.5, "mechanism": "gaussian"},
        "created_at": "2025-01-02T03:04:05+00:00",
    }
    base.update(changes)
    return UpdateManifest(**base)  # type: ignore[arg-type]


def test_manifest_json_round_trip() -> None:
    manifest = _manifest()
    text = manifest.to_json()
    again = UpdateManifest.from_json(text)
    assert again == manifest
    assert list(again.tensors) == ["w", "bn.num_batches_tracked"]
    assert again.tensors["w"] == TensorSpec((2, 3), "float32")
    assert again.privacy["mechanism"] == "gaussian"
    assert UpdateManifest.from_json(text.encode()) == manifest


def test_manifest_is_immutable() -> None:
    manifest = _manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.round = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        manifest.metrics["loss"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "gradient"}, "kind must be one of"),
        ({"site": "../etc"}, "invalid site"),
        ({"experiment": ""}, "invalid experiment"),
        ({"round": -1}, "round must be"),
        ({"n_samples": -3}, "n_samples must be"),
        ({"n_samples": True}, "n_samples must be"),
        ({"config_hash": "abc"}, "config_hash must be"),
        ({"sha256": "XYZ"}, "sha256 must be"),
        ({"encoding": "int4"}, "encoding must be"),
        ({"encoding": "int8", "kind": "weights"}, "deltas only"),
        ({"metrics": {"loss": float("nan")}}, "finite"),
        ({"privacy": {"eps": [1]}}, "JSON scalar"),
        ({"created_at": "yesterday"}, "ISO-8601"),
        ({"tensors": {}}, "non-empty"),
        ({"tensors": {"w.__scale__": TensorSpec((1,), "float32")}}, "reserved"),
    ],
)
def test_manifest_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _manifest(**changes)


def test_from_json_rejects_unknown_and_missing_keys() -> None:
    data = _manifest().to_dict()
    with pytest.raises(ValueError, match="unknown"):
        UpdateManifest.from_dict({**data, "pickle": "yes"})
    del data["site"]
    with pytest.raises(ValueError, match="missing"):
        UpdateManifest.from_dict(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        UpdateManifest.from_json("{not json")


def test_tensor_spec_validation() -> None:
    assert TensorSpec.of(torch.zeros(2, 1, dtype=torch.float16)) == TensorSpec((2, 1), "float16")
    assert TensorSpec((4, 5), "float32").numel == 20
    assert not TensorSpec((), "int64").is_floating
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec((1,), "complex64")
    with pytest.raises(ValueError, match="shape"):
        TensorSpec((-1,), "float32")


def test_build_takes_specs_from_tensors() -> None:
    u = update({"w": t(1, 2), "n": torch.tensor(3)}, site="site-b", kind="weights", n_samples=4)
    assert u.manifest.tensors == spec_of({"w": t(1, 2), "n": torch.tensor(3)})
    assert (u.kind, u.site, u.round, u.n_samples) == ("weights", "site-b", 1, 4)
    assert u.manifest.sha256 is None and u.manifest.encoding == "fp32"


def test_update_must_match_its_manifest() -> None:
    manifest = update({"w": t(1, 2)}).manifest
    with pytest.raises(ValueError, match="missing"):
        ModelUpdate(tensors={"v": t(1, 2)}, manifest=manifest)
    with pytest.raises(ValueError, match="manifest says"):
        ModelUpdate(tensors={"w": t(1, 2, 3)}, manifest=manifest)
    with pytest.raises(ValueError, match="manifest says"):
        ModelUpdate(tensors={"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, manifest=manifest)
    with pytest.raises(ValueError, match="torch.Tensor"):
        ModelUpdate(tensors={"w": [1.0, 2.0]}, manifest=manifest)  # type: ignore[dict-item]


def test_global_site_is_a_valid_site() -> None:
    u = update({"w": t(1)}, site=GLOBAL_SITE, kind="weights", n_samples=0)
    assert u.site == "global"


def test_from_dict_rejects_duplicate_tensor_names() -> None:
    data = _manifest().to_dict()
    data["tensors"].append(dict(data["tensors"][0]))
    with pytest.raises(ValueError, match="unique"):
        UpdateManifest.from_dict(data)
