"""benchmarks/privacy.py's large-cohort option: its sizes, batch, cache folders and refusals."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from jipfed.privacy.settings import SampleDP

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "privacy.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("privacy_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cohort_cases_sets_the_grid_batch_and_per_site_noise(bench: ModuleType, tmp_path: Path) -> None:
    args = bench.parse_args(["--workdir", str(tmp_path / "p"), "--cohort-cases", "256", "--size", "micro"])
    assert (args.cases, args.batch_size, args.site_noise) == (256, bench.LARGE_COHORT_BATCH, True)
    assert (args.spatial_size, args.shape) == ([16, 16, 16], [32, 32, 24])
    assert args.data_dir == tmp_path / "p-cohort256" / "data"
    assert args.workdir == tmp_path / f"p-cohort256-b{bench.LARGE_COHORT_BATCH}-micro-lr0.003"


def test_a_different_batch_or_lr_keeps_the_cohort_data(bench: ModuleType, tmp_path: Path) -> None:
    args = bench.parse_args(
        ["--workdir", str(tmp_path / "p"), "--cohort-cases", "512", "--batch-size", "32", "--lr", "0.01"]
    )
    assert (args.cases, args.batch_size) == (512, 32)
    assert args.data_dir == tmp_path / "p-cohort512" / "data"
    assert args.workdir.name == "p-cohort512-b32-tiny-lr0.01"
    assert bench.parse_args(["--workdir", str(tmp_path / "p")]).batch_size == 2  # defaults unchanged
    assert bench.parse_args(["--workdir", str(tmp_path / "p"), "--cohort"]).batch_size == 16


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cohort-cases", "256", "--cohort"], "replaces --cohort / --quick"),
        (["--cohort-cases", "256", "--quick"], "replaces --cohort / --quick"),
        (["--cohort-cases", "50"], "too small for batch 64"),
        (["--cohort-cases", "20", "--batch-size", "32"], "too small for batch 32"),
    ],
)
def test_contradicting_or_too_small_cohorts_are_refused(
    bench: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_site_noise_leaves_the_noise_to_each_site_as_the_trainer_calibrates_it(bench: ModuleType) -> None:
    fixed = bench.parse_args(["--cohort", "--rounds", "3"])
    per_site = bench.parse_args(["--cohort", "--rounds", "3", "--site-noise"])
    assert bench.sample_privacy(fixed, 8.0, 2.5, 0.3)["sample_dp"]["noise_multiplier"] == 2.5
    settings = bench.sample_privacy(per_site, 8.0, 2.5, 0.3)["sample_dp"]
    assert (settings["noise_multiplier"], settings["planned_rounds"]) == (None, 3)
    assert SampleDP(**settings).epsilon == 8.0  # valid settings: each site calibrates z from its budget


def test_averaging_optimiser_and_trainable_reach_the_settings_and_the_cache_name(bench: ModuleType) -> None:
    plain = bench.parse_args(["--cohort", "--rounds", "3", "--site-noise"])
    assert (
        bench.sample_run_name(plain, 8.0, 0.326, 0.03) == "sample-poisson-eps8-C0p326-lr0p03-site-noise"
    )  # older caches
    args = bench.parse_args(
        [
            "--cohort",
            "--rounds",
            "3",
            "--dp-optimizer",
            "sgd",
            "--ema-decay",
            "0.9",
            "--trainable",
            "model.2.*",
        ]
    )
    settings = bench.sample_privacy(args, 8.0, 2.5, 0.3)["sample_dp"]
    assert (settings["ema_decay"], settings["trainable"]) == (0.9, ["model.2.*"])
    assert SampleDP(**settings).trainable == ("model.2.*",)
    assert bench.sample_run_name(args, 8.0, 0.3, 0.5) == "sample-poisson-eps8-C0p3-lr0p5-sgd-ema0p9-train-model2"


def test_the_public_pretraining_batch_and_lr_name_their_cache(bench: ModuleType, tmp_path: Path) -> None:
    argv = ["--workdir", str(tmp_path / "p"), "--cohort-cases", "256", "--size", "micro", "--lr", "0.01"]
    argv += ["--public-cases", "32", "--public-rounds", "20"]
    assert bench.parse_args(argv).workdir.name == "p-cohort256-b64-micro-lr0.01-public32x20"
    args = bench.parse_args([*argv, "--public-batch", "16", "--public-lr", "0.03"])
    assert args.workdir.name == "p-cohort256-b64-micro-lr0.01-public32x20-b16-lr0.03"
    assert args.data_dir == tmp_path / "p-cohort256" / "data"  # the sites' data stay shared


def test_augment_views_reach_the_settings_and_the_cache_name(bench: ModuleType) -> None:
    args = bench.parse_args(["--cohort", "--rounds", "3", "--site-noise", "--augment-views", "4"])
    settings = bench.sample_privacy(args, 8.0, 2.5, 0.3)["sample_dp"]
    assert SampleDP(**settings).augment_views == 4
    assert bench.sample_run_name(args, 8.0, 0.326, 0.03) == "sample-poisson-eps8-C0p326-lr0p03-views4-site-noise"
    again = bench.parse_args(
        ["--cohort", "--rounds", "3", "--site-noise", "--augment-views", "4", "--dp-repeat", "2"]
    )
    assert (
        bench.sample_run_name(again, 8.0, 0.326, 0.03) == "sample-poisson-eps8-C0p326-lr0p03-views4-rep2-site-noise"
    )
    one = bench.parse_args(["--cohort", "--rounds", "3", "--site-noise", "--augment-views", "1"])
    assert "augment_views" not in bench.sample_privacy(one, 8.0, 2.5, 0.3)["sample_dp"]  # older caches


def test_public_cases_from_several_site_profiles_name_their_cache(bench: ModuleType, tmp_path: Path) -> None:
    argv = ["--workdir", str(tmp_path / "p"), "--cohort-cases", "256", "--size", "micro", "--lr", "0.01"]
    argv += ["--public-cases", "256", "--public-rounds", "20", "--public-sites", "4"]
    assert bench.parse_args(argv).workdir.name == "p-cohort256-b64-micro-lr0.01-public256x20-sites4"


def test_a_cached_run_of_other_rounds_is_refused_not_reused(bench: ModuleType, tmp_path: Path) -> None:
    """The cache name carries no rounds: a 10-round result must not stand in for a 30-round run."""
    args = bench.parse_args(["--workdir", str(tmp_path / "p"), "--rounds", "30"])
    runs = args.workdir / "runs"
    runs.mkdir(parents=True)
    (runs / "nodp.json").write_text('{"dice": 0.4, "curve": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.4]}')
    with pytest.raises(SystemExit, match=r"nodp.json: a cached run of 10 rounds, not 30; give these rounds"):
        bench.run(args, {}, "nodp", None, {})
    assert bench.run(args, {}, "nodp", None, {}, rounds=10)["dice"] == 0.4  # the rounds it was run with


def test_the_tail_mean_leaves_out_the_start_and_covers_the_last_five_rounds(bench: ModuleType) -> None:
    assert bench.tail_mean({"curve": [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]}) == pytest.approx(0.5)
    assert bench.tail_mean({"curve": [0.9, 0.1, 0.3]}) == pytest.approx(0.2)  # a shorter run: all it has
