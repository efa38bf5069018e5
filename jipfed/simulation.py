"""In-process federated simulation through exactly the functions the Airflow DAGs call.

:func:`simulate` runs every step of an experiment's plan as ``open_step`` → ``run_site_step`` per
selected site → ``accept_update`` → ``aggregate_step``, then ``finalize``, against a
:class:`~jipfed.storage.local.LocalFolderStore` under ``workdir/store``. After each round it scores
the global model on every site's held-out cases and writes::

    <workdir>/metrics.json     per-round rows: global (case-weighted mean over sites) and per site
    <workdir>/metrics.csv      the same, one line per round and scope
    <workdir>/<metric>.png     the global and per-site curve of the primary metric per round
    <workdir>/personalised.json  with ``personalize_epochs``: per site, the final global model's
                               and the site's fine-tuned (personalised) model's held-out scores

(also copied under the experiment's ``final/report/``). Calling it again on the same workdir
resumes an interrupted run from the last completed step.

:func:`train_centralized` is the pooled baseline, and :func:`prepare_synthetic_sites` builds site
folders through the real data pipeline (synthetic DICOM → NIfTI → preprocessed cases).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from jipfed import reporting
from jipfed.federation.codec import decode_update
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.rounds import (
    accept_update,
    aggregate_step,
    finalize,
    open_step,
    start_experiment,
)
from jipfed.federation.site_round import run_site_step
from jipfed.federation.update import UpdateManifest
from jipfed.federation.validation import ExpectedUpdate
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore, StepRecord
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData, pooled_data
from jipfed.training.fit import FitSettings
from jipfed.training.local import LocalTrainer

if TYPE_CHECKING:
    from jipfed.imaging.synth.profiles import SiteProfile

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
PERSONALISED_JSON = "personalised.json"


def primary_metric(task: str) -> str:
    """The metric reported per round: ``dice_mean`` (segmentation) or ``auc`` (classification)."""
    return "dice_mean" if task == "segmentation" else "auc"


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of :func:`simulate`.

    Attributes:
        experiment: experiment name.
        rows: per-round rows (see :mod:`jipfed.reporting`), round 0 = the initial model.
        history: the experiment's step records (included / rejected sites, metrics).
        model_card: the final model card.
        metrics_json, metrics_csv, plot: files written under the workdir.
        seconds: wall-clock time spent on the experiment, summed over resumed calls.
        metric: the primary metric's name.
        personalised: site → ``{"global": metrics, "personalised": metrics}`` on the site's
            held-out cases (empty unless ``personalize_epochs``).
        weights: the final global model (control variates included for SCAFFOLD).
    """

    experiment: str
    rows: tuple[Mapping[str, Any], ...]
    history: tuple[StepRecord, ...]
    model_card: Mapping[str, Any]
    metrics_json: Path
    metrics_csv: Path
    plot: Path
    seconds: float
    metric: str = "dice_mean"
    personalised: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def curve(self, metric: str | None = None) -> list[float]:
        """The global value of ``metric`` (default: the primary one) per round, round 0 first."""
        name = metric or self.metric
        return [float(row["global"].get(name, math.nan)) for row in self.rows]

    @property
    def final(self) -> float:
        """The primary metric of the final global model."""
        return self.curve()[-1]

    def rounds_to_reach(self, target: float, metric: str | None = None) -> int | None:
        """First round whose global model scores >= ``target``, or None if none does."""
        for row, value in zip(self.rows, self.curve(metric), strict=True):
            if value >= target:
                return int(row["round"])
        return None


@dataclass(frozen=True)
class CentralResult:
    """Outcome of :func:`train_centralized`: ``points`` of (epochs done, metrics on the pooled held-out cases)."""

    points: tuple[tuple[int, Mapping[str, float]], ...]
    seconds: float
    metric: str = "dice_mean"
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def curve(self, metric: str | None = None) -> list[tuple[int, float]]:
        name = metric or self.metric
        return [(epoch, float(m.get(name, math.nan))) for epoch, m in self.points]

    @property
    def final(self) -> float:
        return self.curve()[-1][1]


def site_train_sizes(sites: Mapping[str, SiteData], train: TrainConfig) -> dict[str, int]:
    """Training cases per site after the held-out split (for ``ExperimentConfig.site_samples``)."""
    return {site: len(data.split(train.val_fraction, train.seed)[0]) for site, data in sites.items()}


