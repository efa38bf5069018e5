from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from jipfed.federation import codec
from jipfed.federation.codec import (
    EncodedUpdate,
    decode_update,
    encode_global,
    encode_update,
    open_update,
    read_update,
    write_update,
)
from jipfed.federation.update import ModelUpdate, TensorSpec
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected

from .helpers import CONFIG_HASH, EXPERIMENT, t, update

WEIGHTS = {
    "conv.weight": torch.linspace(-1.0, 1.0, 24).reshape(2, 3, 4),
    "conv.bias": t(0.5, -0.25),
    "bn.num_batches_tracked": torch.tensor(7),
}


def _expected(**kwargs: object) -> ExpectedUpdate:
    identity = {"experiment": EXPERIMENT, "round": 1, "site": "site-a", "config_hash": CONFIG_HASH}
    return ExpectedUpdate.from_weights(WEIGHTS, **{**identity, **kwargs})


def _delta(scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(2, 3, 4, generator=g) * scale,
        "conv.bias": torch.randn(2, generator=g) * scale,
        "bn.num_batches_tracked": torch.tensor(5),
    }


def _forge(entries: dict[str, torch.Tensor], **manifest_changes: object) -> tuple[bytes, str]:
    """A payload made without the encoder (as an attacker would) and a manifest with its true sha256."""
    payload = safetensors.torch.save(entries)
    manifest = update(_delta()).manifest.replace(
        sha256=hashlib.sha256(payload).hexdigest(), **manifest_changes
    )
    return payload, manifest.to_json()


def test_fp32_round_trip_is_exact() -> None:
    original = update(_delta(), n_samples=12)
    encoded = encode_update(original)
    assert encoded.manifest.sha256 == hashlib.sha256(encoded.payload).hexdigest()
    decoded = decode_update(encoded.payload, encoded.manifest.to_json(), _expected())
    assert decoded.manifest == encoded.manifest
    assert list(decoded.tensors) == list(original.tensors)
    for name, tensor in original.tensors.items():
        assert torch.equal(decoded.tensors[name], tensor)


def test_fp16_within_documented_error() -> None:
    delta = _delta(scale=1.0)
    decoded = decode_update(*_pair(encode_update(update(delta), "fp16")), _expected())
    for name in ("conv.weight", "conv.bias"):
        x, y = delta[name], decoded.tensors[name]
        assert y.dtype == torch.float32
        bound = torch.clamp(x.abs() * 2.0**-11, min=2.0**-25)
        assert bool(((x - y).abs() <= bound).all())
        assert not torch.equal(x, y)  # it is lossy: the check above is not vacuous
    assert torch.equal(decoded.tensors["bn.num_batches_tracked"], torch.tensor(5))


def test_int8_within_documented_error_and_integers_untouched() -> None:
    delta = _delta(scale=0.3)
    encoded = encode_update(update(delta), "int8")
    raw = safetensors.torch.load(encoded.payload)
    assert raw["conv.weight"].dtype == torch.int8
    assert raw["conv.weight.__scale__"].shape == ()
    assert (
        raw["bn.num_batches_tracked"].dtype == torch.int64 and "bn.num_batches_tracked.__scale__" not in raw
    )
    decoded = decode_update(*_pair(encoded), _expected())
    for name in ("conv.weight", "conv.bias"):
        x, y = delta[name], decoded.tensors[name]
        bound = float(x.abs().max()) / 254 * (1 + 1e-6)
        err = float((x - y).abs().max())
        assert err <= bound
        assert err > 0
    assert torch.equal(decoded.tensors["bn.num_batches_tracked"], torch.tensor(5))


def test_int8_zero_tensor_and_refusals() -> None:
    zero = {**_delta(), "conv.bias": torch.zeros(2)}
    decoded = decode_update(*_pair(encode_update(update(zero), "int8")), _expected())
    assert torch.equal(decoded.tensors["conv.bias"], torch.zeros(2))
    with pytest.raises(ValueError, match="deltas only"):
        encode_update(update(WEIGHTS, kind="weights"), "int8")
    with pytest.raises(ValueError, match="float16 range"):
        encode_update(update({**_delta(), "conv.bias": t(1e5, 0)}), "fp16")
    with pytest.raises(ValueError, match="NaN/Inf"):
        encode_update(update({**_delta(), "conv.bias": t(float("nan"), 0)}))


def _pair(encoded: EncodedUpdate) -> tuple[bytes, str]:
    return encoded.payload, encoded.manifest.to_json()


def _reason(payload: bytes, manifest: object, expected: ExpectedUpdate | None = None) -> str:
    with pytest.raises(UpdateRejected) as info:
        decode_update(payload, manifest, expected or _expected())  # type: ignore[arg-type]
    assert info.value.site == "site-a" and info.value.round == 1
    return info.value.reason


