"""Benchmark: jipfed's cache-blocked weighted mean vs Flower's ``aggregate`` (FedAvg maths).

Same inputs for both: ``--sites`` sites (default 8) of a ``--params`` float32 model (default 30 M)
whose tensors have the shapes of an nnU-Net-like 3-D U-Net (conv, bias, BatchNorm affine and
running stats, ``num_batches_tracked``), site i weighted by ``n_samples = 100 + 10 i``.

Every row runs in a fresh process: wall time of the first ("cold") call, as in one Airflow task,
and the median of the following ("warm") calls. Peak memory of the cold call: VmHWM growth over the
RSS at the start of the measured part (reset via /proc/self/clear_refs; it counts memory-mapped
file pages too) and the peak of anonymous memory (RssAnon, sampled every 2 ms). System CPU time
of each call is reported too: it is mostly first-touch page faults of freshly allocated memory.

* ``memory``: every site's arrays are already in RAM (generated identically in both processes);
  only the aggregation is timed. Flower: ``aggregate([(ndarrays, n), ...])``. jipfed:
  ``mean_weights(global, updates)`` over in-memory ``ModelUpdate`` objects sharing the numpy
  buffers; ``single pass`` gives it the list (all sites in one cache-blocked pass), ``site by
  site`` an iterator (the streaming path that decoded updates take). With several CPUs the
  single pass also runs on all of them, once with libgomp's default (spin-waiting) threads and once
  with ``OMP_WAIT_POLICY=PASSIVE``.
* ``disk``: the sites are safetensors files (written once, page cache warm), which is how the
  central receives them. Flower must deserialise all sites into RAM before ``aggregate`` (that is
  its API). jipfed: the files are validated once with ``open_update`` (sha256, specs, NaN; not
  timed, it is done once at receipt) and ``mean_weights`` reads the memory-mapped files: one pass,
  passes of ``k`` sites, or site by site. The ``validated`` row times ``open_update`` + the mean.

Throughput counts the bytes an ideal aggregation moves: ``(sites + 1) x model`` (read every input
once, write the result once) per second. It is compared with this machine's copy bandwidth: the
best of a numpy copy and torch copies with 1 and all threads, of a model-sized array, bytes
read + written per second. Flower runs in its own venv, ``.venv-flwr``, created on demand with
``pip install flwr numpy safetensors``; without it the benchmark stops with that command.

* ``aggregate_step``: the central's whole step on a local store whose updates were accepted
  (checked once at arrival, not timed; the median arrival check per update is printed): decide
  from the arrival records, read each stored update once (not hashed again: its stored identity is
  compared with the one recorded at arrival) in bounded passes,
  write the global model. The step sums on every CPU the process may use (a thread per CPU,
  torch's intra-op threads set to 1 meanwhile; Flower's numpy uses one). Compared with Flower
  loading and averaging the same stored files, cold, each in a fresh process. Its peak memory (VmHWM growth, exact, no sampling) is measured for 4 and
  16 sites, each in a fresh process. Flower and the step alternate ``--step-repeats`` times (each
  step on a fresh hard-linked copy of the prepared store: same files, same identities), and the
  ratio is that of the medians, with the load average beside it. The goals print as PASS / MISS
  lines: aggregate_step >= 5x Flower for ``--sites`` sites, peak <= 2x one model for 4 and 16 sites.

Usage::

    .venv/bin/python benchmarks/aggregate.py [--sites 8] [--params 30000000] [--repeats 4] [--json out.json]
    .venv/bin/python benchmarks/aggregate.py --only-step   # just the aggregate_step rows and goals
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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


class AnonPeak:
    """Highest RssAnon seen by a thread sampling /proc/self/status every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _status("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def _measure(
    run: Callable[[], Any], repeats: int, float_names: list[str], names: list[str]
) -> dict[str, Any]:
    """Peak memory growth of the first run; wall and system (kernel) times of all runs; checksum."""
    anon_base = _status("RssAnon")
    base = _reset_peak()
    with AnonPeak() as anon:
        result, wall, kernel = _timed_run(run)
    times, sys_times = [wall], [kernel]
    peak = _status("VmHWM") - base
    checksum = _checksum(
        result if isinstance(result, dict) else dict(zip(names, result, strict=True)), float_names
    )
    del result
    for _ in range(repeats - 1):
        result, wall, kernel = _timed_run(run)
        times.append(wall)
        sys_times.append(kernel)
        del result
    return {
        "times": times,
        "sys_times": sys_times,
        "peak_extra": peak,
        "anon_extra": anon.peak - anon_base,
        "checksum": checksum,
    }


