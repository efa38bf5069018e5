"""Benchmark: jipfed's streaming weighted mean vs Flower's ``aggregate`` (FedAvg maths).

Same inputs for both: ``--sites`` sites (default 8) of a ``--params`` float32 model (default 30 M)
whose tensors have the shapes of an nnU-Net-like 3-D U-Net (conv, bias, BatchNorm affine and
running stats, ``num_batches_tracked``), site i weighted by ``n_samples = 100 + 10 i``.

Scenarios, each measured in a fresh process: wall time of the first ("cold") call, as in one
Airflow task, and the median of the following ("warm") calls; peak memory of the cold call as
VmHWM growth over the RSS at the start of the measured part (reset via /proc/self/clear_refs):

* ``memory``: every site's arrays are already in RAM (generated identically in both processes);
  only the aggregation is timed and measured. Flower: ``aggregate([(ndarrays, n), ...])``. jipfed:
  ``WeightedMean.add(tensors, n)`` per site (the tensors share the numpy buffers), ``result()``.
* ``disk``: the sites are safetensors files (written once, page cache warm), which is how the
  central receives them. Flower must deserialise all sites into RAM before ``aggregate`` (that is
  its API); jipfed streams one memory-mapped site at a time. Timed: load + aggregate. A third
  row adds jipfed's full validation (sha256 of each file, shape/dtype/NaN checks).

Throughput is ``(sites + 1) x model bytes`` (read every input once, write the result once) per
second, compared with this machine's memory-copy bandwidth (numpy copy of a model-sized array,
bytes read + written per second). Flower runs in its own venv, ``.venv-flwr``, created on demand
with ``pip install flwr numpy safetensors``; without it the benchmark stops with that command.

Usage::

    .venv/bin/python benchmarks/aggregate.py [--sites 8] [--params 30000000] [--repeats 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.aggregate")

ROOT = Path(__file__).resolve().parents[1]
FLWR_VENV = ROOT / ".venv-flwr"
FLWR_PYTHON = FLWR_VENV / "bin" / "python"
SEED = 2024


# ---- model and inputs (no torch here: the Flower process has only numpy) ------------------------


def layer_shapes(target: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of a 3-D U-Net whose widths are scaled to about ``target`` parameters."""

    def build(width: float) -> list[tuple[str, tuple[int, ...], str]]:
        feats = [max(1, round(f * width)) for f in (32, 64, 128, 256, 320, 320)]
        layers: list[tuple[str, tuple[int, ...], str]] = []

        def conv(name: str, c_out: int, c_in: int, k: int = 3) -> None:
            layers.append((f"{name}.conv.weight", (c_out, c_in, k, k, k), "float32"))
            layers.append((f"{name}.conv.bias", (c_out,), "float32"))
            for p in ("weight", "bias", "running_mean", "running_var"):
                layers.append((f"{name}.norm.{p}", (c_out,), "float32"))
            layers.append((f"{name}.norm.num_batches_tracked", (), "int64"))

        c_in = 4
        for i, f in enumerate(feats):
            conv(f"encoder.{i}.0", f, c_in)
            conv(f"encoder.{i}.1", f, f)
            c_in = f
        for i in reversed(range(len(feats) - 1)):
            layers.append((f"decoder.{i}.up.weight", (feats[i + 1], feats[i], 2, 2, 2), "float32"))
            conv(f"decoder.{i}.0", feats[i], 2 * feats[i])
            conv(f"decoder.{i}.1", feats[i], feats[i])
        layers.append(("head.weight", (4, feats[0], 1, 1, 1), "float32"))
        layers.append(("head.bias", (4,), "float32"))
        return layers

    def count(layers: list[tuple[str, tuple[int, ...], str]]) -> int:
        return sum(_numel(shape) for _, shape, _ in layers)

    low, high = 0.1, 10.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if count(build(mid)) < target else (low, mid)
    return build(high)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_site(site: int, shapes: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """Site ``site``'s arrays (numpy), identical in every process."""
    import numpy as np

    rng = np.random.default_rng(SEED * 1000 + site)
    out: dict[str, Any] = {}
    for name, shape, dtype in shapes:
        if dtype == "int64":
            out[name] = np.array(100 * (site + 1), dtype=np.int64).reshape(shape)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def n_samples(site: int) -> int:
    return 100 + 10 * site


def model_bytes(shapes: list[tuple[str, tuple[int, ...], str]]) -> int:
    return sum(_numel(shape) * (8 if dtype == "int64" else 4) for _, shape, dtype in shapes)


# ---- measurement helpers ----------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns it."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmHWM")


def _measure(
    run: Callable[[], Any], repeats: int, float_names: list[str], names: list[str]
) -> dict[str, Any]:
    """Peak RSS growth of the first run; wall times of all runs; checksum of the first result."""
    base = _reset_peak()
    start = time.perf_counter()
    result = run()
    times = [time.perf_counter() - start]
    peak = _status("VmHWM") - base
    checksum = _checksum(
        result if isinstance(result, dict) else dict(zip(names, result, strict=True)), float_names
    )
    del result
    for _ in range(repeats - 1):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        del result
    return {"times": times, "peak_extra": peak, "checksum": checksum}


def _checksum(result: dict[str, Any], float_names: list[str]) -> float:
    """Sum of the float tensors of a result (integer buffers differ by design: Flower averages them)."""
    import numpy as np

    return float(sum(float(np.asarray(result[n], dtype=np.float64).sum()) for n in float_names))


# ---- workers (run in fresh processes) ---------------------------------------------------------


def flower_aggregate() -> tuple[Callable[..., Any], str]:
    """Flower's own ``aggregate`` from the ``.venv-flwr`` interpreter; there is no stand-in."""
    try:
        import flwr
        from flwr.server.strategy.aggregate import aggregate
    except ImportError as exc:
        raise SystemExit(
            f"flwr is not importable in {sys.executable} ({exc}); create .venv-flwr with "
            "`python3 -m venv .venv-flwr && .venv-flwr/bin/pip install flwr numpy safetensors`"
        ) from exc
    return aggregate, f"flwr {flwr.__version__}"


def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    shapes = layer_shapes(args.params)
    names = [name for name, _, _ in shapes]
    float_names = [name for name, _, dtype in shapes if dtype != "int64"]
    sites = range(args.sites)
    if mode == "copy":
        import numpy as np

        src = np.random.default_rng(0).random(model_bytes(shapes) // 4, dtype=np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
        return {"copy_gbps": 2 * src.nbytes / best / 1e9}
    if mode.startswith("flower"):
        aggregate, label = flower_aggregate()
        if mode == "flower-memory":
            generated = [make_site(i, shapes) for i in sites]
            inputs = [
                ([arrays[n] for n in names], n_samples(i)) for i, arrays in zip(sites, generated, strict=True)
            ]
            del generated
            res = _measure(lambda: aggregate(inputs), args.repeats, float_names, names)
        else:
            from safetensors.numpy import load_file

            def run() -> list[Any]:
                loaded = []
                for i in sites:
                    arrays = load_file(f"{args.dir}/site-{i}.safetensors")
                    loaded.append(([arrays[n] for n in names], n_samples(i)))
                    del arrays
                return aggregate(loaded)

            res = _measure(run, args.repeats, float_names, names)
        return {**res, "label": label}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from jipfed.federation.aggregate import WeightedMean

    label = f"jipfed WeightedMean, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    if mode == "ours-memory":
        inputs = [
            ({n: torch.from_numpy(a) for n, a in make_site(i, shapes).items()}, n_samples(i)) for i in sites
        ]

        def run() -> dict[str, Any]:
            acc = WeightedMean()
            for tensors, n in inputs:
                acc.add(tensors, float(n))
            return acc.result()

    else:
        from safetensors import safe_open

        from jipfed.federation.codec import open_update, payload_path
        from jipfed.federation.update import UpdateManifest
        from jipfed.federation.validation import ExpectedUpdate

        stems = [Path(args.dir) / f"site-{i}" for i in sites]
        manifests = [UpdateManifest.from_json(Path(f"{s}.json").read_text()) for s in stems]
        spec = dict(manifests[0].tensors)

        def run() -> dict[str, Any]:
            acc = WeightedMean()
            for stem, manifest in zip(stems, manifests, strict=True):
                if mode == "ours-disk-validated":
                    expected = ExpectedUpdate(
                        experiment=manifest.experiment,
                        round=manifest.round,
                        site=manifest.site,
                        config_hash=manifest.config_hash,
                        tensors=spec,
                    )
                    acc.add(open_update(stem, expected).tensors, float(manifest.n_samples))
                else:  # memory-mapped, zero-copy tensors, no checks
                    with safe_open(str(payload_path(stem)), framework="pt") as fh:
                        acc.add({n: fh.get_tensor(n) for n in spec}, float(manifest.n_samples))
            return acc.result()

        label += " + full validation (sha256, specs, NaN)" if mode == "ours-disk-validated" else ""
    return {**_measure(run, args.repeats, float_names, names), "label": label}


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- driver -----------------------------------------------------------------------------------


def ensure_flower() -> Path | None:
    """Interpreter of .venv-flwr with flwr, numpy and safetensors; created on demand. None if impossible."""
    probe = [str(FLWR_PYTHON), "-c", "import flwr, numpy, safetensors"]
    if FLWR_PYTHON.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return FLWR_PYTHON
    logger.info("creating %s with flwr (pip)", FLWR_VENV)
    steps = [
        ["python3", "-m", "venv", str(FLWR_VENV)],
        [str(FLWR_VENV / "bin" / "pip"), "install", "-q", "flwr", "numpy", "safetensors"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            logger.warning("could not set up Flower (%s): %s", " ".join(cmd), done.stderr[-500:])
            return None
    return FLWR_PYTHON if subprocess.run(probe, capture_output=True).returncode == 0 else None


def spawn(python: Path | str, mode: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", mode, "--sites", str(args.sites)]
    cmd += ["--params", str(args.params), "--repeats", str(args.repeats)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_sites(directory: Path, args: argparse.Namespace) -> None:
    import torch

    from jipfed.federation.codec import encode_update, write_update
    from jipfed.federation.update import ModelUpdate

    shapes = layer_shapes(args.params)
    for i in range(args.sites):
        tensors = {n: torch.from_numpy(a) for n, a in make_site(i, shapes).items()}
        update = ModelUpdate.build(
            tensors,
            experiment="bench",
            round=1,
            site=f"site-{i}",
            kind="weights",
            n_samples=n_samples(i),
            config_hash="0" * 64,
        )
        write_update(directory / f"site-{i}", encode_update(update))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--params", type=int, default=30_000_000)
    parser.add_argument("--repeats", type=int, default=4, help="calls per process: 1 cold, the rest warm")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(worker(args.worker, args)) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = layer_shapes(args.params)
    size = model_bytes(shapes)
    flower_python = ensure_flower() or sys.executable
    logger.info(
        "model: %d tensors, %d parameters, %.1f MB; %d sites; %d CPU(s); load average %.1f",
        len(shapes),
        sum(_numel(s) for _, s, _ in shapes),
        size / 1e6,
        args.sites,
        os.cpu_count() or 0,
        os.getloadavg()[0],
    )
    copy = spawn(sys.executable, "copy", args)["copy_gbps"]
    rows: list[dict[str, Any]] = []

    def row(scenario: str, python: Path | str, mode: str, **extra: Any) -> None:
        res = spawn(python, mode, args, **extra)
        cold = res["times"][0]
        warm = statistics.median(res["times"][1:]) if len(res["times"]) > 1 else cold
        rows.append({"scenario": scenario, "mode": mode, **res, "cold": cold, "warm": warm})
        logger.info(
            "%-7s %-20s cold %7.3f s  warm %7.3f s  peak +%6.0f MB  %s",
            scenario,
            mode,
            cold,
            warm,
            res["peak_extra"] / 1e6,
            res["label"],
        )

    row("memory", flower_python, "flower-memory")
    row("memory", sys.executable, "ours-memory", threads=1)
    row("memory", sys.executable, "ours-memory", threads=os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="jipfed-bench-") as tmp:
        write_sites(Path(tmp), args)
        row("disk", flower_python, "flower-disk", dir=tmp)
        row("disk", sys.executable, "ours-disk", dir=tmp, threads=1)
        row("disk", sys.executable, "ours-disk-validated", dir=tmp, threads=1)
    sys.stdout.write(report(rows, copy, size, args) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": copy, "model_bytes": size, "rows": rows}, indent=2))


def report(rows: list[dict[str, Any]], copy: float, size: int, args: argparse.Namespace) -> str:
    moved = (args.sites + 1) * size
    lines = [
        f"\n{args.sites} sites x {size / 1e6:.0f} MB float32 model; bytes moved per aggregate = "
        f"(sites + 1) x model = {moved / 1e9:.2f} GB; memory-copy bandwidth (numpy, read + write) "
        f"{copy:.1f} GB/s. cold = first call in a fresh process (as in one Airflow task); "
        f"warm = median of the next {args.repeats - 1}.\n",
        "| scenario | implementation | cold s | warm s | GB/s cold / warm | % of copy BW (warm) "
        "| speed-up vs Flower cold / warm | peak extra MB | less peak memory than Flower |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flower = next(x for x in rows if x["scenario"] == r["scenario"] and x["mode"].startswith("flower"))
        lines.append(
            f"| {r['scenario']} | {r['label']} | {r['cold']:.3f} | {r['warm']:.3f} "
            f"| {moved / r['cold'] / 1e9:.2f} / {moved / r['warm'] / 1e9:.2f} "
            f"| {100 * moved / r['warm'] / 1e9 / copy:.0f} % "
            f"| {flower['cold'] / r['cold']:.1f}x / {flower['warm'] / r['warm']:.1f}x | {r['peak_extra'] / 1e6:.0f} "
            f"| {flower['peak_extra'] / max(r['peak_extra'], 1):.1f}x |"
        )
    sums = [r["checksum"] for r in rows]
    lines.append(
        f"\nfloat results agree: checksums (sum of all float result values) spread {max(sums) - min(sums):.3g}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
