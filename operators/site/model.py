"""Model tasks of the site DAG: get the global model → train locally → upload the update."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import AirflowException, AirflowFailException, BaseOperator, Context
from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.site.base import SiteOperator, read_json, write_json
from jipfed.operators.site.data import PREPARED_FILE

from jipfed.central.client import CentralClient, CentralError, CentralRefused

if TYPE_CHECKING:
    from jipfed.federation.rounds import StepTicket

MODEL_PAYLOAD = "model.safetensors"
MODEL_MANIFEST = "model.json"
UPDATE_PAYLOAD = "update.safetensors"
UPDATE_MANIFEST = "update.json"


class GetGlobalModelOperator(SiteOperator):
    """Download the model the work item's ticket names; check its sha256 against the ticket.

    Writes ``model.safetensors`` and ``model.json`` (its manifest) to the out dir.
    Returns (XCom): the path of ``model.safetensors``.
    """

    def execute(self, context: Context) -> str:
        run = self.site_run(context)
        ticket = run.require_work().ticket
        try:
            payload, manifest = (
                CentralHook(run.identity.central_conn_id)
                .get_conn()
                .get_model(ticket.experiment, ticket.round, ticket.step)
            )
        except CentralError as exc:
            raise AirflowException(f"{run.where}: cannot get the global model: {exc}") from exc
        digest = hashlib.sha256(payload).hexdigest()
        if digest != ticket.model_sha256:
            raise AirflowFailException(
                f"{run.where}: the model received has sha256 {digest}, the ticket names "
                f"{ticket.model_sha256}; refusing to train on it"
            )
        path = run.out_dir / MODEL_PAYLOAD
        path.write_bytes(payload)
        write_json(run.out_dir / MODEL_MANIFEST, manifest)
        self.log.info(
            "%s: global model %s (%d bytes, sha256 %s)", run.where, ticket.model_key, len(payload), digest
        )
        return str(path)


class TrainLocalOperator(SiteOperator):
    """Train this site's part of the step on the prepared cases; write the encoded update.

    Reads ``prepared.json`` from ``operator_in_dir`` (the preprocess task's out dir) and the model
    from ``model_in_dir`` (the model task's out dir); trains with the experiment's ``train``
    config (``LocalTrainer``) via ``run_site_step``; writes ``update.safetensors`` and
    ``update.json`` (manifest: aggregate numbers only).

    Args:
        model_operator: the task that downloaded the model (its ``operator_out_dir`` is read).
        model_in_dir: folder name of the model below the run folder (overrides ``model_operator``).
        evaluate: also score the trained model on the site's held-out cases (``val_*`` metrics).

    Returns (XCom): the path of ``update.json``.
    """

    def __init__(
        self,
        *,
        model_operator: BaseOperator | None = None,
        model_in_dir: str | None = None,
        evaluate: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if model_in_dir is None and model_operator is not None:
            model_in_dir = getattr(model_operator, "operator_out_dir", None) or model_operator.task_id
        if not model_in_dir:
            raise ValueError(f"task {self.task_id!r}: give model_operator or model_in_dir")
        self.model_in_dir = model_in_dir
        self.evaluate = evaluate

    def execute(self, context: Context) -> str:
        from jipfed.federation.experiment import ExperimentConfig
        from jipfed.federation.site_round import SiteStepError, run_site_step
        from jipfed.storage.state import config_hash_of
        from jipfed.training.data import SiteData
        from jipfed.training.local import LocalTrainer

        run = self.site_run(context)
        work = run.require_work()
        ticket = work.ticket
        prepared = read_json(self.input_path(run, PREPARED_FILE), f"{run.where}: {PREPARED_FILE}")
        model_dir = run.run_dir / self.model_in_dir
        if not (model_dir / MODEL_PAYLOAD).is_file():
            raise AirflowFailException(f"{run.where}: no model in {model_dir}: did the model task run?")
        payload = (model_dir / MODEL_PAYLOAD).read_bytes()
        manifest = read_json(model_dir / MODEL_MANIFEST, f"{run.where}: {MODEL_MANIFEST}")
        try:
            config = ExperimentConfig.from_dict(work.config)
            data = SiteData.from_dir(prepared["preprocessed_dir"], group=run.identity.site_id)
            trainer = LocalTrainer(config.train, data, device=run.identity.device)
        except ValueError as exc:
            raise AirflowFailException(f"{run.where}: cannot set up local training: {exc}") from exc
        self.log.info(
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
        started = time.perf_counter()
        try:
            encoded = run_site_step(
                ticket,
                payload,
                manifest,
                trainer,
                run.identity.site_id,
                ticket.experiment,
                config_hash_of(work.config),
                evaluate=self.evaluate,
            )
        except SiteStepError as exc:
            raise AirflowFailException(f"{run.where}: {exc}") from exc
        (run.out_dir / UPDATE_PAYLOAD).write_bytes(encoded.payload)
        path = run.out_dir / UPDATE_MANIFEST
        path.write_text(encoded.manifest.to_json())
        self.log.info(
            "%s: trained in %.1f s; update %d bytes, metrics %s",
            run.where,
            time.perf_counter() - started,
            len(encoded.payload),
            json.dumps(dict(encoded.manifest.metrics)),
        )
        return str(path)


def upload_update(
    client: CentralClient, ticket: StepTicket, payload: bytes, manifest_json: str, *, where: str
) -> dict[str, Any]:
    """PUT the update for ``ticket``'s round; returns the manifest the central accepted.

    Raises:
        AirflowFailException: the central refused it (409; the message holds code and reason).
        AirflowException: the upload failed otherwise (retryable).
    """
    try:
        return client.put_update(ticket.experiment, ticket.round, payload, manifest_json)
    except CentralRefused as exc:
        if exc.code == "duplicate":  # an earlier try of this task delivered it (write-once at the central)
            logging.getLogger(__name__).warning(
                "%s: the central already holds this round's update: %s", where, exc.detail
            )
            return json.loads(manifest_json)
        raise AirflowFailException(
            f"{where}: the central refused the update ({exc.code}): {exc.detail}"
        ) from exc
    except CentralError as exc:
        raise AirflowException(f"{where}: upload failed: {exc}") from exc


class UploadUpdateOperator(SiteOperator):
    """Upload the update in ``operator_in_dir`` to the central.

    A refusal (HTTP 409: late, duplicate, rejected, ...) fails the task without retries, with the
    refusal code and the central's reason. Returns (XCom): the manifest the central accepted.
    """

    def execute(self, context: Context) -> dict[str, Any]:
        run = self.site_run(context)
        ticket = run.require_work().ticket
        payload_path = self.input_path(run, UPDATE_PAYLOAD)
        manifest_path = self.input_path(run, UPDATE_MANIFEST)
        if not payload_path.is_file() or not manifest_path.is_file():
            raise AirflowFailException(f"{run.where}: no update in {payload_path.parent}: did training run?")
        client = CentralHook(run.identity.central_conn_id).get_conn()
        accepted = upload_update(
            client, ticket, payload_path.read_bytes(), manifest_path.read_text(), where=run.where
        )
        self.log.info("%s: update accepted by the central (sha256 %s)", run.where, accepted.get("sha256"))
        return accepted
