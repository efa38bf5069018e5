"""Payloads checked while they stream (arrival) and stored updates read back once, hashed on the way."""

from __future__ import annotations

import hashlib
import math
from contextlib import ExitStack
from pathlib import Path

import pytest
import safetensors.torch
import torch

from jipfed.federation.bounds import delta_norm
from jipfed.federation.codec import (
    SafetensorsWriter,
    decode_update,
    encode_update,
    write_global_file,
    write_safetensors,
)
from jipfed.federation.payload_stream import (
    CheckingReader,
    HashPipeline,
    PayloadChecker,
    StoredUpdate,
    check_payload,
)
from jipfed.federation.update import ModelUpdate, TensorSpec
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected

from .helpers import CONFIG_HASH, EXPERIMENT, update

GLOBAL = {
    "conv.weight": torch.linspace(-1.0, 1.0, 600).reshape(20, 30),
    "conv.bias": torch.linspace(0.0, 1.0, 20),
    "bn.running_var": torch.ones(20),
    "bn.num_batches_tracked": torch.tensor(7),
}


def _delta(seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(x.shape, generator=g) * scale for n, x in GLOBAL.items() if x.is_floating_point()}
    return {**out, "bn.num_batches_tracked": torch.tensor(2)}


def _expected(**kwargs: object) -> ExpectedUpdate:
    identity = {"experiment": EXPERIMENT, "round": 1, "site": "site-a", "config_hash": CONFIG_HASH}
    return ExpectedUpdate.from_weights(GLOBAL, kinds=("delta",), **{**identity, **kwargs})


def _forged(entries: dict[str, torch.Tensor]) -> tuple[bytes, ModelUpdate]:
    """A payload made without the encoder and a manifest that carries its true sha256."""
    payload = safetensors.torch.save(entries)
    manifest = update(_delta()).manifest.replace(sha256=hashlib.sha256(payload).hexdigest())
    return payload, ModelUpdate(tensors=_delta(), manifest=manifest)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("chunk", [1, 13, 1 << 20])
def test_checker_accepts_what_the_codec_accepts_and_measures_the_norm(encoding: str, chunk: int) -> None:
    encoded = encode_update(update(_delta()), encoding)
    check = check_payload(
        encoded.payload, PayloadChecker(encoded.manifest, _expected(max_delta_norm=100.0)), chunk
    )
    decoded = decode_update(encoded.payload, encoded.manifest, _expected())
    assert check.sha256 == encoded.manifest.sha256
    assert check.size == len(encoded.payload)
    assert check.delta_norm == pytest.approx(delta_norm(decoded, GLOBAL), rel=1e-12)


def test_checker_measures_a_weights_update_against_the_start_model() -> None:
    delta = _delta()
    weights = {n: (x + delta[n] if x.is_floating_point() else x) for n, x in GLOBAL.items()}
    encoded = encode_update(update(weights, kind="weights"))
    expected = ExpectedUpdate.from_weights(
        GLOBAL, experiment=EXPERIMENT, round=1, site="site-a", config_hash=CONFIG_HASH
    )
    check = check_payload(encoded.payload, PayloadChecker(encoded.manifest, expected, start=GLOBAL))
    decoded = decode_update(encoded.payload, encoded.manifest, expected)
    assert check.delta_norm == pytest.approx(delta_norm(decoded, GLOBAL), rel=1e-9)
    # without the start model the norm of a weights update is unknown, not wrong
    assert check_payload(encoded.payload, PayloadChecker(encoded.manifest, expected)).delta_norm is None


def _reason(payload: bytes, manifest: object, expected: ExpectedUpdate | None = None) -> str:
    with pytest.raises(UpdateRejected) as info:
        check_payload(payload, PayloadChecker(manifest, expected or _expected()), chunk=7)  # type: ignore[arg-type]
    return info.value.reason


def test_checker_names_the_first_problem() -> None:
    good = encode_update(update(_delta()))
    tampered = bytearray(good.payload)
    tampered[-3] ^= 1
    assert "sha256" in _reason(bytes(tampered), good.manifest)
    assert "sha256" in _reason(good.payload[:-4], good.manifest)  # a cut payload is not the manifest's
    nan = _delta()
    nan["conv.bias"][3] = float("nan")
    assert "NaN/Inf" in _reason(*_forged(nan)[0:1], _forged(nan)[1].manifest)
    extra = {**_delta(), "extra": torch.zeros(2)}
    assert "extra ['extra']" in _reason(_forged(extra)[0], _forged(extra)[1].manifest)
    junk = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"
    manifest = good.manifest.replace(sha256=hashlib.sha256(junk).hexdigest())
    assert "not a safetensors file" in _reason(junk, manifest)
    trailing = good.payload + b"\x00" * 4
    assert "after its last tensor" in _reason(
        trailing, good.manifest.replace(sha256=hashlib.sha256(trailing).hexdigest())
    )
    assert "exceeds the bound" in _reason(good.payload, good.manifest, _expected(max_delta_norm=1e-3))