def evaluate_sites(
    trainers: Mapping[str, LocalTrainer], weights: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """``{"global": case-weighted mean, "sites": {site: metrics}}`` of ``weights`` on every held-out split."""
    per_site = {site: trainer.evaluate(weights) for site, trainer in trainers.items() if trainer.val_records}
    if not per_site:
        raise ValueError("no site has held-out cases (val_fraction = 0 or too few cases)")
    return {"global": reporting.weighted_mean(per_site), "sites": per_site}


def personalise(
    trainers: Mapping[str, LocalTrainer],
    weights: Mapping[str, torch.Tensor],
    epochs: int,
    *,
    round: int,
    fit: FitSettings | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Fine-tune ``weights`` for ``epochs`` epochs at every site on its own training cases.

    Returns site → ``{"global": scores of weights, "personalised": scores of the fine-tuned model}``
    on the site's held-out cases. Only the local learning-rate scale and site-local entries of
    ``fit`` apply (no proximal, SCAFFOLD or FedDyn terms: the site trains for itself).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"personalisation epochs must be an integer >= 1, got {epochs!r}")
    plain = FitSettings(
        mu=0.0,
        lr_scale=fit.lr_scale if fit else 1.0,
        local_patterns=fit.local_patterns if fit else (),
    )
    out: dict[str, dict[str, dict[str, float]]] = {}
    for site, trainer in trainers.items():
        if not trainer.val_records:
            continue
        base = trainer.config
        trainer.config = replace(base, epochs=epochs, steps=None)
        try:
            tuned = trainer.train(weights, round=round, fit=plain).weights
        finally:
            trainer.config = base
        out[site] = {"global": trainer.evaluate(weights), "personalised": trainer.evaluate(tuned)}
    return out


def _global_weights(exp_store: ExperimentStore, round_: int) -> dict[str, torch.Tensor]:
    payload, manifest_data = exp_store.load_global(round_)
    manifest = UpdateManifest.from_dict(manifest_data)
    expected = ExpectedUpdate.for_global(
        experiment=exp_store.experiment,
        round=round_,
        config_hash=exp_store.config_hash(),
        tensors=manifest.tensors,
    )
    return dict(decode_update(payload, manifest, expected).tensors)


def _load_rows(path: Path, config_hash: str) -> tuple[dict[int, dict[str, Any]], float]:
    """Rows and seconds spent by earlier calls on the same experiment config (resume)."""
    if not path.is_file():
        return {}, 0.0
    data = json.loads(path.read_text())
    if data.get("config_hash") != config_hash:
        return {}, 0.0
    return {int(row["round"]): row for row in data.get("rounds", [])}, float(data.get("seconds", 0.0))


def simulate(
    sites: Mapping[str, SiteData],
    config: ExperimentConfig,
    workdir: str | Path,
    progress: bool = True,
    *,
    evaluate_local: bool = False,
    device: str | None = None,
    personalize_epochs: int = 0,
    store_dir: str | Path | None = None,
) -> SimulationResult:
    """Run ``config``'s whole plan in this process with one trainer per site.

    Args:
        sites: site id → its preprocessed cases; the ids must be exactly ``config.sites``.
        config: the experiment.
        workdir: folder for the store and the reports (created; reused to resume).
        progress: show a tqdm bar per round with the current primary metric.
        evaluate_local: sites also score their trained local model (``val_*`` in the manifests).
        device: torch device of the trainers (None: CUDA when available).
        personalize_epochs: after the last round every site fine-tunes the final global model
            for this many epochs on its own data; both scores per site go to
            ``personalised.json`` and :attr:`SimulationResult.personalised` (0 = off).
        store_dir: the model store's folder (default ``workdir/store``); experiments that share
            one can start from each other's final model (``config.initial_model``).

    Returns:
        :class:`SimulationResult`.
    """
    started = time.perf_counter()
    if set(sites) != set(config.sites):
        raise ValueError(
            f"experiment {config.name!r}: sites given {sorted(sites)} differ from the config's {sorted(config.sites)}"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exp_store = ExperimentStore(LocalFolderStore(Path(store_dir or workdir / "store")), config.name)
    state = start_experiment(exp_store, config)
    config_hash = exp_store.config_hash()
    trainers = {site: LocalTrainer(config.train, sites[site], device=device) for site in config.sites}
    metric = primary_metric(config.train.task)
    metrics_json = workdir / METRICS_JSON
    rows, earlier_seconds = _load_rows(metrics_json, config_hash)

    def report() -> dict[str, Any]:
        return {
            "experiment": config.name,
            "config_hash": config_hash,
            "metric": metric,
            "rounds": [rows[r] for r in sorted(rows)],
            "seconds": earlier_seconds + time.perf_counter() - started,
        }

    plan = config.make_plan()

    def score_round(round_: int) -> dict[str, Any]:
        if round_ not in rows:
            rows[round_] = {"round": round_, **evaluate_sites(trainers, _global_weights(exp_store, round_))}
            reporting.write_json(metrics_json, report())  # saved as we go: a restart does not score again
            logger.info(
                "round %d: global %s %.4f", round_, metric, rows[round_]["global"].get(metric, math.nan)
            )
        return rows[round_]

    bar = tqdm(total=config.rounds, desc=f"simulate {config.name}", unit="round", disable=not progress)
    try:
        bar.set_postfix({metric: f"{score_round(0)['global'].get(metric, math.nan):.3f}"})
        for step in range(state.next_step, plan.n_steps):
            ticket = open_step(exp_store, step)
            payload = exp_store.store.get_bytes(ticket.model_key)
            manifest = exp_store.store.get_bytes(ticket.manifest_key)
            uploaded = set(exp_store.list_updates(ticket.round))
            for site in ticket.sites:
                if site in uploaded:
                    continue  # resumed after a crash: this site's update is already in
                encoded = run_site_step(
                    ticket,
                    payload,
                    manifest,
                    trainers[site],
                    site,
                    config.name,
                    config_hash,
                    evaluate=evaluate_local,
                )
                accept_update(exp_store, site, ticket.round, encoded.payload, encoded.manifest.to_json())
            aggregate_step(exp_store, step)
            if ticket.is_last_in_round:
                row = score_round(ticket.round + 1)
                bar.update(1)
                bar.set_postfix({metric: f"{row['global'].get(metric, math.nan):.3f}"})
        bar.update(config.rounds - bar.n)
        for round_ in range(config.rounds + 1):  # rounds completed before a restart
            score_round(round_)
    finally:
        bar.close()
    ordered = [rows[r] for r in sorted(rows)]
    personalised: dict[str, Any] = {}
    final_weights = _global_weights(exp_store, config.rounds)
    if personalize_epochs:
        fit = FitSettings.from_config(config.make_strategy().configure_fit(config.rounds))
        personalised = personalise(trainers, final_weights, personalize_epochs, round=config.rounds, fit=fit)
        reporting.write_json(
            workdir / PERSONALISED_JSON, {"epochs": personalize_epochs, "sites": personalised}
        )
    final_scores = {k: v for k, v in ordered[-1]["global"].items() if isinstance(v, float)}
    card = finalize(exp_store, evaluation={f"heldout_{k}": v for k, v in final_scores.items()})
    final_report = report()
    reporting.write_json(metrics_json, final_report)
    metrics_csv = reporting.write_rounds_csv(workdir / METRICS_CSV, ordered)
    plot = reporting.plot_rounds(
        workdir / f"{metric}.png", ordered, metric, title=f"{config.name}: {config.plan} / {config.strategy}"
    )
    for path in (metrics_json, metrics_csv, plot):
        exp_store.save_final(f"report/{path.name}", path.read_bytes(), overwrite=True)
    seconds = final_report["seconds"]
    logger.info(
        "simulation %s: final %s %.4f after %.1f s",
        config.name,
        metric,
        ordered[-1]["global"][metric],
        seconds,
    )
    return SimulationResult(
        experiment=config.name,
        rows=tuple(ordered),
        history=exp_store.load_state().history,
        model_card=card,
        metrics_json=metrics_json,
        metrics_csv=metrics_csv,
        plot=plot,
        seconds=seconds,
        metric=metric,
        personalised=personalised,
        weights=final_weights,
    )


def train_centralized(
    sites: Mapping[str, SiteData] | Sequence[SiteData],
    train_config: TrainConfig,
    epochs: int,
    eval_every: int = 1,
    *,
    progress: bool = True,
    device: str | None = None,
) -> CentralResult:
    """Pooled baseline: train one model on all sites' training cases for ``epochs`` epochs.

    Every ``eval_every`` epochs the model is scored on the union of the sites' held-out splits
    (the pooled split is exactly that union). Training runs in chunks of ``eval_every`` epochs,
    each a :meth:`LocalTrainer.train` call, so the optimiser restarts every chunk (as it does
    every round in federated training); ``eval_every=epochs`` trains in one go.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    started = time.perf_counter()
    members = list(sites.values()) if isinstance(sites, Mapping) else list(sites)
    trainer = LocalTrainer(replace(train_config, epochs=1, steps=None), pooled_data(members), device=device)
    metric = primary_metric(train_config.task)
    weights = trainer.get_weights()
    points = [(0, trainer.evaluate(weights))]
    done, chunk = 0, 0
    with tqdm(total=epochs, desc="centralized", unit="epoch", disable=not progress) as bar:
        while done < epochs:
            n = min(eval_every, epochs - done)
            trainer.config = replace(train_config, epochs=n, steps=None)
            weights = trainer.train(weights, mu=0.0, round=chunk).weights
            done += n
            chunk += 1
            points.append((done, trainer.evaluate(weights)))
            bar.update(n)
            bar.set_postfix({metric: f"{points[-1][1].get(metric, math.nan):.3f}"})
    return CentralResult(
        points=tuple(points), seconds=time.perf_counter() - started, metric=metric, weights=weights
    )


def _study_layout(case_dir: Path, dicom_root: Path) -> Path:
    """Copy a synthetic case (``<case_id>/<SERIES>/``) into the fetch-cache layout
    ``<dicom_root>/<StudyInstanceUID>/<SeriesInstanceUID>/`` the converter expects; return the study folder."""
    import pydicom

    study_dir = None
    for series_dir in sorted(p for p in case_dir.iterdir() if p.is_dir()):
        first = next(p for p in sorted(series_dir.iterdir()) if p.is_file())
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        study_dir = dicom_root / str(ds.StudyInstanceUID)
        target = study_dir / str(ds.SeriesInstanceUID)
        if not target.exists():
            shutil.copytree(series_dir, target)
    if study_dir is None:
        raise ValueError(f"no series folders in {case_dir}")
    return study_dir


def prepare_synthetic_sites(
    out: str | Path,
    n_sites: int = 3,
    cases_per_site: int = 8,
    *,
    shape: tuple[int, int, int] = (64, 64, 40),
    spatial_size: tuple[int, int, int] = (48, 48, 32),
    spacing_mm: tuple[float, float, float] = (2.7, 2.7, 3.4),
    heterogeneous: bool = True,
    seed: int = 0,
    progress: bool = True,
    profiles: Sequence[SiteProfile] | None = None,
) -> dict[str, Path]:
    """Synthetic DICOM → NIfTI → preprocessed cases, one folder per site; returns site → folder.

    Uses the site pipeline's own modules (``jipfed.imaging.synth``, ``.convert``, ``.preprocess``);
    every stage is cached, so a second call reuses the work. ``shape`` is the synthetic scan's
    (rows, cols, slices); ``spatial_size`` / ``spacing_mm`` the preprocessed grid. ``profiles``
    replaces ``default_site_profiles(n_sites, cases_per_site, heterogeneous)`` (e.g.
    :func:`jipfed.imaging.synth.profiles.heterogeneity_profiles`).
    """
    from jipfed.imaging.convert import convert_cases
    from jipfed.imaging.preprocess import PreprocessConfig, preprocess_cases
    from jipfed.imaging.synth import default_site_profiles, write_dataset

    out = Path(out)
    synth_root = out / "synth"
    if profiles is None:
        profiles = default_site_profiles(n_sites, cases_per_site, heterogeneous=heterogeneous)
        marker = (
            synth_root
            / f".done-{shape[0]}x{shape[1]}x{shape[2]}-{seed}-{n_sites}-{cases_per_site}-{heterogeneous}"
        )
    else:
        digest = hashlib.sha256(json.dumps([p.to_dict() for p in profiles], sort_keys=True).encode())
        marker = synth_root / f".done-{shape[0]}x{shape[1]}x{shape[2]}-{seed}-{digest.hexdigest()[:12]}"
    if not marker.exists():
        write_dataset(synth_root, profiles, shape=shape, seed=seed, progress=progress)
        marker.touch()
    pre_config = PreprocessConfig(spacing_mm=spacing_mm, spatial_size=spatial_size)
    folders: dict[str, Path] = {}
    for profile in profiles:
        site_root = out / "sites" / profile.site_id
        case_dirs = sorted(p for p in (synth_root / profile.site_id / "dicom").iterdir() if p.is_dir())
        studies = [_study_layout(case_dir, site_root / "dicom") for case_dir in case_dirs]
        report = convert_cases(studies, site_root / "nifti")
        if report.skipped:
            raise ValueError(f"site {profile.site_id}: conversion skipped cases: {report.skipped}")
        keys = [*report.converted, *report.cached]
        pre = preprocess_cases(
            [site_root / "nifti" / k for k in keys], site_root / "preprocessed", pre_config, progress
        )
        if pre.failed:
            raise ValueError(f"site {profile.site_id}: preprocessing failed: {pre.failed}")
        folders[profile.site_id] = pre.out_dir
    return folders
