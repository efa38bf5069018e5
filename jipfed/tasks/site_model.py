"""The site's model steps: get the global model → train locally → upload the update.

Each function returns what the operator returns as XCom: the path of the file it wrote, or (upload)
the manifest the central accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jipfed.central.client import CentralClient, CentralError, CentralRefused
from jipfed.tasks.errors import TaskError, TaskFailed
from jipfed.tasks.run import SiteRun, read_json, write_json
from jipfed.tasks.site_data import PREPARED_FILE

if TYPE_CHECKING:
    from jipfed.federation.rounds import StepTicket

log = logging.getLogger(__name__)

MODEL_PAYLOAD = "model.safetensors"
MODEL_MANIFEST = "model.json"
UPDATE_PAYLOAD = "update.safetensors"
UPDATE_MANIFEST = "update.json"
#: Written by the training beside the update: how many cases it trained and held out (a count).
TRAINED_CASES = "trained-cases.json"
#: Folder below ``data_root`` with what a site keeps between rounds (never sent to the central).
SITE_STATE_DIR = "site-state"


def get_global_model(run: SiteRun, client: CentralClient) -> str:
    """Download the model the work item's ticket names, check its sha256; write it and its manifest.

    Returns the path of ``model.safetensors``.
    """
    ticket = run.require_work().ticket
    try:
        payload, manifest = client.get_model(ticket.experiment, ticket.round, ticket.step)
    except CentralError as exc:
        raise TaskError(f"{run.where}: cannot get the global model: {exc}") from exc
    digest = hashlib.sha256(payload).hexdigest()
    if digest != ticket.model_sha256:
        raise TaskFailed(
            f"{run.where}: the model received has sha256 {digest}, the ticket names "
            f"{ticket.model_sha256}; refusing to train on it"
        )
    path = run.out_dir / MODEL_PAYLOAD
    path.write_bytes(payload)
    write_json(run.out_dir / MODEL_MANIFEST, manifest)
    log.info("%s: global model %s (%d bytes, sha256 %s)", run.where, ticket.model_key, len(payload), digest)
    return str(path)


def train_local(run: SiteRun, model_dir: Path, *, evaluate: bool = True) -> str:
    """Train this site's part of the step on the prepared cases; write the encoded update.

    Reads ``prepared.json`` from the in dir and the model from ``model_dir``; trains with the
    experiment's ``train`` config via ``run_site_step``; writes ``update.safetensors`` and
    ``update.json`` (manifest: aggregate numbers only). Returns the path of ``update.json``.
    """
    from jipfed.federation.experiment import ExperimentConfig
    from jipfed.federation.site_round import SiteStepError, run_site_step
    from jipfed.lines.site import apply_case_selection
    from jipfed.training.data import SiteData
    from jipfed.training.local import LocalTrainer

    work = run.require_work()
    ticket = work.ticket
    prepared = read_json(run.input_path(PREPARED_FILE), f"{run.where}: {PREPARED_FILE}")
    if not (model_dir / MODEL_PAYLOAD).is_file():
        raise TaskFailed(f"{run.where}: no model in {model_dir}: did the model task run?")
    payload = (model_dir / MODEL_PAYLOAD).read_bytes()
    manifest = read_json(model_dir / MODEL_MANIFEST, f"{run.where}: {MODEL_MANIFEST}")
    try:
        config = ExperimentConfig.from_dict(work.config)
        data = SiteData.from_dir(prepared["preprocessed_dir"], group=run.identity.site_id)
        trainer = LocalTrainer(config.train, data, device=run.identity.device)
        selected = apply_case_selection(trainer, run.identity.data_root, work.config, run.identity.site_id)
    except ValueError as exc:
        raise TaskFailed(f"{run.where}: cannot set up local training: {exc}") from exc
    log.info(
        "%s: training %s/%s/%s on %d case(s) (%d train / %d held out), local work %s",
        run.where,
        config.train.task,
        config.train.model,
        config.train.size,
        len(data),
        len(trainer.train_records),
        len(trainer.val_records),
        dict(ticket.local_work.get(run.identity.site_id, {})),
    )
    state_path = site_state_path(run)
    restore_site_state(trainer, state_path, where=run.where)
    started = time.perf_counter()
    try:
        encoded = run_site_step(
            ticket,
            payload,
            manifest,
            trainer,
            run.identity.site_id,
            ticket.experiment,
            ticket.config_hash,  # /v1/work sends the site's view of the config, not the whole one
            evaluate=evaluate,
        )
    except SiteStepError as exc:
        raise TaskFailed(f"{run.where}: {exc}") from exc
    if selected:  # a model line's step: how many new and replayed cases it trained on (counts only)
        metrics = {**encoded.manifest.metrics, **{k: float(v) for k, v in selected.items()}}
        encoded = replace(encoded, manifest=encoded.manifest.replace(metrics=metrics))
    keep_site_state(trainer, state_path)
    (run.out_dir / UPDATE_PAYLOAD).write_bytes(encoded.payload)
    write_json(run.out_dir / TRAINED_CASES, {"n_cases": len(data)})
    path = run.out_dir / UPDATE_MANIFEST
    path.write_text(encoded.manifest.to_json())
    log.info(
        "%s: trained in %.1f s; update %d bytes, metrics %s",
        run.where,
        time.perf_counter() - started,
        len(encoded.payload),
        json.dumps(dict(encoded.manifest.metrics)),
    )
    return str(path)


def site_state_path(run: SiteRun) -> Path:
    """Where this site keeps its state of the run's experiment between rounds (in ``data_root``)."""
    experiment = run.require_work().ticket.experiment
    return Path(run.identity.data_root) / SITE_STATE_DIR / f"{experiment}.safetensors"


