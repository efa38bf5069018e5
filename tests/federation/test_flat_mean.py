"""The flat mean over stored files (jipfed.federation.flat_mean) against the tensor-by-tensor path.

The central's ``aggregate_step`` takes the flat path for a plain FedAvg step whose files share one
layout and whose model is large enough (``fits_one_pass``); these tests run real steps on a
local store with a model of that size and compare the output file byte for byte with the
tensor-by-tensor path on the same updates.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import jipfed.federation.codec as codec
import jipfed.federation.compute as compute
import jipfed.federation.flat_mean as flat_mean_module
from jipfed.federation.codec import SafetensorsWriter, encode_global, encode_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.flat_mean import fits_one_pass, pieces_of, shared_layout
from jipfed.federation.payload_stream import PayloadEntry, StoredUpdate
from jipfed.federation.rounds import accept_update, aggregate_step, start_experiment
from jipfed.federation.update import ModelUpdate, TensorSpec
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore

#: Large enough for fits_one_pass with 2 sites on up to 2 threads (7.3 M float32 = 29 MB), odd sizes.
SHAPES = {"a.bias": (37,), "b.weight": (7_300_001,), "c.weight": (33, 17), "bn.num_batches_tracked": ()}


def _model(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in SHAPES.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.randint(0, 50, shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen) * scale
    return out


def _step(
    root: Path, sites: dict[str, tuple[dict[str, torch.Tensor], int]], start: dict[str, torch.Tensor]
) -> str:
    """Run step 0 of a FedAvg experiment with these delta updates; the output model's sha256."""
    exp = "flat"
    exp_store = ExperimentStore(LocalFolderStore(root), exp)
    config = ExperimentConfig(name=exp, sites=tuple(sites), rounds=1)
    config_hash = exp_store.save_config(config.to_dict())
    encoded = encode_global(start, experiment=exp, round=0, config_hash=config_hash)
    exp_store.save_global(0, encoded.payload, encoded.manifest.to_dict())
    start_experiment(exp_store, config)
    for site, (delta, n) in sites.items():
        update = ModelUpdate.build(
            delta, experiment=exp, round=0, site=site, kind="delta", n_samples=n, config_hash=config_hash
        )
        enc = encode_update(update)
        accept_update(exp_store, site, 0, enc.payload, enc.manifest.to_json())
    aggregate_step(exp_store, 0)
    return hashlib.sha256(
        Path(exp_store.store.uri(exp_store.layout.global_model(1))).read_bytes()
    ).hexdigest()


