"""A site's work for model lines, in the core: answer a census, train a line step, score models.

These are what a site's tasks call given the work's kind (``census``, a training step whose config
carries ``case_selection``, ``evaluate``); :func:`answer_line_work` does all of a site's pending
line work at once over the central store's functions (the central endpoint calls the same ones).
Only counts and scores leave the site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jipfed.federation.evaluation import EvaluationError, evaluate_at_site, pending_evaluations
from jipfed.lines.census import answer_census, pending_census
from jipfed.lines.selection import select_training
from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore
from jipfed.training.config import TrainConfig
from jipfed.training.data import SiteData
from jipfed.training.local import LocalTrainer

if TYPE_CHECKING:
    from jipfed.central.client import CentralClient
    from jipfed.imaging.pacs import PacsConfig
    from jipfed.tasks.identity import SiteIdentity

logger = logging.getLogger(__name__)


def apply_case_selection(
    trainer: LocalTrainer, data_root: Path | str, config: Mapping[str, Any], site: str
) -> dict[str, int] | None:
    """Restrict ``trainer`` to the cases the experiment's ``case_selection`` names for ``site``.

    Returns the counts (``new_cases``, ``replay_cases``), or None when the experiment selects
    nothing (a plain experiment: the whole training split).
    """
    chosen = dict(config.get("case_selection") or {}).get(site)
    if not chosen:
        return None
    records, counts = select_training(data_root, trainer.train_records, chosen)
    if not records:
        raise ValueError(f"line {chosen.get('line')!r}: site {site} has no case to train on in this run")
    trainer.train_records = records
    return counts


@dataclass
class LineSite:
    """One site's line work: its id, data folder (ledger) and prepared cases."""

    site: str
    data_root: Path
    data: SiteData
    trained: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, store: ModelStore, now: datetime | None = None) -> int:
        """Answer every pending census, training step and evaluation; returns how many."""
        done = 0
        for request in pending_census(store, self.site, now):
            answer_census(store, request, self.site, self.data_root, [r.case_key for r in self.data.records])
            done += 1
        done += self._train(store, now)
        for request in pending_evaluations(store, self.site, now):
            train = TrainConfig.from_dict(
                ExperimentStore(store, request.body["experiment"]).load_config()["train"]
            )
            try:
                evaluate_at_site(store, request, self.site, LocalTrainer(train, self.data, device="cpu"))
            except EvaluationError as exc:
                logger.warning("site %s: evaluation %s failed: %s", self.site, request.id, exc)
            done += 1
        return done

    def _train(self, store: ModelStore, now: datetime | None) -> int:
        from jipfed.federation.dispatch import accept_in_time, model_for_site, pending_work, report_cohort
        from jipfed.federation.site_round import run_site_step

        done = 0
        for item in pending_work(store, self.site, now):
            ticket = item.ticket
            exp_store = ExperimentStore(store, ticket.experiment)
            trainer = LocalTrainer(TrainConfig.from_dict(item.config["train"]), self.data, device="cpu")
            counts = apply_case_selection(trainer, self.data_root, item.config, self.site)
            report_cohort(exp_store, self.site, ticket.round, ticket.step, len(trainer.train_records))
            payload, manifest = model_for_site(exp_store, self.site, ticket.round, ticket.step)
            encoded = run_site_step(
                ticket, payload, manifest, trainer, self.site, ticket.experiment, ticket.config_hash
            )
            accept_in_time(exp_store, self.site, ticket.round, encoded.payload, encoded.manifest.to_json())
            self.trained.append(
                {"experiment": ticket.experiment, "cases": len(trainer.train_records), **(counts or {})}
            )
            done += 1
        return done


def answer_over_http(
    client: CentralClient,
    site: str,
    data_root: Path | str,
    data: SiteData,
    *,
    case_keys: list[str] | None = None,
) -> dict[str, int]:
    """What a site's task does through the central endpoint: answer its open census and evaluation requests.

    ``case_keys`` are the site's current cases for the census (default: those of ``data``; pass the
    cohort's keys when not every case is prepared yet). A request the site cannot answer is
    reported as failed with the reason (sanitised by the client); the others go on. Returns how
    many requests of each kind were answered.
    """
    from jipfed.central.client import CentralError
    from jipfed.federation.evaluation import decode_model, score_models
    from jipfed.federation.site_requests import SiteRequest
    from jipfed.lines.census import site_counts

    done = {"census": 0, "evaluate": 0}
    pending = client.pending_requests()
    keys = case_keys if case_keys is not None else [r.case_key for r in data.records]
    for item in pending.get("census", []):
        request = SiteRequest.from_dict(item)
        try:
            client.answer_request("census", request.id, site_counts(request, site, data_root, keys))
            done["census"] += 1
        except (OSError, ValueError) as exc:
            client.report_request_failure("census", request.id, str(exc))
    for item in pending.get("evaluate", []):
        request = SiteRequest.from_dict(item)
        try:
            trainer = LocalTrainer(TrainConfig.from_dict(request.body["train"]), data, device="cpu")
            shared = {n: t for n, t in trainer.get_weights().items() if n in trainer.shared_names}
            models = {
                label: decode_model(request, label, *client.get_evaluation_model(request.id, label), shared)
                for label in request.body["models"]
            }
            client.answer_request("evaluate", request.id, score_models(trainer, models))
            done["evaluate"] += 1
        except (EvaluationError, ValueError, CentralError) as exc:
            logger.warning("site %s: evaluation %s failed: %s", site, request.id, exc)
            client.report_request_failure("evaluate", request.id, str(exc))
    return done


def answer_site_requests(client: CentralClient, identity: SiteIdentity, pacs: PacsConfig) -> dict[str, int]:
    """A site's requests task: prepare its data (cached) when a request is open, then answer them all.

    The data is the identity's default dataset prepared as the site DAG does (cohort → fetch →
    convert → preprocess, every stage cached in ``data_root``). When no case is ready every open
    request is reported as failed with the reason; a PACS that cannot be queried raises PacsError
    (nothing reported: a retry may still answer before the deadline). Returns the counts of
    :func:`answer_over_http` (zeros when nothing was open).
    """
    from jipfed.imaging.pipeline import SiteDataConfig, prepare_site

    pending = client.pending_requests()
    if not any(pending.values()):
        return {"census": 0, "evaluate": 0}
    cfg = SiteDataConfig(
        site_id=identity.site_id,
        pacs=pacs,
        data_root=identity.data_root,
        dataset=str(identity.default_dataset),
        transport=identity.fetch_transport,
        preprocess=identity.preprocess,
    )
    report = prepare_site(cfg, progress=False)
    try:
        if not report.ready_cases:
            raise ValueError(f"no case of dataset {cfg.dataset!r} is ready (see the site's prepare report)")
        data = SiteData.from_dir(report.preprocessed_dir, group=identity.site_id)
    except ValueError as exc:
        for kind, items in pending.items():
            for item in items:
                client.report_request_failure(kind, str(item.get("id")), f"site data not ready: {exc}")
        raise
    return answer_over_http(client, identity.site_id, identity.data_root, data)
