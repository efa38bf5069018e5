from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jipfed.federation.strategies.fedprox import proximal_term
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalResult, LocalTrainer

from .synth import write_site

SEG = TrainConfig(size="tiny", steps=30, batch_size=2, lr=0.01, val_fraction=0.25, seed=0)
CLS = TrainConfig(
    task="classification", model="densenet", size="tiny", steps=20, batch_size=2, lr=0.01, val_fraction=0.34
)


def _sq_dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    return sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in names)


@pytest.fixture(scope="module")
def seg_site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    return SiteData.from_dir(write_site(tmp_path_factory.mktemp("seg") / "site", 8, seed=1))


@pytest.fixture(scope="module")
def cls_site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    return SiteData.from_dir(write_site(tmp_path_factory.mktemp("cls") / "site", 12, seed=2))


@pytest.fixture(scope="module")
def seg_trained(seg_site: SiteData) -> tuple[dict[str, torch.Tensor], LocalResult]:
    """(initial weights, result of 30 steps from them) on the segmentation site."""
    torch.set_num_threads(1)
    trainer = LocalTrainer(SEG, seg_site, device="cpu")
    init = trainer.get_weights()
    return init, trainer.train(init, round=0)


def test_training_reduces_loss_and_improves_dice(seg_site: SiteData, seg_trained) -> None:
    init, result = seg_trained
    trainer = LocalTrainer(SEG, seg_site, device="cpu")
    before = trainer.evaluate(init)
    after = trainer.evaluate(result.weights)
    assert result.steps == 30 and result.n_samples == 6 and result.seconds > 0
    assert result.metrics["train_loss_last"] < result.metrics["train_loss_first"] - 0.3
    assert after["loss"] < before["loss"] - 0.3
    assert after["dice_mean"] > before["dice_mean"] + 0.3
    assert after["dice_wt"] > 0.6
    assert set(after) == {"loss", "n_cases", "dice_wt", "dice_tc", "dice_et", "dice_mean"}
    assert set(result.weights) == set(trainer.shared_names)
    assert all(t.device.type == "cpu" for t in result.weights.values())


