"""In-process simulation through the protocol functions, the centralised baseline and ``jipfed simulate``."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
from training.synth import write_site

from jipfed.commands import simulate as simulate_cmd
from jipfed.federation.experiment import ExperimentConfig
from jipfed.simulation import SimulationResult, simulate, train_centralized
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore, Status
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData

SITES = ("north", "south", "east")
TRAIN = TrainConfig(size="tiny", epochs=2, batch_size=2, lr=0.02, amp=False, val_fraction=0.25)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, site in enumerate(SITES):
        write_site(root / site, 4 + 2 * i, seed=i, size=16, prefix=str(i))
    return root


@pytest.fixture(scope="module")
def sites(data_root: Path) -> dict[str, SiteData]:
    return {site: SiteData.from_dir(data_root / site, group=site) for site in SITES}


@pytest.fixture(scope="module")
def fedavg_run(sites: dict[str, SiteData], tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    config = ExperimentConfig(name="sim", sites=SITES, rounds=4, train=TRAIN)
    return simulate(sites, config, tmp_path_factory.mktemp("fedavg"), progress=False)


def test_simulation_learns_well_above_the_untrained_model(fedavg_run: SimulationResult) -> None:
    curve = fedavg_run.curve()
    assert len(curve) == 5  # round 0 (initial model) + 4 rounds
    assert curve[0] < 0.2
    assert fedavg_run.final > 0.5
    assert fedavg_run.final > curve[0] + 0.35
    assert [r.included for r in fedavg_run.history] == [tuple(sorted(SITES))] * 4
    assert fedavg_run.rounds_to_reach(fedavg_run.final) is not None


def test_global_metric_is_the_case_weighted_mean_of_the_sites(fedavg_run: SimulationResult) -> None:
    for row in fedavg_run.rows:
        per_site = row["sites"]
        cases = sum(m["n_cases"] for m in per_site.values())
        expected = sum(m["dice_mean"] * m["n_cases"] for m in per_site.values()) / cases
        assert row["global"]["dice_mean"] == pytest.approx(expected)
        assert row["global"]["n_cases"] == cases


def test_metrics_files_and_plot_are_written(fedavg_run: SimulationResult) -> None:
    data = json.loads(fedavg_run.metrics_json.read_text())
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2, 3, 4]
    assert set(data["rounds"][-1]["sites"]) == set(SITES)
    with fedavg_run.metrics_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 * (1 + len(SITES))
    last_global = [r for r in rows if r["round"] == "4" and r["scope"] == "global"][0]
    assert float(last_global["dice_mean"]) == pytest.approx(fedavg_run.final, rel=1e-5)
    assert fedavg_run.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    store = ExperimentStore(LocalFolderStore(fedavg_run.metrics_json.parent / "store"), "sim")
    assert store.load_state().status is Status.FINISHED
    card = json.loads(store.store.get_bytes(store.layout.final("model_card.json")))
    assert card["evaluation"]["heldout_dice_mean"] == pytest.approx(fedavg_run.final)
    assert store.store.exists(store.layout.final("report/dice_mean.png"))


def test_rerunning_a_finished_simulation_resumes_without_training(
    sites: dict[str, SiteData], fedavg_run: SimulationResult
) -> None:
    config = ExperimentConfig(name="sim", sites=SITES, rounds=4, train=TRAIN)
    again = simulate(sites, config, fedavg_run.metrics_json.parent, progress=False)
    assert again.curve() == pytest.approx(fedavg_run.curve())
    assert again.history == fedavg_run.history


def test_cyclic_plan_runs(sites: dict[str, SiteData], tmp_path: Path) -> None:
    config = ExperimentConfig(
        name="cyc", sites=SITES, rounds=2, plan="cyclic", order="rotating", train=TRAIN, encoding="fp16"
    )
    result = simulate(sites, config, tmp_path, progress=False)
    assert len(result.history) == 2 * len(SITES)
    assert [r.included for r in result.history[3:]] == [("south",), ("east",), ("north",)]
    assert len(result.rows) == 3
    assert result.final > result.curve()[0] + 0.3


def test_centralized_baseline_learns(sites: dict[str, SiteData]) -> None:
    result = train_centralized(sites, TRAIN, epochs=4, eval_every=2, progress=False)
    assert [epoch for epoch, _ in result.curve()] == [0, 2, 4]
    assert result.final > result.curve()[0][1] + 0.35


def test_cli_runs_a_short_simulation(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    simulate_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "simulate",
            "--data",
            str(data_root),
            "--sites",
            "2",
            "--out",
            str(tmp_path),
            "--rounds",
            "1",
            "--strategy",
            "fedadam",
            "--strategy-arg",
            "eta=0.01",
            "--strategy-arg",
            "tau=0.001",
            "--local-steps",
            "2",
            "--lr",
            "0.02",
            "--val-fraction",
            "0.25",
            "--personalize-epochs",
            "1",
            "--no-progress",
        ]
    )
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "global dice_mean" in out and "north" in out and "south" not in out  # first 2, sorted
    assert "site east: global dice_mean" in out and "personalised" in out
    config = json.loads((tmp_path / "store" / "experiments" / "simulation" / "config.json").read_text())
    assert config["strategy_kwargs"] == {"eta": 0.01, "tau": 0.001} and config["train"]["steps"] == 2
    assert (tmp_path / "metrics.csv").is_file()


def test_cli_rejects_a_data_folder_without_sites(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    simulate_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert args.run(args) == 2


@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [
        ("scaffold", {}),
        ("fednova", {}),
        ("feddyn", {"alpha": 0.01}),
        ("fedbn", {"local_patterns": ["model.0.*"]}),
        (
            "fedadam",
            {
                "server_lr_schedule": {"kind": "cosine", "rounds": 3},
                "local_lr_schedule": {"kind": "exp", "gamma": 0.5},
            },
        ),
    ],
)
def test_heterogeneity_methods_learn_through_the_protocol(
    sites: dict[str, SiteData], tmp_path: Path, strategy: str, kwargs: dict
) -> None:
    config = ExperimentConfig(
        name=f"het-{strategy}", sites=SITES, rounds=3, train=TRAIN, strategy=strategy, strategy_kwargs=kwargs
    )
    result = simulate(sites, config, tmp_path, progress=False, personalize_epochs=1)
    curve = result.curve()
    assert result.final > curve[0] + 0.3, curve
    assert [r.included for r in result.history] == [tuple(sorted(SITES))] * 3  # every update validated
    assert set(result.personalised) == set(SITES)
    for scores in result.personalised.values():
        assert 0.0 <= scores["personalised"]["dice_mean"] <= 1.0
    saved = json.loads((tmp_path / "personalised.json").read_text())
    assert saved["epochs"] == 1 and set(saved["sites"]) == set(SITES)
    if strategy == "scaffold":
        final = ExperimentStore(LocalFolderStore(tmp_path / "store"), config.name)
        manifest = final.load_global(3)[1]
        names = [t["name"] if isinstance(t, dict) else t for t in manifest["tensors"]]
        assert any(str(name).startswith("control/") for name in names), names[:3]


def test_heterogeneity_profiles_span_the_grid() -> None:
    from jipfed.imaging.synth.profiles import heterogeneity_profiles

    strong = heterogeneity_profiles("strong", smallest=3)
    sizes = [p.n_cases for p in strong]
    assert len(strong) == 4 and max(sizes) >= 8 * min(sizes)
    assert {p.field_strength_t for p in strong} == {1.5, 3.0}
    assert len({p.orientation for p in strong}) == 4
    assert max(p.hgg_fraction for p in strong) - min(p.hgg_fraction for p in strong) >= 0.5
    homogeneous = heterogeneity_profiles("homogeneous", smallest=3)
    assert len({(p.n_cases, p.intensity_scale, p.orientation) for p in homogeneous}) == 1
    assert sum(p.n_cases for p in heterogeneity_profiles("default", smallest=3)) == 18
    with pytest.raises(ValueError, match="setting must be one of"):
        heterogeneity_profiles("extreme")


def test_simulation_result_carries_the_final_global_model(fedavg_run: SimulationResult) -> None:
    store = ExperimentStore(LocalFolderStore(fedavg_run.metrics_json.parent / "store"), fedavg_run.experiment)
    assert store.has_global(len(fedavg_run.rows) - 1)
    assert fedavg_run.weights and all(torch.isfinite(t).all() for t in fedavg_run.weights.values())


def test_fedadam_moves_weights_but_averages_batchnorm_statistics(
    sites: dict[str, SiteData], tmp_path: Path
) -> None:
    # round 0: both strategies see the same site updates; only trainable weights take FedAdam's step
    train = TrainConfig(
        task="classification",
        model="densenet",
        size="tiny",
        epochs=1,
        batch_size=2,
        lr=0.01,
        amp=False,
        val_fraction=0.25,
    )
    final = {}
    for strategy in ("fedavg", "fedadam"):
        config = ExperimentConfig(
            name=f"cls-{strategy}", sites=SITES, rounds=1, train=train, strategy=strategy
        )
        final[strategy] = simulate(sites, config, tmp_path / strategy, progress=False).weights
    stats = [n for n in final["fedavg"] if n.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(final["fedadam"][n], final["fedavg"][n], atol=1e-6) for n in stats)
    assert all(bool((final["fedadam"][n] > 0).all()) for n in stats if n.endswith("running_var"))
    weights = [n for n in final["fedavg"] if n.endswith("conv0.weight")]
    assert weights and not torch.allclose(final["fedadam"][weights[0]], final["fedavg"][weights[0]])
