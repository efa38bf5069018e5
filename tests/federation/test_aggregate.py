from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from jipfed.federation.aggregate import (
    WeightedMean,
    coordinatewise_median,
    coordinatewise_trimmed_mean,
    mean_weights,
)
from jipfed.federation.codec import EncodedUpdate, encode_update, write_update
from jipfed.federation.update import ModelUpdate

from .helpers import CONFIG_HASH, EXPERIMENT, t, update


def test_weighted_mean_by_hand() -> None:
    acc = WeightedMean()
    acc.add({"w": t(1, 2), "n": torch.tensor([3, 9])}, 1.0)
    acc.add({"w": t(4, 8), "n": torch.tensor([5, 1])}, 3.0)
    out = acc.result()
    # (1*[1, 2] + 3*[4, 8]) / 4 = [13/4, 26/4]; integers: element-wise max
    assert torch.equal(out["w"], t(3.25, 6.5))
    assert torch.equal(out["n"], torch.tensor([5, 9]))
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64
    assert acc.count == 2 and acc.total_weight == 4.0


def test_weighted_mean_of_deltas_adds_the_base_once() -> None:
    g = {"w": t(10, 20), "n": torch.tensor(4)}
    acc = WeightedMean(integer_mode="first")
    acc.add({"w": t(12, 18), "n": torch.tensor(9)}, 1.0)  # a site's weights
    acc.add({"w": t(2, 4), "n": torch.tensor(1)}, 1.0, base=g)  # a delta: weights [12, 24], n 5
    out = acc.result()
    assert torch.equal(out["w"], t(12, 21))
    assert torch.equal(out["n"], torch.tensor(9))  # "first", not max(9, 5) or a float mean


def test_weighted_mean_float64_accumulation_and_half_inputs() -> None:
    acc = WeightedMean(accumulate_dtype=torch.float64)
    acc.add({"w": torch.tensor([1.0], dtype=torch.float16)}, 1.0)
    acc.add({"w": torch.tensor([2.0], dtype=torch.float16)}, 2.0)
    out = acc.result()
    assert out["w"].dtype == torch.float16
    assert float(out["w"]) == pytest.approx(5 / 3, rel=1e-3)


def test_float32_accumulation_error_is_as_documented() -> None:
    g = torch.Generator().manual_seed(1)
    sites = [torch.randn(10_000, generator=g) for _ in range(16)]
    acc = WeightedMean()
    for i, x in enumerate(sites):
        acc.add({"w": x}, float(i + 1))
    exact = sum((i + 1) * x.double() for i, x in enumerate(sites)) / sum(range(1, 17))
    err = float((acc.result()["w"].double() - exact).abs().max())
    assert err < 16 * 6e-8 * float(torch.stack(sites).abs().max())


def test_weighted_mean_rejects_misuse() -> None:
    acc = WeightedMean()
    with pytest.raises(ValueError, match="weight must be"):
        acc.add({"w": t(1)}, 0.0)
    with pytest.raises(ValueError, match="nothing to average"):
        acc.result()
    acc.add({"w": t(1), "v": t(2)}, 1.0)
    with pytest.raises(ValueError, match="not in the first"):
        acc.add({"x": t(1), "v": t(2)}, 1.0)
    with pytest.raises(ValueError, match="expected"):
        acc.add({"w": t(1, 2), "v": t(2)}, 1.0)
    acc2 = WeightedMean()
    acc2.add({"w": t(1), "v": t(2)}, 1.0)
    with pytest.raises(ValueError, match="1 tensors, the first had 2"):
        acc2.add({"w": t(1)}, 1.0)
    acc2.result()
    with pytest.raises(RuntimeError):
        acc2.result()
    with pytest.raises(ValueError, match="integer_mode"):
        WeightedMean(integer_mode="mean")
    with pytest.raises(ValueError, match="accumulate_dtype"):
        WeightedMean(accumulate_dtype=torch.float16)


def test_mean_weights_streams_without_keeping_updates() -> None:
    """At most the current and the previous update are alive while the generator is consumed."""
    refs: list[weakref.ref] = []
    alive_max = 0

    def updates() -> Iterator[ModelUpdate]:
        nonlocal alive_max
        for i in range(8):
            u = update({"w": torch.full((1000,), float(i))}, site=f"s{i}")
            refs.append(weakref.ref(u.tensors["w"]))
            yield u
            del u
            alive_max = max(alive_max, sum(r() is not None for r in refs))

    out = mean_weights({"w": torch.zeros(1000)}, updates())
    assert torch.equal(out["w"], torch.full((1000,), 3.5))
    assert alive_max <= 2