def test_same_inputs_and_seed_give_identical_weights(seg_site: SiteData) -> None:
    cfg = TrainConfig(size="tiny", steps=4, batch_size=2, lr=0.01, val_fraction=0.25)
    first = LocalTrainer(cfg, seg_site, device="cpu")
    init = first.get_weights()
    a = first.train(init, round=3).weights
    again = first.train(init, round=3).weights  # no optimiser or RNG state carried between rounds
    b = LocalTrainer(cfg, seg_site, device="cpu").train(init, round=3).weights
    other_round = first.train(init, round=4).weights
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], again[k]) for k in a)
    assert any(not torch.equal(a[k], other_round[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)


def test_training_starts_from_the_given_weights(seg_site: SiteData, seg_trained) -> None:
    init, trained = seg_trained
    cfg = TrainConfig(size="tiny", steps=1, batch_size=2, lr=1e-4, val_fraction=0.25)
    trainer = LocalTrainer(cfg, seg_site, device="cpu")
    from_trained = trainer.train(trained.weights, round=0)
    from_init = trainer.train(init, round=0)
    names = trainer.shared_names
    assert _sq_dist(from_trained.weights, trained.weights, names) < 0.01 * _sq_dist(
        trained.weights, init, names
    )
    assert from_trained.metrics["train_loss_first"] < from_init.metrics["train_loss_first"] - 0.3


def test_fedprox_keeps_weights_closer_to_global(seg_site: SiteData) -> None:
    cfg = TrainConfig(size="tiny", steps=10, batch_size=2, lr=0.01, val_fraction=0.25)
    trainer = LocalTrainer(cfg, seg_site, device="cpu")
    glob = trainer.get_weights()
    plain = trainer.train(glob, mu=0.0)
    prox = trainer.train(glob, mu=1.0)
    names = trainer.shared_names
    assert _sq_dist(prox.weights, glob, names) < 0.5 * _sq_dist(plain.weights, glob, names)
    assert plain.metrics["proximal"] == 0.0 and prox.metrics["proximal"] > 0.0
    assert prox.metrics["mu"] == 1.0
    from_config = LocalTrainer(TrainConfig(**{**cfg.to_dict(), "fedprox_mu": 1.0}), seg_site, device="cpu")
    default_mu = from_config.train(glob)
    assert all(torch.equal(default_mu.weights[k], prox.weights[k]) for k in names)
    with pytest.raises(ValueError, match="mu"):
        trainer.train(glob, mu=-1.0)


def test_proximal_term_value() -> None:
    model = nn.Linear(3, 2)  # 8 trainable parameters
    model.bias.requires_grad_(False)  # 2 of them frozen: excluded
    glob = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    term = proximal_term(model, glob, mu=0.5)
    assert float(term.detach()) == pytest.approx(0.5 / 2 * 6)
    term.backward()
    assert torch.allclose(model.weight.grad, torch.full((2, 3), -0.5))


def test_evaluate_reads_only_the_held_out_split(tmp_path: Path) -> None:
    data = SiteData.from_dir(write_site(tmp_path / "site", 8, seed=4))
    trainer = LocalTrainer(TrainConfig(size="tiny", steps=1, val_fraction=0.25), data, device="cpu")
    train_keys, val_keys = set(trainer.train_keys), set(trainer.val_keys)
    assert len(val_keys) == 2 and not train_keys & val_keys
    assert train_keys | val_keys == {r.case_key for r in data.records}
    weights = trainer.get_weights()
    by_key = {r.case_key: r.path for r in data.records}
    for key in train_keys:
        by_key[key].write_bytes(b"not an npz")
    assert trainer.evaluate(weights)["n_cases"] == 2.0
    by_key[sorted(val_keys)[0]].write_bytes(b"not an npz")
    with pytest.raises(Exception):  # noqa: B017 - any read error proves the val file is used
        trainer.evaluate(weights)


def test_evaluate_leaves_the_trainer_model_alone(seg_site: SiteData, seg_trained) -> None:
    init, trained = seg_trained
    trainer = LocalTrainer(SEG, seg_site, device="cpu")
    own = trainer.evaluate()
    assert trainer.evaluate(trained.weights)["loss"] < own["loss"] - 0.3
    assert trainer.evaluate() == own
    assert all(torch.equal(v, init[k]) for k, v in trainer.get_weights().items())


def test_classification_trains_and_evaluates(cls_site: SiteData) -> None:
    trainer = LocalTrainer(CLS, cls_site, device="cpu")
    init = trainer.get_weights()
    before = trainer.evaluate(init)
    result = trainer.train(init)
    after = trainer.evaluate(result.weights)
    assert set(after) == {"loss", "n_cases", "auc", "accuracy"}
    assert after["n_cases"] == 4.0 and result.n_samples == 8
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] == 1.0
    assert math.isnan(after["auc"]) or 0.0 <= after["auc"] <= 1.0


def test_bn_policy_local_keeps_running_stats_at_the_site(cls_site: SiteData) -> None:
    cfg = TrainConfig(**{**CLS.to_dict(), "steps": 3})
    local = LocalTrainer(TrainConfig(**{**cfg.to_dict(), "bn_policy": "local"}), cls_site, device="cpu")
    shared = LocalTrainer(cfg, cls_site, device="cpu")
    full = local.get_weights()
    stats = [n for n in full if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and not set(stats) & set(local.shared_names)
    assert set(stats) <= set(shared.shared_names)

    result = local.train(full)
    assert not set(stats) & set(result.weights)
    assert set(stats) <= set(shared.train(full).weights)

    site_stats = {n: v for n, v in local.get_weights().items() if n in stats}
    assert any(not torch.equal(site_stats[n], full[n]) for n in stats), "training must update the stats"
    poisoned = {
        **result.weights,
        **{n: full[n] + 100 if full[n].is_floating_point() else full[n] for n in stats},
    }
    local.train(poisoned)  # global running stats are ignored under "local" ...
    after = local.get_weights()
    assert all(float(after[n].abs().max()) < 50 for n in stats if after[n].is_floating_point())
    # ... and in evaluation, while "aggregate" takes them over.
    assert local.evaluate(poisoned) == local.evaluate({**poisoned, **site_stats})
    assert shared.evaluate(poisoned)["loss"] != pytest.approx(shared.evaluate(full)["loss"])


def test_weights_are_copies_and_loading_is_checked(seg_site: SiteData) -> None:
    trainer = LocalTrainer(SEG, seg_site, device="cpu")
    weights = trainer.get_weights()
    name = next(iter(weights))
    weights[name].add_(1.0)
    assert not torch.equal(trainer.get_weights()[name], weights[name])
    trainer.load_weights(weights)
    assert torch.equal(trainer.get_weights()[name], weights[name])
    with pytest.raises(ValueError, match="missing"):
        trainer.train({k: v for k, v in weights.items() if k != name})
    with pytest.raises(ValueError, match="unknown"):
        trainer.load_weights({**weights, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        trainer.load_weights({**weights, name: torch.zeros(1)})
    with pytest.raises(ValueError, match="NaN"):
        trainer.evaluate({**weights, name: torch.full_like(weights[name], float("nan"))})


def test_trainer_rejects_inputs_the_model_cannot_take(tmp_path: Path) -> None:
    data = SiteData.from_dir(write_site(tmp_path / "odd", 2, size=12))
    with pytest.raises(ValueError, match="does not fit"):
        LocalTrainer(TrainConfig(size="tiny"), data, device="cpu")
