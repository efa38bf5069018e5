"""Model tasks of the site DAG: get the global model → train locally → upload the update.

Each runs one function of :mod:`jipfed.tasks.site_model`, in this process or (pod mode, see
``jipfed.tasks.execution``) as ``jipfed task <step>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jipfed.operators.compat import BaseOperator, Context
from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.site.base import SiteOperator, SiteRun

from jipfed.tasks import env, site_model
from jipfed.tasks.site_model import MODEL_MANIFEST, MODEL_PAYLOAD, UPDATE_MANIFEST, UPDATE_PAYLOAD

if TYPE_CHECKING:
    from jipfed.central.client import CentralClient

__all__ = [
    "MODEL_MANIFEST",
    "MODEL_PAYLOAD",
    "UPDATE_MANIFEST",
    "UPDATE_PAYLOAD",
    "GetGlobalModelOperator",
    "TrainLocalOperator",
    "UploadUpdateOperator",
]


def central(run: SiteRun) -> CentralClient:
    """The central endpoint's client from the identity's Connection."""
    return CentralHook(run.identity.central_conn_id).get_conn()


class GetGlobalModelOperator(SiteOperator):
    """Download the model the work item's ticket names; check its sha256 against the ticket.

    Writes ``model.safetensors`` and ``model.json`` (its manifest) to the out dir.
    Returns (XCom): the path of ``model.safetensors``.
    """

    step = "model"
    connections = ("central",)

    def execute(self, context: Context) -> str:
        return self.run_step(context, lambda run: site_model.get_global_model(run, central(run)))


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

    step = "train"

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

    def step_env(self, run: SiteRun) -> dict[str, str]:
        return {env.MODEL_IN_DIR: self.model_in_dir, env.EVALUATE: "1" if self.evaluate else "0"}

    def execute(self, context: Context) -> str:
        return self.run_step(
            context,
            lambda run: site_model.train_local(run, run.run_dir / self.model_in_dir, evaluate=self.evaluate),
        )


class UploadUpdateOperator(SiteOperator):
    """Upload the update in ``operator_in_dir`` to the central.

    A refusal (HTTP 409: late, duplicate, rejected, ...) fails the task without retries, with the
    refusal code and the central's reason. Returns (XCom): the manifest the central accepted.
    """

    step = "upload"
    connections = ("central",)

    def execute(self, context: Context) -> dict[str, Any]:
        return self.run_step(context, lambda run: site_model.upload(run, central(run)))