def test_rejects_tampered_payload() -> None:
    payload, manifest = _pair(encode_update(update(_delta())))
    tampered = bytearray(payload)
    tampered[-1] ^= 0x01
    assert "sha256" in _reason(bytes(tampered), manifest)
    assert "tampered" in _reason(bytes(tampered), manifest)


def test_rejects_manifest_without_hash_or_not_json() -> None:
    payload, _ = _pair(encode_update(update(_delta())))
    assert "no sha256" in _reason(payload, update(_delta()).manifest)
    assert "invalid manifest" in _reason(payload, "{]")


@pytest.mark.parametrize("make", ["pickle", "torch_save"])
def test_rejects_pickle_payload_without_unpickling(make: str, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = {"conv.weight": torch.zeros(2, 3, 4)}
    if make == "pickle":
        payload = pickle.dumps(obj)
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the payload was unpickled")

    for target, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, boom)
    manifest = update(_delta()).manifest.replace(sha256=hashlib.sha256(payload).hexdigest())
    assert "not a safetensors file" in _reason(payload, manifest.to_json())


@pytest.mark.parametrize(
    ("expected_changes", "field"),
    [
        ({"round": 2}, "round"),
        ({"site": "site-b"}, "site"),
        ({"experiment": "other"}, "experiment"),
        ({"config_hash": "0" * 64}, "config_hash"),
    ],
)
def test_rejects_wrong_identity(expected_changes: dict, field: str) -> None:
    payload, manifest = _pair(encode_update(update(_delta())))
    expected = _expected(**expected_changes)
    with pytest.raises(UpdateRejected, match=f"manifest {field} is"):
        decode_update(payload, manifest, expected)


def test_rejects_kind_and_sample_count() -> None:
    payload, manifest = _pair(encode_update(update(_delta())))
    assert "kind 'delta' not accepted" in _reason(payload, manifest, _expected(kinds=("weights",)))
    payload, manifest = _pair(encode_update(update(_delta(), n_samples=0)))
    assert "n_samples 0 < 1" in _reason(payload, manifest)


def test_rejects_nan_and_inf() -> None:
    for bad in (float("nan"), float("inf")):
        entries = {**_delta(), "conv.bias": t(bad, 0.0)}
        assert "1 NaN/Inf values" in _reason(*_forge(entries))


def test_rejects_payload_that_differs_from_its_manifest() -> None:
    delta = _delta()
    wrong_shape = {**delta, "conv.bias": t(1, 2, 3)}
    assert "payload tensor 'conv.bias' has shape (3,)" in _reason(*_forge(wrong_shape))
    wrong_dtype = {**delta, "conv.bias": delta["conv.bias"].double()}
    assert "payload tensor 'conv.bias' has dtype float64" in _reason(*_forge(wrong_dtype))
    extra = {**delta, "sneaky": t(1)}
    assert "extra ['sneaky']" in _reason(*_forge(extra))
    missing = {k: v for k, v in delta.items() if k != "conv.bias"}
    assert "missing ['conv.bias']" in _reason(*_forge(missing))


def test_rejects_manifest_that_differs_from_the_model() -> None:
    delta = _delta()
    for changed, reason in (
        ({**delta, "conv.bias": t(1, 2, 3)}, "manifest tensor 'conv.bias' has shape (3,), expected (2,)"),
        ({**delta, "conv.bias": delta["conv.bias"].half()}, "manifest tensor 'conv.bias' has dtype float16"),
        ({**delta, "extra": t(1)}, "extra ['extra']"),
        ({k: v for k, v in delta.items() if k != "conv.weight"}, "missing ['conv.weight']"),
    ):
        assert reason in _reason(*_pair(encode_update(update(changed))))


def test_rejects_bad_int8_scale() -> None:
    encoded = encode_update(update(_delta()), "int8")
    raw = safetensors.torch.load(encoded.payload)
    raw["conv.bias.__scale__"] = torch.tensor(float("inf"))
    payload = safetensors.torch.save(raw)
    manifest = encoded.manifest.replace(sha256=hashlib.sha256(payload).hexdigest())
    assert "int8 scale of tensor 'conv.bias'" in _reason(payload, manifest)


def test_delta_norm_bound() -> None:
    delta = {
        "conv.weight": torch.zeros(2, 3, 4),
        "conv.bias": t(3.0, 4.0),
        "bn.num_batches_tracked": torch.tensor(99),
    }
    payload, manifest = _pair(encode_update(update(delta)))
    deltas_only = {"kinds": ("delta",)}
    assert decode_update(payload, manifest, _expected(max_delta_norm=5.0, **deltas_only)).n_samples == 1
    assert "delta L2 norm 5 exceeds the bound 4.9" in _reason(
        payload, manifest, _expected(max_delta_norm=4.9, **deltas_only)
    )
    # a "weights" update is bounded by its distance to the reference (global) weights
    weights = {k: WEIGHTS[k] + delta[k] if k != "bn.num_batches_tracked" else WEIGHTS[k] for k in WEIGHTS}
    payload, manifest = _pair(encode_update(update(weights, kind="weights")))
    expected = _expected(max_delta_norm=4.9, keep_reference=True)
    assert "exceeds the bound" in _reason(payload, manifest, expected)
    with pytest.raises(ValueError, match="needs reference"):
        _expected(max_delta_norm=1.0)