def test_median_and_trimmed_mean_by_hand() -> None:
    g = {"w": t(10, 0), "n": torch.tensor(2)}
    deltas = [t(1, -1), t(5, 0), t(2, 7), t(4, 3), t(100, -50)]
    ns = [1, 8, 3, 4, 2]
    ups = [
        update({"w": d, "n": torch.tensor(n)}, site=f"s{i}")
        for i, (d, n) in enumerate(zip(deltas, ns, strict=True))
    ]
    med = coordinatewise_median(g, ups)
    # sorted deltas: [1, 2, 4, 5, 100] -> 4 ; [-50, -1, 0, 3, 7] -> 0. Integers: lower median of
    # the site values g + n = [3, 10, 5, 6, 4] -> 5.
    assert torch.equal(med["w"], t(14, 0))
    assert torch.equal(med["n"], torch.tensor(5))
    trimmed = coordinatewise_trimmed_mean(g, ups, beta=0.2)
    # drop 1 at each end: mean(2, 4, 5) = 11/3 ; mean(-1, 0, 3) = 2/3
    assert torch.allclose(trimmed["w"], t(10 + 11 / 3, 2 / 3))
    even = coordinatewise_median(g, ups[:4])  # [1, 2, 4, 5] -> 3 ; [-1, 0, 3, 7] -> 1.5
    assert torch.equal(even["w"], t(13, 1.5))
    # "weights" updates are converted to deltas first
    as_weights = [
        update({"w": g["w"] + d, "n": g["n"] + n}, site=u.site, kind="weights")
        for u, d, n in zip(ups, deltas, ns, strict=True)
    ]
    assert torch.equal(coordinatewise_median(g, as_weights)["w"], t(14, 0))
    with pytest.raises(ValueError, match="beta"):
        coordinatewise_trimmed_mean(g, ups, beta=0.5)


# ---- measured peak memory of streaming aggregation --------------------------------------------

SHAPES = {
    "layer0": (1024, 1024),
    "layer1": (1024, 1024),
    "layer2": (1024, 1024),
    "layer3": (1024, 1024),
    "conv": (256, 256, 3, 3),
    "bias": (512,),
}
MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from jipfed.federation.codec import open_update
    from jipfed.federation.strategies import FedAvg
    from jipfed.federation.validation import ExpectedUpdate

    root, experiment, config_hash = sys.argv[1], sys.argv[2], sys.argv[3]
    shapes, counts = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    g = {name: torch.zeros(shape) for name, shape in shapes.items()}
    g["bn.num_batches_tracked"] = torch.tensor(0)

    def peak_rss():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))

    results = {}
    for n in counts:  # the test runs one count per process
        with open("/proc/self/clear_refs", "w") as fh:  # reset the peak RSS (VmHWM) to the current RSS
            fh.write("5")
        base = peak_rss()
        sources = [
            open_update(f"{root}/site-{i}", ExpectedUpdate.from_weights(
                g, experiment=experiment, round=1, site=f"site-{i}", config_hash=config_hash))
            for i in range(n)
        ]
        new = FedAvg().aggregate(g, sources, round=1)
        results[n] = {"extra": peak_rss() - base, "sums": {k: float(v.double().sum()) for k, v in new.items()}}
        del sources, new
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def site_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """16 fp32 delta files of a ~19 MB model; site i sends (i % 4 + 1) * base (4 distinct payloads)."""
    root = tmp_path_factory.mktemp("sites")
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}
    encoded = []
    for c in range(4):
        tensors = {name: x * (c + 1) for name, x in base.items()}
        tensors["bn.num_batches_tracked"] = torch.tensor(c)
        encoded.append(encode_update(update(tensors, n_samples=1)))
    for i in range(16):
        enc = encoded[i % 4]
        write_update(root / f"site-{i}", EncodedUpdate(enc.payload, enc.manifest.replace(site=f"site-{i}")))
    return root, base


def test_streaming_peak_memory_is_bounded_and_flat_in_sites(
    site_files: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    """Validate + FedAvg 4 or 16 lazily read sites in a fresh process; its peak RSS is measured."""
    root, base = site_files
    model_bytes = sum(x.numel() * 4 for x in base.values())
    # one fresh process per count (run side by side): freed memory kept by the allocator would
    # otherwise hide the second measurement
    procs = {
        n: subprocess.Popen(
            [sys.executable, "-c", MEASURE, str(root), EXPERIMENT, CONFIG_HASH, json.dumps(SHAPES), f"[{n}]"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (4, 16)
    }
    results = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results[n] = json.loads(out.strip().splitlines()[-1])[str(n)]
    for n, res in results.items():
        # what was measured is right: the mean of (i % 4 + 1) * base over i < n (n = 4k) is 2.5 * base
        for name, x in base.items():
            assert res["sums"][name] == pytest.approx(float(x.double().sum()) * 2.5, rel=1e-4, abs=1e-2)
        assert res["sums"]["bn.num_batches_tracked"] == 3  # integer buffer: max, not a mean
        assert res["extra"] < 3 * model_bytes, f"{n} sites: peak +{res['extra'] / model_bytes:.2f} x model"
    growth = results[16]["extra"] - results[4]["extra"]
    assert growth < 0.5 * model_bytes, f"peak grew by {growth / model_bytes:.2f} x model from 4 to 16 sites"
    print({n: round(res["extra"] / model_bytes, 2) for n, res in results.items()})
