"""Per-round fit settings at the site: learning-rate scale, site-local entries, SCAFFOLD, FedDyn."""

from __future__ import annotations

import pytest
import torch

from jipfed.federation.site_round import update_tensors
from jipfed.federation.update import control_name
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.fit import FitSettings
from jipfed.training.local import LocalTrainer

from .synth import write_site

TRAIN = TrainConfig(size="tiny", steps=4, batch_size=2, lr=0.01, val_fraction=0.25, seed=0, amp=False)
FIRST = "model.0.conv.weight"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    return SiteData.from_dir(write_site(tmp_path_factory.mktemp("fit") / "site", 6, seed=3))


def _trainer(site: SiteData) -> LocalTrainer:
    torch.set_num_threads(1)
    return LocalTrainer(TRAIN, site, device="cpu")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"eta": 1}, "unsupported fit settings \\['eta'\\]"),
        ({"lr_scale": 0}, "lr_scale must be a finite number > 0"),
        ({"local_patterns": "model.*"}, "local_patterns must be a list"),
        ({"scaffold": 1}, "scaffold must be a boolean"),
        ({"feddyn_alpha": -1.0}, "feddyn_alpha must be"),
    ],
)
def test_fit_settings_errors(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FitSettings.from_config(config)


def test_lr_scale_scales_the_local_steps(site: SiteData) -> None:
    trainer = _trainer(site)
    init = trainer.get_weights()
    full = trainer.train(init, round=0)
    small = trainer.train(init, round=0, fit=FitSettings(lr_scale=0.1))
    assert small.metrics["lr"] == pytest.approx(0.001)
    moved = float((full.weights[FIRST] - init[FIRST]).norm())
    assert float((small.weights[FIRST] - init[FIRST]).norm()) < 0.5 * moved


def test_local_entries_stay_at_the_site_and_never_leave(site: SiteData) -> None:
    trainer = _trainer(site)
    init = trainer.get_weights()
    fit = FitSettings(local_patterns=("model.0.*",))
    result = trainer.train(init, round=0, fit=fit)
    assert FIRST in trainer.local_names and len(trainer.local_names) < len(trainer.shared_names)
    sent = update_tensors(result, init, "delta", trainer.local_names)
    assert torch.count_nonzero(sent[FIRST]) == 0  # never leaves the site
    assert any(torch.count_nonzero(sent[n]) for n in sent if n not in trainer.local_names)
    own = result.weights[FIRST]
    other = {n: torch.zeros_like(t) if n == FIRST else t for n, t in init.items()}
    trainer.train(other, round=1, fit=FitSettings())  # later rounds keep the adopted local entries
    assert not torch.equal(trainer.get_weights()[FIRST], torch.zeros_like(own))


def test_scaffold_controls_are_the_mean_local_gradient(site: SiteData) -> None:
    trainer = _trainer(site)
    init = trainer.get_weights()
    result = trainer.train(init, round=0, fit=FitSettings(scaffold=True))
    assert set(result.controls) == {n for n, p in trainer.model.named_parameters()}
    assert torch.count_nonzero(result.controls[FIRST]) > 0
    assert torch.equal(trainer.site_control[FIRST], result.controls[FIRST])  # c_i was 0: the change is c_i+
    sent = update_tensors(result, init, "delta", trainer.local_names)
    assert set(sent) == set(init) | {control_name(n) for n in result.controls}
    # with c - c_i = +100 the corrected gradient is ~ +100: Adam steps every weight by ~ -lr per step
    server = {**init, **{control_name(n): c + 100.0 for n, c in trainer.site_control.items()}}
    corrected = trainer.train(server, round=1, fit=FitSettings(scaffold=True))
    shift = init[FIRST] - corrected.weights[FIRST]
    assert float(shift.mean()) == pytest.approx(result.steps * TRAIN.lr, rel=0.05)
    second = trainer.site_control[FIRST]
    assert torch.allclose(corrected.controls[FIRST], second - result.controls[FIRST])


def test_feddyn_updates_the_linearised_gradient(site: SiteData) -> None:
    trainer = _trainer(site)
    init = trainer.get_weights()
    result = trainer.train(init, round=0, fit=FitSettings(feddyn_alpha=0.1))
    want = -0.1 * (result.weights[FIRST] - init[FIRST])
    assert torch.allclose(trainer.dyn_gradient[FIRST], want, atol=1e-7)


def test_site_state_round_trips_into_a_new_trainer(site: SiteData) -> None:
    trainer = _trainer(site)
    init = trainer.get_weights()
    fit = FitSettings(local_patterns=("model.0.*",), scaffold=True, feddyn_alpha=0.1)
    trainer.train(init, round=0, fit=fit)
    state = trainer.site_state()
    assert {k.split("/", 1)[0] for k in state} == {"local", "control", "dyn"}
    fresh = _trainer(site)
    fresh.load_site_state(state)
    assert fresh.local_names == trainer.local_names
    assert torch.equal(fresh.get_weights()[FIRST], trainer.get_weights()[FIRST])
    a = trainer.train(init, round=1, fit=fit)
    b = fresh.train(init, round=1, fit=fit)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert all(torch.equal(a.controls[n], b.controls[n]) for n in a.controls)
    with pytest.raises(ValueError, match="'control/nope' does not fit"):
        fresh.load_site_state({"control/nope": torch.zeros(1)})


def test_evaluate_scores_other_records_when_given(site: SiteData) -> None:
    trainer = _trainer(site)
    weights = trainer.get_weights()
    held_out = trainer.evaluate(weights)
    on_train = trainer.evaluate(weights, records=trainer.train_records)
    assert held_out["n_cases"] == len(trainer.val_records)
    assert on_train["n_cases"] == len(trainer.train_records) != held_out["n_cases"]


def test_the_site_task_keeps_its_state_on_disk_between_rounds(site: SiteData, tmp_path) -> None:
    from jipfed.tasks.site_model import keep_site_state, restore_site_state

    path = tmp_path / "site-state" / "exp.safetensors"
    fit = FitSettings(local_patterns=("model.0.*",), scaffold=True, feddyn_alpha=0.1)
    trainer = _trainer(site)
    init = trainer.get_weights()
    restore_site_state(trainer, path, where="site 'a'")  # round 0: nothing kept yet
    trainer.train(init, round=0, fit=fit)
    keep_site_state(trainer, path)
    fresh = _trainer(site)  # the next round's task builds a new trainer
    restore_site_state(fresh, path, where="site 'a'")
    a = trainer.train(init, round=1, fit=fit)
    b = fresh.train(init, round=1, fit=fit)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert all(torch.equal(a.controls[n], b.controls[n]) for n in a.controls)