def test_global_model_round_trip() -> None:
    encoded = encode_global(WEIGHTS, experiment=EXPERIMENT, round=3, config_hash=CONFIG_HASH)
    assert encoded.manifest.site == "global" and encoded.manifest.kind == "weights"
    expected = ExpectedUpdate.for_global(
        experiment=EXPERIMENT,
        round=3,
        config_hash=CONFIG_HASH,
        tensors={k: TensorSpec.of(v) for k, v in WEIGHTS.items()},
    )
    model = decode_update(*_pair(encoded), expected)
    assert all(torch.equal(model.tensors[k], v) for k, v in WEIGHTS.items())
    with pytest.raises(UpdateRejected, match="manifest round is 3, expected 4"):
        decode_update(*_pair(encoded), dataclasses_replace(expected, round=4))


def dataclasses_replace(expected: ExpectedUpdate, **changes: object) -> ExpectedUpdate:
    import dataclasses

    return dataclasses.replace(expected, **changes)


def test_files_written_atomically_and_read_back(tmp_path: Path) -> None:
    encoded = encode_update(update(_delta(), n_samples=3), "fp16")
    payload_path, manifest_path = write_update(tmp_path / "updates" / "site-a", encoded)
    assert payload_path.name == "site-a.safetensors" and manifest_path.name == "site-a.json"
    assert sorted(p.name for p in payload_path.parent.iterdir()) == ["site-a.json", "site-a.safetensors"]
    assert json.loads(manifest_path.read_text())["sha256"] == encoded.manifest.sha256
    eager = read_update(tmp_path / "updates" / "site-a", _expected())
    lazy = open_update(tmp_path / "updates" / "site-a", _expected())
    assert lazy.manifest == eager.manifest and lazy.n_samples == 3
    assert list(lazy.tensors) == list(eager.tensors)
    for name, tensor in eager.tensors.items():
        assert torch.equal(lazy.tensors[name], tensor)
    assert all(torch.equal(a, eager.tensors[n]) for n, a in lazy.tensors.items())
    assert all(torch.equal(a, eager.tensors[n]) for n, a in lazy.load().tensors.items())


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        codec.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_file_checks(tmp_path: Path) -> None:
    stem = tmp_path / "site-a"
    write_update(stem, encode_update(update(_delta())))
    data = bytearray(codec.payload_path(stem).read_bytes())
    data[-1] ^= 0x01
    codec.payload_path(stem).write_bytes(bytes(data))
    for reader in (read_update, open_update):
        with pytest.raises(UpdateRejected, match="tampered"):
            reader(stem, _expected())
    with pytest.raises(UpdateRejected, match="missing"):
        read_update(tmp_path / "site-b", _expected(site="site-b"))
    # NaN found by the lazy reader's validation pass, before any aggregation
    payload, manifest = _forge({**_delta(), "conv.bias": t(float("nan"), 0)})
    write_update(stem, EncodedUpdate(payload, codec.UpdateManifest.from_json(manifest)))
    with pytest.raises(UpdateRejected, match="NaN/Inf"):
        open_update(stem, _expected())


def test_lazy_update_refuses_a_file_changed_after_validation(tmp_path: Path) -> None:
    stem = tmp_path / "site-a"
    write_update(stem, encode_update(update(_delta())))
    lazy = open_update(stem, _expected())
    write_update(stem, encode_update(update(_delta(scale=2.0))))
    with pytest.raises(UpdateRejected, match="changed after validation"):
        lazy.tensors["conv.bias"]


def test_model_update_from_decoder_is_checked_type() -> None:
    decoded = decode_update(*_pair(encode_update(update(_delta()))), _expected())
    assert isinstance(decoded, ModelUpdate)


def test_tensors_sharing_memory_are_encoded_separately() -> None:
    shared = torch.arange(4.0)
    tied = {"encoder.weight": shared, "decoder.weight": shared}  # tied weights: one storage
    expected = ExpectedUpdate.from_weights(
        tied, experiment=EXPERIMENT, round=1, site="site-a", config_hash=CONFIG_HASH
    )
    model = decode_update(*_pair(encode_update(update(tied, kind="weights"))), expected)
    assert all(torch.equal(model.tensors[n], shared) for n in tied)
