from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from jipfed.federation import aggregate
from jipfed.federation.aggregate import (
    Contribution,
    WeightedMean,
    coordinatewise_median,
    coordinatewise_trimmed_mean,
    mean_weights,
)
from jipfed.federation.codec import EncodedUpdate, encode_update, open_update, write_update
from jipfed.federation.update import ModelUpdate
from jipfed.federation.validation import ExpectedUpdate

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


def test_mean_weights_hands_each_result_tensor_on_once_final() -> None:
    """``on_tensor`` gets every tensor of the result once, already final, in the order they are read."""
    g = {"w": t(1, 2), "b": torch.zeros(3), "n": torch.tensor(1)}
    ups = [
        update({"w": t(i, i), "b": torch.full((3,), float(i)), "n": torch.tensor(i)}, site=f"s{i}")
        for i in range(4)
    ]
    seen: list[tuple[str, torch.Tensor]] = []
    for per_pass in (None, 1, 3):
        seen.clear()
        out = mean_weights(
            g, ups, sites_per_pass=per_pass, on_tensor=lambda n, x: seen.append((n, x.clone()))
        )
        assert [n for n, _ in seen] == list(ups[0].tensors)
        for name, value in seen:
            assert torch.equal(value, out[name]), name
    assert torch.equal(out["n"], torch.tensor(4))


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
    from jipfed.federation.aggregate import mean_weights
    from jipfed.federation.codec import open_update
    from jipfed.federation.strategies import FedAvg
    from jipfed.federation.validation import ExpectedUpdate

    root, experiment, config_hash = sys.argv[1], sys.argv[2], sys.argv[3]
    shapes, n, mode = json.loads(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    g = {name: torch.zeros(shape) for name, shape in shapes.items()}
    g["bn.num_batches_tracked"] = torch.tensor(0)

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as fh:  # reset the kernel's peak RSS (VmHWM) to the current RSS
        fh.write("5")
    base = status("VmHWM")
    sources = [
        open_update(f"{root}/site-{i}", ExpectedUpdate.from_weights(
            g, experiment=experiment, round=1, site=f"site-{i}", config_hash=config_hash))
        for i in range(n)
    ]
    if mode == "fedavg":  # the strategy: a generator of updates, streamed site by site
        new = FedAvg().aggregate(g, sources, round=1)
    else:  # the list itself: one pass over all sites, or passes of 2
        new = mean_weights(g, sources, sites_per_pass=None if mode == "single" else 2)
    sums = {k: float(v.double().sum()) for k, v in new.items()}
    print(json.dumps({"extra": status("VmHWM") - base, "sums": sums}))
    """
)


def peak_in_fresh_process(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (nothing else measured beside it) and parse its JSON line."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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


@pytest.mark.parametrize("mode", ["fedavg", "single", "passes-of-2"])
def test_peak_memory_is_bounded_and_flat_in_sites(
    site_files: tuple[Path, dict[str, torch.Tensor]], mode: str
) -> None:
    """Validate + average 4 or 16 lazily read sites, each count in its own fresh process; peak RSS.

    The peak is the kernel's VmHWM (no sampling). ``fedavg`` streams site by site; ``single`` reads
    all files in one pass, so VmHWM counts every file's mapped pages (page cache, not new memory);
    ``passes-of-2`` maps two files at a time.
    """
    root, base = site_files
    model_bytes = sum(x.numel() * 4 for x in base.values())
    results = {
        n: peak_in_fresh_process(
            MEASURE, str(root), EXPERIMENT, CONFIG_HASH, json.dumps(SHAPES), str(n), mode
        )
        for n in (4, 16)
    }
    mapped = {"fedavg": 1, "passes-of-2": 2}  # files mapped at once; "single": all n
    for n, res in results.items():
        # what was measured is right: the mean of (i % 4 + 1) * base over i < n (n = 4k) is 2.5 * base
        for name, x in base.items():
            assert res["sums"][name] == pytest.approx(float(x.double().sum()) * 2.5, rel=1e-4, abs=1e-2)
        assert res["sums"]["bn.num_batches_tracked"] == 3  # integer buffer: max, not a mean
        ratio = res["extra"] / model_bytes
        assert ratio < mapped.get(mode, n) + 1.5, f"{mode}, {n} sites: peak +{ratio:.2f} x model"
    growth = (results[16]["extra"] - results[4]["extra"]) / model_bytes
    if mode != "single":
        assert growth < 0.5, f"{mode}: peak grew by {growth:.2f} x model from 4 to 16 sites"
    print(mode, {n: round(r["extra"] / model_bytes, 2) for n, r in results.items()})


#: A ~7 MB model: small enough for 16 sites in seconds, its largest tensors well above 1 MiB.
STEP_SHAPES = {"layer0": (768, 1024), "layer1": (768, 1024), "conv": (128, 128, 3, 3), "bias": (512,)}
STEP_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from jipfed.federation.rounds import aggregate_step
    from jipfed.storage.local import LocalFolderStore
    from jipfed.storage.state import ExperimentStore

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))

    store = LocalFolderStore(sys.argv[1])
    aggregate_step(ExperimentStore(store, "warm-up"), 0)  # imports, thread pools, first-use allocations
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status("VmHWM")
    record = aggregate_step(ExperimentStore(store, "measured"), 0)
    print(json.dumps({"extra": status("VmHWM") - base, "included": len(record.included)}))
    """
)