@pytest.fixture
def flat_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the steps that took the flat path."""
    calls: list[int] = []
    real = compute.flat_mean

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "flat_mean", counted)
    return calls


def test_flat_mean_writes_the_same_bytes_as_the_tensor_by_tensor_mean(
    tmp_path: Path, flat_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(7)
    start = _model(gen)
    sites = {"site-a": (_model(gen, 0.01), 3), "site-b": (_model(gen, 0.01), 5)}
    flat = _step(tmp_path / "flat", sites, start)
    assert flat_calls == [1]
    monkeypatch.setattr(compute, "flat_plan", lambda *args: None)
    assert _step(tmp_path / "tensors", sites, start) == flat
    assert flat_calls == [1]


def test_reused_segment_buffers_give_the_same_bytes_and_the_result_maps_the_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ring buffers for ~8 segments: each is reused only after the writer wrote and hashed it
    (the writes are slowed down like a slow disk's, so a buffer reused too early is caught)."""
    results: list[dict[str, torch.Tensor]] = []
    real = compute.flat_mean
    real_write = codec._write_at

    def slow_write(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        real_write(*args, **kwargs)

    monkeypatch.setattr(codec, "_write_at", slow_write)

    def kept(*args, **kwargs):  # type: ignore[no-untyped-def]
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(compute, "flat_mean", kept)
    monkeypatch.setattr(flat_mean_module, "RING_SLOTS", 2)
    monkeypatch.setattr(flat_mean_module, "MAX_RUNNING_TENSORS", 1)
    gen = torch.Generator().manual_seed(9)
    start = _model(gen)
    sites = {"site-a": (_model(gen, 0.01), 2), "site-b": (_model(gen, 0.01), 7)}
    flat = _step(tmp_path / "flat", sites, start)
    assert len(results) == 1
    written = load_file(tmp_path / "flat" / "experiments" / "flat" / "rounds" / "1" / "global.safetensors")
    assert set(results[0]) == set(written)
    for name, tensor in written.items():
        assert torch.equal(results[0][name], tensor), name
    monkeypatch.setattr(compute, "flat_plan", lambda *args: None)
    assert _step(tmp_path / "tensors", sites, start) == flat


def test_an_overflowing_mean_is_refused_naming_the_tensor(tmp_path: Path, flat_calls: list[int]) -> None:
    gen = torch.Generator().manual_seed(8)
    start = _model(gen)
    huge = _model(gen)
    huge["c.weight"] = torch.full(SHAPES["c.weight"], 3e38)
    with pytest.raises(ValueError, match="'c.weight' holds NaN/Inf"):
        _step(tmp_path, {"site-a": (huge, 1), "site-b": (huge, 1)}, start)
    assert flat_calls == [1]


def test_small_models_and_many_sites_go_tensor_by_tensor() -> None:
    model = 30_000_000 * 4
    assert fits_one_pass(9, model, threads=2)  # 8 sites of a 30 M model: one pass of parts
    assert not fits_one_pass(17, model, threads=2)  # 16 sites: more than a quarter model mapped at once
    assert not fits_one_pass(3, 7_000_000, threads=2)


def _entries(specs: dict[str, tuple[str, tuple[int, ...]]], data_start: int) -> list[PayloadEntry]:
    writer_order = sorted(specs, key=lambda n: (specs[n][0] != "int64", n))  # I64 first, then F32 by name
    entries, offset = [], data_start
    for name in writer_order:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * (8 if dtype == "int64" else 4)
        entries.append(PayloadEntry(name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    return entries


def test_pieces_cover_the_data_section_and_segments_start_on_pages() -> None:
    entries = _entries(
        {"n": ("int64", ()), "w": ("float32", (3_000_001,)), "v": ("float32", (5,))}, data_start=200
    )
    pieces = pieces_of(entries, segment_bytes=1 << 20)
    assert pieces[0].begin == 0 and pieces[-1].end == entries[-1].end - 200
    assert all(a.end == b.begin for a, b in zip(pieces, pieces[1:], strict=False))
    assert [p for p in pieces if not p.floats] == [pieces[0]] and pieces[0].end == 8
    floats = [p for p in pieces if p.floats]
    assert all((200 + p.begin) % mmap.PAGESIZE == 0 for p in floats[1:])  # all but the run's head
    assert max(p.end - p.begin for p in floats) <= (1 << 20) + mmap.PAGESIZE


def _stored(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> StoredUpdate:
    update = ModelUpdate.build(
        tensors, experiment="e", round=0, site=name, kind="delta", n_samples=1, config_hash="0" * 64
    )
    enc = encode_update(update)
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(enc.payload)
    return StoredUpdate(path, enc.manifest, digest=False, unchanged=lambda: None)


def test_shared_layout_needs_the_same_tensors_float32_and_unhashed_reads(tmp_path: Path) -> None:
    base = {"w": torch.zeros(10), "n": torch.zeros((), dtype=torch.int64)}
    start = _stored(tmp_path, "start", base)
    same = _stored(tmp_path, "same", {"w": torch.ones(10), "n": torch.ones((), dtype=torch.int64)})
    writer = SafetensorsWriter(tmp_path / "out.safetensors", {n: TensorSpec.of(t) for n, t in base.items()})
    try:
        assert [e.key for e in shared_layout(start, [same], writer) or []] == ["n", "w"]
        other = _stored(tmp_path, "other", {"w": torch.ones(11), "n": torch.ones((), dtype=torch.int64)})
        assert shared_layout(start, [same, other], writer) is None  # other offsets
        half = _stored(tmp_path, "half", {"w": torch.ones(10, dtype=torch.float16), "n": base["n"]})
        assert shared_layout(half, [half], writer) is None  # float16 goes tensor by tensor
        hashed = StoredUpdate(same.path, same.manifest)  # read with hashing: not flat
        assert shared_layout(start, [hashed], writer) is None
    finally:
        writer.close()