def _timed_run(run: Callable[[], Any]) -> tuple[Any, float, float]:
    """``run()``'s result, wall seconds and system CPU seconds (mostly page faults of fresh memory)."""
    sys0, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    return result, wall, resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0


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


def copy_bandwidth(nbytes: int) -> dict[str, float]:
    """Best of 5 copies of an ``nbytes`` float32 array, (read + written) / s: numpy, torch 1 / all threads."""
    import numpy as np
    import torch

    src = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    out = {"numpy": 2 * src.nbytes / min(_timed(lambda: np.copyto(dst, src)) for _ in range(6)) / 1e9}
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        best = min(_timed(lambda: tdst.copy_(tsrc)) for _ in range(6))
        out[f"torch-{threads}"] = 2 * src.nbytes / best / 1e9
    return out


def flower_worker(
    mode: str, args: argparse.Namespace, shapes: list[tuple[str, tuple[int, ...], str]]
) -> dict[str, Any]:
    names = [name for name, _, _ in shapes]
    float_names = [name for name, _, dtype in shapes if dtype != "int64"]
    aggregate, label = flower_aggregate()
    if mode == "flower-memory":
        generated = [make_site(i, shapes) for i in range(args.sites)]
        inputs = [([arrays[n] for n in names], n_samples(i)) for i, arrays in enumerate(generated)]
        del generated
        res = _measure(lambda: aggregate(inputs), args.repeats, float_names, names)
    else:
        from safetensors.numpy import load_file

        def run() -> list[Any]:
            loaded = []
            for i in range(args.sites):
                arrays = load_file(args.pattern.format(dir=args.dir, i=i))
                loaded.append(([arrays[n] for n in names], n_samples(i)))
                del arrays
            return aggregate(loaded)

        res = _measure(run, args.repeats, float_names, names)
    return {**res, "label": label}