def restore_site_state(trainer: Any, path: Path, *, where: str) -> None:
    """Give ``trainer`` what the site kept from its last round (SCAFFOLD's control, FedDyn's
    gradient, FedBN-style local parameters); nothing to do in the first round or for FedAvg."""
    if not path.is_file():
        return
    from safetensors.torch import load_file

    try:
        trainer.load_site_state(load_file(str(path)))
    except (OSError, ValueError, RuntimeError) as exc:
        raise TaskFailed(f"{where}: the site state kept from the last round does not fit: {exc}") from exc
    log.info("%s: restored the site state of the last round (%s)", where, path.name)


def keep_site_state(trainer: Any, path: Path) -> None:
    """Write ``trainer.site_state()`` atomically for the next round (skipped when it is empty)."""
    state = trainer.site_state()
    if not state:
        return
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def upload_update(
    client: CentralClient, ticket: StepTicket, payload: bytes, manifest_json: str, *, where: str
) -> dict[str, Any]:
    """PUT the update for ``ticket``'s round (signed when the client has a key); returns the
    manifest the central accepted.

    Raises:
        TaskFailed: the central refused it (409; the message holds code and reason).
        TaskError: the upload failed otherwise (retryable).
    """
    try:
        return client.put_update(ticket.experiment, ticket.round, payload, manifest_json, step=ticket.step)
    except CentralRefused as exc:
        if exc.code == "duplicate":  # an earlier try of this task delivered it (write-once at the central)
            log.warning("%s: the central already holds this round's update: %s", where, exc.detail)
            return json.loads(manifest_json)
        raise TaskFailed(f"{where}: the central refused the update ({exc.code}): {exc.detail}") from exc
    except CentralError as exc:
        raise TaskError(f"{where}: upload failed: {exc}") from exc


def report_cohort(client: CentralClient, ticket: StepTicket, cases_path: Path, *, where: str) -> None:
    """Tell the central how many cases this site trained on (it bounds the update's ``n_samples``)."""
    n_cases = read_json(cases_path, f"{where}: {TRAINED_CASES}")["n_cases"]
    try:
        client.report_cohort(ticket.experiment, ticket.round, ticket.step, int(n_cases))
    except CentralRefused as exc:
        raise TaskFailed(
            f"{where}: the central refused the cohort report ({exc.code}): {exc.detail}"
        ) from exc
    except CentralError as exc:
        raise TaskError(f"{where}: cohort report failed: {exc}") from exc


def upload(run: SiteRun, client: CentralClient) -> dict[str, Any]:
    """Upload the update in the in dir to the central; returns the manifest the central accepted.

    In a secure-aggregation experiment the update never leaves the site: it is masked and the
    masked vector uploaded (:func:`secure_upload`).
    """
    ticket = run.require_work().ticket
    payload_path = run.input_path(UPDATE_PAYLOAD)
    manifest_path = run.input_path(UPDATE_MANIFEST)
    if not payload_path.is_file() or not manifest_path.is_file():
        raise TaskFailed(f"{run.where}: no update in {payload_path.parent}: did training run?")
    if (run.require_work().config.get("privacy") or {}).get("secure_aggregation"):
        return secure_upload(run, client, payload_path.read_bytes(), manifest_path.read_text())
    report_cohort(client, ticket, run.input_path(TRAINED_CASES), where=run.where)
    accepted = upload_update(
        client, ticket, payload_path.read_bytes(), manifest_path.read_text(), where=run.where
    )
    log.info("%s: update accepted by the central (sha256 %s)", run.where, accepted.get("sha256"))
    return accepted


def secure_upload(run: SiteRun, client: CentralClient, payload: bytes, manifest_json: str) -> dict[str, Any]:
    """Secure aggregation (:mod:`jipfed.privacy.secagg_site`): post a key, wait for the peers' keys
    (until the step's deadline), upload the masked update, re-mask when a peer drops out.

    No cohort report: the sample count stays hidden in the masked sum. With client-level DP the
    update is clipped and noised here (:mod:`jipfed.privacy.secure_dp`). Returns the central's status
    of the complete attempt.
    """
    from jipfed.federation.experiment import ExperimentConfig
    from jipfed.privacy.secagg_site import SecAggSiteError, site_update
    from jipfed.privacy.secagg_site import secure_upload as run_secure_upload
    from jipfed.privacy.secagg_wire import settings_of
    from jipfed.privacy.secure_dp import noise_share

    work = run.require_work()
    ticket = work.ticket
    settings = settings_of(work.config["privacy"])
    assert settings is not None  # the caller checked
    try:
        config = ExperimentConfig.from_dict(work.config)
        update = site_update(payload, manifest_json, config.max_site_samples, noise_share(config))
        return run_secure_upload(
            client,
            experiment=ticket.experiment,
            round=ticket.round,
            step=ticket.step,
            site=run.identity.site_id,
            config_hash=ticket.config_hash,
            update=update,
            settings=settings,
            deadline=work.dispatch.deadline,
            key_dir=run.out_dir / "secagg-keys",
        )
    except SecAggSiteError as exc:
        raise TaskFailed(f"{run.where}: {exc}") from exc
    except CentralRefused as exc:
        raise TaskFailed(f"{run.where}: the central refused ({exc.code}): {exc.detail}") from exc
    except CentralError as exc:
        raise TaskError(f"{run.where}: secure aggregation failed: {exc}") from exc