def accepted_step(root: Path, experiment: str, n_sites: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """An experiment whose step 0 has ``n_sites`` accepted delta updates of a model of ``shapes``."""
    from jipfed.federation.codec import encode_global
    from jipfed.federation.experiment import ExperimentConfig
    from jipfed.federation.rounds import accept_update, start_experiment
    from jipfed.storage.local import LocalFolderStore
    from jipfed.storage.state import ExperimentStore

    sites = tuple(f"site-{i}" for i in range(n_sites))
    exp_store = ExperimentStore(LocalFolderStore(root), experiment)
    config_hash = exp_store.save_config(ExperimentConfig(name=experiment, sites=sites, rounds=1).to_dict())
    zeros = {name: torch.zeros(shape) for name, shape in shapes.items()}
    encoded = encode_global(zeros, experiment=experiment, round=0, config_hash=config_hash)
    exp_store.save_global(0, encoded.payload, encoded.manifest.to_dict())
    start_experiment(exp_store, ExperimentConfig(name=experiment, sites=sites, rounds=1))
    gen = torch.Generator().manual_seed(n_sites)
    for site in sites:
        delta = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        manifest = ModelUpdate.build(
            delta,
            experiment=experiment,
            round=0,
            site=site,
            kind="delta",
            n_samples=1,
            config_hash=config_hash,
        ).manifest
        enc = encode_update(ModelUpdate(tensors=delta, manifest=manifest))
        accept_update(exp_store, site, 0, enc.payload, enc.manifest.to_json())


@pytest.mark.parametrize("n_sites", [4, 16])
def test_aggregate_step_peak_memory_is_at_most_two_models(tmp_path: Path, n_sites: int) -> None:
    """The central's whole step (checked updates in the store -> global model out) in a fresh process.

    Its peak RSS growth (the kernel's VmHWM, no sampling; after a warm-up step on a one-site
    experiment so that imports and first-use allocations do not count) stays within two models
    for 4 and for 16 sites: the accumulator plus bounded passes of per-tensor reads.
    """
    accepted_step(tmp_path, "warm-up", 1, STEP_SHAPES)
    accepted_step(tmp_path, "measured", n_sites, STEP_SHAPES)
    model_bytes = sum(math.prod(shape) * 4 for shape in STEP_SHAPES.values())
    res = peak_in_fresh_process(STEP_MEASURE, str(tmp_path))
    assert res["included"] == n_sites
    assert res["extra"] <= 2 * model_bytes, f"{n_sites} sites: peak +{res['extra'] / model_bytes:.2f} x model"


# ---- cache-blocked passes ------------------------------------------------------------------------


def _reference_mean(
    sites: list[dict[str, torch.Tensor]], weights: list[float], deltas: list[bool], g: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The site-by-site arithmetic written out: acc = w0 x0; acc += wi xi; acc += W_delta g; acc /= W."""
    out = {}
    for name, x0 in sites[0].items():
        if not x0.is_floating_point():
            values = [g[name] + s[name] if d else s[name] for s, d in zip(sites, deltas, strict=True)]
            out[name] = torch.stack(values).amax(dim=0)
            continue
        acc = x0.to(torch.promote_types(x0.dtype, torch.float32), copy=True).mul_(weights[0])
        for site, w in zip(sites[1:], weights[1:], strict=True):
            acc.add_(site[name], alpha=w)
        w_delta = sum(w for w, d in zip(weights, deltas, strict=True) if d)
        if w_delta:
            acc.add_(g[name], alpha=w_delta)
        out[name] = acc.div_(sum(weights)).to(x0.dtype)
    return out


def _model(seed: int) -> dict[str, torch.Tensor]:
    """Tensors spanning several chunks (with a tail), a 0-d tensor, float16, float64 and an integer buffer."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(7, 501, generator=gen),  # 3507 elements: 4 chunks of 1000 + tail
        "scalar": torch.randn((), generator=gen),
        "half": torch.randn(2500, generator=gen).half(),
        "double": torch.randn(33, generator=gen, dtype=torch.float64),
        "steps": torch.tensor([seed, 10 - seed]),
    }


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """1000-element chunks so that small tensors cross chunk boundaries; one thread: exact comparisons."""
    monkeypatch.setattr(aggregate, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(aggregate, "SORT_CHUNK_ELEMENTS", 700)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sites_per_pass", [None, 1, 2, 3])
def test_passes_equal_the_site_by_site_arithmetic_bit_for_bit(
    small_chunks: None, sites_per_pass: int | None
) -> None:
    """One pass, passes of k sites and the stream run the same operations per element: equal results."""
    g = _model(0)
    sites = [_model(i) for i in range(1, 6)]
    deltas = [False, True, False, True, True]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    ups = [
        update(s, site=f"s{i}", kind="delta" if d else "weights", n_samples=int(w))
        for i, (s, d, w) in enumerate(zip(sites, deltas, weights, strict=True))
    ]
    expected = _reference_mean(sites, weights, deltas, g)
    as_list = mean_weights(g, ups, sites_per_pass=sites_per_pass)
    streamed = mean_weights(g, iter(ups), sites_per_pass=sites_per_pass)
    for name, want in expected.items():
        assert as_list[name].dtype == want.dtype and as_list[name].shape == want.shape, name
        assert torch.equal(as_list[name], want), name
        assert torch.equal(streamed[name], want), name
    # and the arithmetic is the mean: float64 reference within float32 rounding
    exact = sum(
        w * (s["big"].double() + (g["big"].double() if d else 0))
        for s, w, d in zip(sites, weights, deltas, strict=True)
    )
    assert torch.allclose(as_list["big"].double(), exact / sum(weights), atol=1e-6)


def test_single_pass_over_lazy_files_equals_in_memory(tmp_path: Path, small_chunks: None) -> None:
    """Memory-mapped sites (one lockstep pass over each file), in-memory sites and a reordered site agree."""
    g = _model(0)
    sites = [_model(i) for i in range(1, 5)]
    ups = [update(s, site=f"s{i}", kind="weights", n_samples=i + 1) for i, s in enumerate(sites)]
    lazy = []
    for u in ups:
        write_update(tmp_path / u.site, encode_update(u))
        expected = ExpectedUpdate.from_weights(
            g, experiment=EXPERIMENT, round=1, site=u.site, config_hash=CONFIG_HASH
        )
        lazy.append(open_update(tmp_path / u.site, expected))
    in_memory = mean_weights(g, ups)
    from_files = mean_weights(g, lazy)
    reordered = [
        ups[0],
        update(dict(reversed(list(sites[1].items()))), site="s1", kind="weights", n_samples=2),
        *ups[2:],
    ]
    by_key = mean_weights(g, reordered)
    for name in g:
        assert torch.equal(from_files[name], in_memory[name]), name
        assert torch.equal(by_key[name], in_memory[name]), name


def test_weighted_mean_groups_and_result_with_last() -> None:
    g = {"w": t(10, 20)}
    acc = WeightedMean()
    acc.add_group([Contribution({"w": t(1, 2)}, 1.0), Contribution({"w": t(3, 4)}, 1.0)])
    out = acc.result([Contribution({"w": t(0, 0)}, 2.0, g)])  # a delta: the site's model is g
    # (1 + 3 + 2 * 10) / 4 = 6 ; (2 + 4 + 2 * 20) / 4 = 11.5
    assert torch.equal(out["w"], t(6, 11.5))
    assert acc.count == 3 and acc.total_weight == 4.0
    one_pass = WeightedMean().result([Contribution({"w": t(1, 2)}, 1.0), Contribution({"w": t(3, 4)}, 3.0)])
    assert torch.equal(one_pass["w"], t(2.5, 3.5))
    with pytest.raises(ValueError, match="at least one"):
        WeightedMean().add_group([])
    with pytest.raises(ValueError, match="nothing to average"):
        WeightedMean().result([])


def test_weighted_mean_failures_leave_no_half_added_state() -> None:
    acc = WeightedMean()
    acc.add({"a": t(1), "b": t(2)}, 1.0)
    # a bad weight anywhere in the group is refused before any tensor is touched
    with pytest.raises(ValueError, match="weight must be"):
        acc.add_group([Contribution({"a": t(5), "b": t(5)}, 1.0), Contribution({"a": t(5), "b": t(5)}, -1.0)])
    with pytest.raises(ValueError, match="share one base"):
        acc.add_group(
            [
                Contribution({"a": t(5), "b": t(5)}, 1.0, {"a": t(0), "b": t(0)}),
                Contribution({"a": t(5), "b": t(5)}, 1.0, {"a": t(0), "b": t(0)}),
            ]
        )
    with pytest.raises(ValueError, match="tensor 'a' is"):  # the first tensor: nothing was added yet
        acc.add({"a": t(3, 4), "b": t(4)}, 1.0)
    acc.add({"a": t(3), "b": t(4)}, 1.0)
    out = acc.result()
    assert torch.equal(out["a"], t(2)) and torch.equal(out["b"], t(3)) and acc.count == 2
    # a mismatch in the second tensor comes after the first was accumulated: the accumulator is dead
    dead = WeightedMean()
    dead.add({"a": t(1), "b": t(2)}, 1.0)
    with pytest.raises(ValueError, match="tensor 'b' is"):
        dead.add({"a": t(3), "b": t(1, 2)}, 1.0)
    with pytest.raises(RuntimeError, match="failed part-way"):
        dead.result()


def test_mean_weights_rejects_bad_sites_per_pass() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sites_per_pass"):
            mean_weights({"w": t(1)}, [update({"w": t(1)})], sites_per_pass=bad)  # type: ignore[arg-type]


# ---- sorting network and chunked robust reducers ----------------------------------------------


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_zero_one_input(n: int) -> None:
    """0-1 principle: a comparator network that sorts all 2^n zero-one inputs sorts every input."""
    codes = torch.arange(1 << n)
    rows = [((codes >> i) & 1).float() for i in range(n)]
    want = torch.sort(torch.stack(rows), dim=0).values  # before: sort_rows overwrites the rows' buffers
    ordered, spare = aggregate.sort_rows(rows, torch.empty(1 << n))
    assert torch.equal(torch.stack(ordered), want)
    assert spare.shape == (1 << n,)


def test_sorting_network_with_ties_and_many_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    for n in (17, 33, 64):
        rows = [torch.randint(-3, 4, (500,), generator=gen).float() for _ in range(n)]
        want = torch.sort(torch.stack(rows), dim=0).values
        ordered, _ = aggregate.sort_rows(rows, torch.empty(500))
        assert torch.equal(torch.stack(ordered), want), n


def _reference_robust(
    g: dict[str, torch.Tensor], ups: list[ModelUpdate], reduce: str, beta: float = 0.0
) -> dict[str, torch.Tensor]:
    """The definition: stack the deltas of each float tensor, sort across sites, reduce, add global."""
    out = {}
    for name, x in g.items():
        if not x.is_floating_point():
            continue
        deltas = torch.stack(
            [u.tensors[name].float() - (x.float() if u.kind == "weights" else 0) for u in ups]
        )
        ordered = torch.sort(deltas, dim=0).values
        n = len(ups)
        if reduce == "median":
            red = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
        else:
            k = int(beta * n)
            red = ordered[k : n - k].double().mean(dim=0).float()
        out[name] = (red + x.float()).to(x.dtype)
    return out


@pytest.mark.parametrize("network_max", [64, 3])  # 3: the torch.sort path for more sites than that
@pytest.mark.parametrize("n_sites", [5, 8])
def test_chunked_median_and_trimmed_mean_match_the_definition(
    small_chunks: None, monkeypatch: pytest.MonkeyPatch, network_max: int, n_sites: int
) -> None:
    monkeypatch.setattr(aggregate, "NETWORK_MAX_SITES", network_max)

    def site(seed: int) -> dict[str, torch.Tensor]:
        tensors = _model(seed)
        del tensors["double"]
        return tensors

    g = site(0)
    # odd sites send weights, even ones deltas (then their values are the deltas themselves)
    ups = [update(site(i), site=f"s{i}", kind="weights" if i % 2 else "delta") for i in range(1, n_sites + 1)]
    for name, want in _reference_robust(g, ups, "median").items():
        got = coordinatewise_median(g, ups)[name]
        assert got.dtype == want.dtype
        assert torch.allclose(
            got.float(), want.float(), atol=2e-3 if want.dtype == torch.float16 else 1e-6
        ), name
    for name, want in _reference_robust(g, ups, "trimmed", beta=0.25).items():
        got = coordinatewise_trimmed_mean(g, ups, beta=0.25)[name]
        assert torch.allclose(
            got.float(), want.float(), atol=2e-3 if want.dtype == torch.float16 else 1e-5
        ), name