def test_checking_reader_feeds_every_byte_it_passes_on(tmp_path: Path) -> None:
    encoded = encode_update(update(_delta()), "int8")
    checker = PayloadChecker(encoded.manifest, _expected())
    source = tmp_path / "in"
    source.write_bytes(encoded.payload)
    with open(source, "rb") as fh:
        reader = CheckingReader(fh, checker)
        copied = b"".join(iter(lambda: reader.read(5), b""))
    assert copied == encoded.payload
    assert checker.finish().sha256 == encoded.manifest.sha256


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("threads", [0, 2])
def test_stored_update_reads_each_tensor_once_and_hashes_it_on_the_way(
    tmp_path: Path, encoding: str, threads: int
) -> None:
    encoded = encode_update(update(_delta()), encoding)
    path = tmp_path / "site-a.safetensors"
    path.write_bytes(encoded.payload)
    decoded = decode_update(encoded.payload, encoded.manifest, _expected())
    with ExitStack() as stack:
        hashing = stack.enter_context(HashPipeline(threads, limit_bytes=256)) if threads else None
        stored = stack.enter_context(StoredUpdate(path, encoded.manifest, hashing))
        read = dict(stored.tensors.items())  # file order: the file is hashed by these reads
        stored.verify()
    assert list(stored.tensors) != list(encoded.manifest.tensors)  # file order is not model order
    for name, tensor in decoded.tensors.items():
        assert torch.equal(read[name], tensor), name


def test_stored_update_whose_bytes_changed_since_arrival_is_rejected(tmp_path: Path) -> None:
    encoded = encode_update(update(_delta()))
    path = tmp_path / "site-a.safetensors"
    changed = bytearray(encoded.payload)
    changed[-1] ^= 0x40  # a bit flip in the last tensor: the header still parses
    path.write_bytes(bytes(changed))
    with StoredUpdate(path, encoded.manifest) as stored:
        stored.tensor("conv.bias")  # out of file order: verify() hashes the whole file again
        with pytest.raises(UpdateRejected, match="changed since"):
            stored.verify()
    path.write_bytes(encoded.payload[:-8])
    with pytest.raises(UpdateRejected, match="not a safetensors file"):
        StoredUpdate(path, encoded.manifest)
    with pytest.raises(UpdateRejected, match="cannot be opened"):
        StoredUpdate(tmp_path / "missing.safetensors", encoded.manifest)


def test_streamed_writer_writes_the_bytes_safetensors_writes(tmp_path: Path) -> None:
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.count": torch.tensor(5),
        "half": torch.ones(2, dtype=torch.float16),
        "brain": torch.ones(3, dtype=torch.bfloat16),
        "q": torch.ones(1, dtype=torch.int8),
        "d": torch.ones(2, dtype=torch.float64),
        "flag": torch.ones(1, dtype=torch.bool),
        "empty": torch.ones(0),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }
    for extra in range(8):  # header lengths around the 8-byte padding
        named = {**tensors, "x" * extra: torch.zeros(1)}
        digest, size = write_safetensors(tmp_path / "out", named)
        expected = safetensors.torch.save({k: v.contiguous() for k, v in named.items()})
        assert (tmp_path / "out").read_bytes() == expected
        assert (digest, size) == (hashlib.sha256(expected).hexdigest(), len(expected))
    with pytest.raises(ValueError, match="NaN/Inf"):
        write_global_file(
            {"w": torch.tensor([math.inf])},
            tmp_path / "g",
            experiment=EXPERIMENT,
            round=1,
            config_hash=CONFIG_HASH,
        )


@pytest.mark.parametrize("threads", [0, 2])
def test_tensors_put_in_any_order_give_the_bytes_safetensors_writes(tmp_path: Path, threads: int) -> None:
    """Each tensor is written at its offset when put; hashed once all before it in the file are."""
    tensors = {
        "z.weight": torch.randn(40, 30),
        "a.weight": torch.randn(300_000),  # over WRITEBACK_BYTES: sent to the disk early
        "m.count": torch.tensor(3),
        "half": torch.ones(5, dtype=torch.float16),
        "empty": torch.ones(0),
        "b.bias": torch.randn(9),
    }
    expected = safetensors.torch.save(tensors)
    specs = {n: TensorSpec.of(x) for n, x in tensors.items()}
    with ExitStack() as stack:
        hashing = stack.enter_context(HashPipeline(threads, 64)) if threads else None
        for order in (list(tensors), list(reversed(tensors)), ["b.bias", "m.count", "empty", "z.weight"]):
            writer = stack.enter_context(SafetensorsWriter(tmp_path / "out", specs, hashing))
            for name in order:
                writer.put(name, tensors[name])
            assert writer.missing == [n for n in writer.order if n not in order]
            for name in writer.missing:
                writer.put(name, tensors[name])
            assert writer.finish() == (hashlib.sha256(expected).hexdigest(), len(expected))
            assert (tmp_path / "out").read_bytes() == expected


def test_tensor_writer_refuses_what_its_header_does_not_say(tmp_path: Path) -> None:
    specs = {"w": TensorSpec((3,), "float32"), "n": TensorSpec((), "int64")}
    with SafetensorsWriter(tmp_path / "out", specs, check_finite=True) as writer:
        with pytest.raises(ValueError, match="'x' is not in the file's header"):
            writer.put("x", torch.zeros(3))
        with pytest.raises(ValueError, match="'w' is .*float64.*the header says"):
            writer.put("w", torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="'w' holds NaN/Inf"):
            writer.put("w", torch.tensor([0.0, math.nan, 1.0]))
        writer.put("n", torch.tensor(4))
        with pytest.raises(ValueError, match="'n' .*already written"):
            writer.put("n", torch.tensor(4))
        with pytest.raises(ValueError, match="tensor 'w' was never written"):
            writer.finish()