def ours_worker(
    mode: str, args: argparse.Namespace, shapes: list[tuple[str, tuple[int, ...], str]]
) -> dict[str, Any]:
    import torch

    from jipfed.federation.aggregate import mean_weights
    from jipfed.federation.codec import open_update
    from jipfed.federation.update import ModelUpdate, UpdateManifest
    from jipfed.federation.validation import ExpectedUpdate

    torch.set_num_threads(args.threads)
    names = [name for name, _, _ in shapes]
    float_names = [name for name, _, dtype in shapes if dtype != "int64"]
    passes = args.passes
    per_pass = None if passes == "single" else 1 if passes == "stream" else int(passes)
    how = {"single": "single pass", "stream": "site by site"}.get(passes, f"passes of {passes} sites")
    label = f"jipfed mean_weights, {how}, {args.threads} thread(s)"
    if args.threads > 1:
        label += f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"

    def mean(updates: list[Any], global_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # a list takes the single-pass path; an iterator is streamed (what a generator of decoded updates gets)
        sources = iter(updates) if passes == "stream" else updates
        return mean_weights(global_weights, sources, sites_per_pass=None if passes == "stream" else per_pass)

    if mode == "ours-memory":
        updates = [
            ModelUpdate.build(
                {n: torch.from_numpy(a) for n, a in make_site(i, shapes).items()},
                experiment="bench",
                round=1,
                site=f"site-{i}",
                kind="weights",
                n_samples=n_samples(i),
                config_hash="0" * 64,
            )
            for i in range(args.sites)
        ]
        global_weights = dict(updates[0].tensors)
        res = _measure(lambda: mean(updates, global_weights), args.repeats, float_names, names)
        return {**res, "label": label}

    stems = [Path(args.dir) / f"site-{i}" for i in range(args.sites)]
    manifests = [UpdateManifest.from_json(Path(f"{s}.json").read_text()) for s in stems]
    spec = dict(manifests[0].tensors)
    global_weights = {name: torch.zeros(s.shape, dtype=s.torch_dtype) for name, s in spec.items()}

    def open_all() -> list[Any]:
        return [
            open_update(
                stem,
                ExpectedUpdate(
                    experiment=m.experiment,
                    round=m.round,
                    site=m.site,
                    config_hash=m.config_hash,
                    tensors=spec,
                ),
            )
            for stem, m in zip(stems, manifests, strict=True)
        ]

    if mode == "ours-disk-validated":
        label += " + open_update (sha256, specs, NaN)"
        res = _measure(lambda: mean(open_all(), global_weights), args.repeats, float_names, names)
    else:
        lazy = open_all()
        res = _measure(lambda: mean(lazy, global_weights), args.repeats, float_names, names)
    return {**res, "label": label}


def step_worker(args: argparse.Namespace, shapes: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """The central's whole ``aggregate_step`` on a prepared store (checked updates in, global model out).

    One call per process (a step aggregates once): wall time, system time, and the peak RSS growth
    (VmHWM, kernel-tracked: no sampling) of the call.
    """
    import torch
    from safetensors.numpy import load_file

    from jipfed.federation.rounds import aggregate_step
    from jipfed.federation.sum_threads import usable_cpus
    from jipfed.storage.local import LocalFolderStore
    from jipfed.storage.state import ExperimentStore

    torch.set_num_threads(args.threads)
    exp_store = ExperimentStore(LocalFolderStore(args.dir), EXPERIMENT)
    base = _reset_peak()
    record, wall, kernel = _timed_run(lambda: aggregate_step(exp_store, 0))
    peak = _status("VmHWM") - base
    out = load_file(exp_store.store.uri(exp_store.layout.global_model(1)))
    float_names = [name for name, _, dtype in shapes if dtype != "int64"]
    return {
        "times": [wall],
        "sys_times": [kernel],
        "peak_extra": peak,
        "anon_extra": float("nan"),
        "checksum": _checksum(out, float_names),
        "included": len(record.included),
        "label": f"jipfed aggregate_step (store in, global model out), sums on {usable_cpus()} thread(s)",
    }


def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    shapes = layer_shapes(args.params)
    if mode == "step":
        return step_worker(args, shapes)
    if mode == "copy":
        return copy_bandwidth(model_bytes(shapes))
    if mode.startswith("flower"):
        return flower_worker(mode, args, shapes)
    return ours_worker(mode, args, shapes)


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


def spawn(
    python: Path | str, mode: str, args: argparse.Namespace, omp_wait: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Run ``mode`` in a fresh process; ``omp_wait`` sets OMP_WAIT_POLICY there (None: inherited)."""
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", mode, "--sites", str(args.sites)]
    cmd += ["--params", str(args.params), "--repeats", str(args.repeats)]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if omp_wait is not None:
        env["OMP_WAIT_POLICY"] = omp_wait
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


EXPERIMENT = "bench"


def prepare_store(root: Path, sites: int, args: argparse.Namespace) -> tuple[str, list[float]]:
    """An experiment whose step 0 has ``sites`` accepted updates (deltas of the benchmark's sites).

    The global model of round 0 is all zeros, so the step's result equals Flower's average of the
    same files. Returns the path pattern of the stored update files (``{dir}``, ``{i}``) and the
    seconds each ``accept_update`` took (the check at arrival, done once per update).
    """
    import torch

    from jipfed.federation.codec import encode_global, encode_update
    from jipfed.federation.experiment import ExperimentConfig
    from jipfed.federation.rounds import accept_update, start_experiment
    from jipfed.federation.update import ModelUpdate
    from jipfed.storage.local import LocalFolderStore
    from jipfed.storage.state import ExperimentStore

    torch.set_num_threads(args.threads)
    shapes = layer_shapes(args.params)
    config = ExperimentConfig(name=EXPERIMENT, sites=tuple(f"site-{i}" for i in range(sites)), rounds=1)
    exp_store = ExperimentStore(LocalFolderStore(root), EXPERIMENT)
    config_hash = exp_store.save_config(config.to_dict())
    zeros = {name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, shape, dtype in shapes}
    encoded = encode_global(zeros, experiment=EXPERIMENT, round=0, config_hash=config_hash)
    exp_store.save_global(0, encoded.payload, encoded.manifest.to_dict())
    start_experiment(exp_store, config)
    seconds = []
    for i in range(sites):
        update = ModelUpdate.build(
            {n: torch.from_numpy(a) for n, a in make_site(i, shapes).items()},
            experiment=EXPERIMENT,
            round=0,
            site=f"site-{i}",
            kind="delta",
            n_samples=n_samples(i),
            config_hash=config_hash,
        )
        encoded = encode_update(update)
        start = time.perf_counter()
        accept_update(exp_store, f"site-{i}", 0, encoded.payload, encoded.manifest.to_json())
        seconds.append(time.perf_counter() - start)
    pattern = exp_store.store.uri(exp_store.layout.update(0, "site-0")).replace("site-0", "site-{i}")
    return pattern, seconds


def step_rows(args: argparse.Namespace, flower_python: Path | str, size: int) -> list[str]:
    """aggregate_step vs Flower's load-and-aggregate of the same stored files; its memory for 4 and 16 sites."""
    lines = [
        "",
        "aggregate_step (checked updates in the store -> global model in the store), fresh process each:",
    ]
    goals = []
    with tempfile.TemporaryDirectory(prefix="jipfed-bench-step-") as tmp:
        base = Path(tmp) / "store"
        pattern, accept = prepare_store(base, args.sites, args)
        flowers, steps = [], []
        for k in range(args.step_repeats):
            flowers.append(spawn(flower_python, "flower-disk", args, dir=base, pattern=pattern))
            run = Path(tmp) / f"run-{k}"  # a fresh step: hard links keep the files' identities
            shutil.copytree(base, run, copy_function=os.link)
            steps.append(spawn(sys.executable, "step", args, dir=run, threads=args.threads))
            lines.append(
                f"  run {k}: Flower {flowers[-1]['times'][0]:.3f} s | aggregate_step {steps[-1]['times'][0]:.3f} s "
                f"(sys {steps[-1]['sys_times'][0]:.2f} s) = {flowers[-1]['times'][0] / steps[-1]['times'][0]:.2f}x "
                f"| load average {os.getloadavg()[0]:.2f}"
            )
        flower_s = statistics.median(f["times"][0] for f in flowers)
        step_s = statistics.median(s["times"][0] for s in steps)
        flower, step = flowers[0], steps[0]
        ratio = flower_s / step_s
        lines.append(
            f"{args.sites} sites, median of {args.step_repeats}: Flower load+aggregate cold {flower_s:.3f} s "
            f"(peak +{flower['peak_extra'] / 1e6:.0f} MB) | aggregate_step {step_s:.3f} s "
            f"(peak +{step['peak_extra'] / 1e6:.0f} MB, "
            f"{step['included']} sites included) | arrival check per update (once, at upload) "
            f"median {statistics.median(accept):.3f} s | checksums differ by "
            f"{abs(flower['checksum'] - step['checksum']):.3g}"
        )
        goals.append(
            _goal(
                f"aggregate_step >= 5x Flower, {args.sites} sites (load average {os.getloadavg()[0]:.2f})",
                ratio,
                ratio >= 5.0,
                "x",
            )
        )
    for sites in (4, 16):
        with tempfile.TemporaryDirectory(prefix="jipfed-bench-step-") as tmp:
            prepare_store(Path(tmp), sites, args)
            res = spawn(sys.executable, "step", args, dir=tmp, threads=args.threads)
        models = res["peak_extra"] / size
        lines.append(
            f"{sites} sites: aggregate_step {res['times'][0]:.3f} s, peak RSS +{res['peak_extra'] / 1e6:.0f} MB "
            f"= {models:.2f} x model"
        )
        goals.append(
            _goal(f"aggregate_step peak memory <= 2x model, {sites} sites", models, models <= 2.0, "x model")
        )
    return lines + goals


def _goal(what: str, value: float, ok: bool, unit: str) -> str:
    return f"{'PASS' if ok else 'MISS'}: {what}: {value:.2f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--params", type=int, default=30_000_000)
    parser.add_argument("--repeats", type=int, default=4, help="calls per process: 1 cold, the rest warm")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--passes", default="single", help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default="{dir}/site-{i}.safetensors", help=argparse.SUPPRESS)
    parser.add_argument("--only-step", action="store_true", help="only the aggregate_step rows and goals")
    parser.add_argument(
        "--step-repeats", type=int, default=7, help="Flower / aggregate_step runs, alternating"
    )
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(worker(args.worker, args)) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shapes = layer_shapes(args.params)
    size = model_bytes(shapes)
    cpus = os.cpu_count() or 1
    flower_python = ensure_flower() or sys.executable
    logger.info(
        "model: %d tensors, %d parameters, %.1f MB; %d sites; %d CPU(s); load average %.2f %.2f %.2f",
        len(shapes),
        sum(_numel(s) for _, s, _ in shapes),
        size / 1e6,
        args.sites,
        cpus,
        *os.getloadavg(),
    )
    if args.only_step:
        sys.stdout.write("\n".join(step_rows(args, flower_python, size)) + "\n")
        return
    copy = spawn(sys.executable, "copy", args)
    logger.info("copy bandwidth (read + write): %s", ", ".join(f"{k} {v:.1f} GB/s" for k, v in copy.items()))
    rows: list[dict[str, Any]] = []

    def row(scenario: str, python: Path | str, mode: str, **extra: Any) -> None:
        res = spawn(python, mode, args, **extra)
        cold, cold_sys = res["times"][0], res["sys_times"][0]
        warm = statistics.median(res["times"][1:]) if len(res["times"]) > 1 else cold
        warm_sys = statistics.median(res["sys_times"][1:]) if len(res["times"]) > 1 else cold_sys
        rows.append(
            {"scenario": scenario, "mode": mode, **res, "cold": cold, "warm": warm}
            | {"cold_sys": cold_sys, "warm_sys": warm_sys}
        )
        logger.info(
            "%-6s %-20s cold %6.3f s  warm %6.3f s  peak +%5.0f MB (anon +%5.0f MB)  %s",
            scenario,
            mode,
            cold,
            warm,
            res["peak_extra"] / 1e6,
            res["anon_extra"] / 1e6,
            res["label"],
        )

    # all-thread rows twice: libgomp's default spin-waiting, and passive waiting (see the README)
    multi = [] if cpus == 1 else [{"threads": cpus}, {"threads": cpus, "omp_wait": "PASSIVE"}]
    row("memory", flower_python, "flower-memory")
    for threads in [{"threads": 1}, *multi]:
        row("memory", sys.executable, "ours-memory", passes="single", **threads)
    row("memory", sys.executable, "ours-memory", threads=1, passes="stream")
    with tempfile.TemporaryDirectory(prefix="jipfed-bench-") as tmp:
        write_sites(Path(tmp), args)
        row("disk", flower_python, "flower-disk", dir=tmp)
        for threads in [{"threads": 1}, *multi]:
            row("disk", sys.executable, "ours-disk", dir=tmp, passes="single", **threads)
        row("disk", sys.executable, "ours-disk", dir=tmp, threads=1, passes=2)
        row("disk", sys.executable, "ours-disk", dir=tmp, threads=1, passes="stream")
        row("disk", sys.executable, "ours-disk-validated", dir=tmp, threads=1, passes="single")
    steps = step_rows(args, flower_python, size)
    logger.info("load average at the end: %.2f %.2f %.2f", *os.getloadavg())
    sys.stdout.write(report(rows, copy, size, args) + "\n" + "\n".join(steps) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"copy_gbps": copy, "model_bytes": size, "rows": rows}, indent=2))


def report(rows: list[dict[str, Any]], copy: dict[str, float], size: int, args: argparse.Namespace) -> str:
    moved = (args.sites + 1) * size
    best_copy = max(copy.values())
    lines = [
        f"\n{args.sites} sites x {size / 1e6:.0f} MB float32 model; bytes moved per aggregate = "
        f"(sites + 1) x model = {moved / 1e9:.2f} GB; copy bandwidth (read + write) "
        + ", ".join(f"{k} {v:.1f}" for k, v in copy.items())
        + f" GB/s, best {best_copy:.1f} GB/s. cold = first call in a fresh process (as in one Airflow "
        f"task); warm = median of the next {args.repeats - 1}; sys = system CPU seconds within them (page "
        "faults of fresh memory). peak = VmHWM growth (counts mapped file pages); anon = peak anonymous "
        "memory growth (sampled every 2 ms).\n",
        "| scenario | implementation | cold s | warm s | sys s cold / warm | GB/s cold / warm "
        "| % of copy BW cold / warm | speed-up vs Flower cold / warm | peak extra MB | anon extra MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flower = next(x for x in rows if x["scenario"] == r["scenario"] and x["mode"].startswith("flower"))
        gbps_cold, gbps_warm = moved / r["cold"] / 1e9, moved / r["warm"] / 1e9
        lines.append(
            f"| {r['scenario']} | {r['label']} | {r['cold']:.3f} | {r['warm']:.3f} "
            f"| {r['cold_sys']:.2f} / {r['warm_sys']:.2f} | {gbps_cold:.2f} / {gbps_warm:.2f} "
            f"| {100 * gbps_cold / best_copy:.0f} % / {100 * gbps_warm / best_copy:.0f} % "
            f"| {flower['cold'] / r['cold']:.1f}x / {flower['warm'] / r['warm']:.1f}x "
            f"| {r['peak_extra'] / 1e6:.0f} | {r['anon_extra'] / 1e6:.0f} |"
        )
    sums = [r["checksum"] for r in rows]
    lines.append(
        f"\nfloat results agree: checksums (sum of all float result values) spread {max(sums) - min(sums):.3g}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
