"""The end of a central run: aggregate the step, open and trigger the next one, or finalize.

One central run handles one plan step; Airflow DAGs are acyclic, so the experiment is a chain of
runs of the same DAG. :class:`CloseStepOperator` aggregates the run's step, dispatches the next
step at once (pushed to push sites, listed for pulling ones: the sites start while the central
moves on) and triggers the central run of that step (run id ``jipfed__<experiment>__step<nnnn>``,
conf ``{"experiment", "step": n}``) with Airflow's own TriggerDagRunOperator (the standard
provider's on Airflow 3, core's on 2); an existing run of that id is kept. After the last step it
finalizes the experiment. ``dag.test()`` does not start triggered runs: a test runs the next
step's conf itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment
from jipfed.operators.central.aggregate import CENTRAL_VARIABLE, AggregateStepOperator
from jipfed.operators.central.dispatch import SITE_CONN_ID_TEMPLATE, SITE_DAG_ID, describe_dispatch, push_step
from jipfed.operators.central.report import refresh_html_reports, write_report
from jipfed.operators.compat import AirflowFailException, AirflowSkipException, Context, TriggerDagRunOperator

from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

#: XCom key of the aggregated step's record (the return value is lost when the next run is triggered).
RECORD_KEY = "step_record"


def next_run_id(experiment: str, step: int) -> str:
    """Run id of the central run that handles ``step`` (one per experiment and step)."""
    return f"jipfed__{experiment}__step{step:04d}"


def run_exists(context: Context, dag_id: str, run_id: str) -> bool:
    """Whether ``dag_id`` has a run ``run_id`` (Airflow 3's task SDK); False where it cannot ask (2.x)."""
    count = getattr(context["ti"], "get_dr_count", None)
    return count is not None and count(dag_id=dag_id, run_ids=[run_id]) > 0


def finalize_experiment(
    exp_store: ExperimentStore, evaluation_timeout_s: float | None = None
) -> dict[str, Any]:
    """``finalize``: publish the final model, card and metrics under ``final/``; write the reports.

    Then asks every site to score the final model (federated evaluation ``final``, answered by the
    sites' ``jipfed_site_requests`` DAG) without waiting: the experiment finishes now, and a later
    RecordMetrics run (of any experiment in the store) collects the summary
    (``evaluation/final/summary.json``) and rewrites the HTML report ``final/report.html``.
    Idempotent: a finished experiment returns its stored model card.
    """
    from jipfed.federation.evaluation import request_final_evaluation
    from jipfed.federation.rounds import FINAL_MODEL, MODEL_CARD, finalize

    name = exp_store.experiment
    card = finalize(exp_store)
    report = write_report(exp_store)
    request = request_final_evaluation(exp_store, evaluation_timeout_s)
    logger.info(
        "experiment %s: sites %s asked to score the final model until %s (evaluation %s)",
        name,
        list(request.sites),
        request.deadline.isoformat(timespec="seconds"),
        request.id,
    )
    html = refresh_html_reports(exp_store)
    model_key = exp_store.layout.final(f"{FINAL_MODEL}.safetensors")
    logger.info("experiment %s, rounds:\n%s", name, report["table"])
    logger.info(
        "experiment %s finished: final model %s (sha256 %s) in %r; model card %s",
        name,
        model_key,
        card["model"]["sha256"],
        exp_store.store,
        exp_store.layout.final(MODEL_CARD),
    )
    return {"final_model": model_key, "model_card": card, "report_html": html}


class CloseStepOperator(AggregateStepOperator, TriggerDagRunOperator):
    """Close the run's step: aggregate (quorum rule), then open and trigger the next step, or finalize.

    Runs once every collect task is done (trigger rule all_done) and reads what ``open_task_id``
    decided (XComs ``experiment``, ``step``, ``decision``):

    * a step ran: :meth:`aggregate_step` (in-process or as the pod, see
      :class:`AggregateStepOperator`; too few valid updates fail the task without retries and leave
      the global model and the experiment state untouched). Steps left: the next step is dispatched
      and pushed to the sites now (idempotent: the next run's open task finds it), and the central
      run of that step is triggered (an existing run of that id is kept). No step left: finalize.
    * no step in this run (all steps aggregated): finalize (idempotent);
    * the experiment is finished: skipped; the open task did not decide (it failed): failed, so
      the run ends failed (this task is the run's only leaf).

    Returns the step's record (XCom key ``step_record`` as well: on Airflow 3 triggering ends the
    task before a return value) or, when it finalizes, ``{"final_model", "model_card", "report_html"}``.

    Args:
        open_task_id: the task that opened the step (its XComs are read).
        site_conn_id_template, site_dag_id: how push sites are reached (see ``push_step``).
        evaluation_timeout_s: how long the sites may take to score the final model (default the
            experiment's ``round_timeout_s``).
        trigger_dag_id: the DAG whose run handles the next step (templated; default this DAG).
    """

    template_fields: Sequence[str] = (
        *AggregateStepOperator.template_fields,
        *TriggerDagRunOperator.template_fields,
        "decision",
        "site_conn_id_template",
        "site_dag_id",
    )
    ui_color = "#e6ffe6"

    def __init__(
        self,
        *,
        open_task_id: str = "open_step",
        site_conn_id_template: str = SITE_CONN_ID_TEMPLATE,
        site_dag_id: str = SITE_DAG_ID,
        evaluation_timeout_s: float | None = None,
        trigger_dag_id: str = "{{ dag.dag_id }}",
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        settings_variable: str = CENTRAL_VARIABLE,
        **kwargs: Any,
    ) -> None:
        def pulled(key: str) -> str:  # a missing XCom renders as None (the DAG renders native objects)
            return f"{{{{ ti.xcom_pull(task_ids='{open_task_id}', key='{key}') }}}}"

        super().__init__(
            experiment=pulled("experiment"),
            step=pulled("step"),
            model_store_conn_id=model_store_conn_id,
            dispatch_next=False,  # this task opens the next step itself, for push sites too
            settings_variable=settings_variable,
            trigger_dag_id=trigger_dag_id,
            logical_date=None,
            skip_when_already_exists=True,
            **kwargs,
        )
        self.decision: Any = pulled("decision")
        self.site_conn_id_template = site_conn_id_template
        self.site_dag_id = site_dag_id
        self.evaluation_timeout_s = evaluation_timeout_s

    def execute(self, context: Context) -> dict[str, Any]:
        decision = self.decision
        if not isinstance(decision, Mapping):  # failed, not skipped: the run must end failed
            raise AirflowFailException(
                "the open task decided nothing (it failed or did not run): see its log"
            )
        if decision["status"] == "finished":
            raise AirflowSkipException(f"experiment {self.experiment} is finished: nothing to close")
        exp_store = open_experiment(self.model_store_conn_id, self.experiment)
        step = decision["step"]
        if step is None:
            return finalize_experiment(exp_store, self.evaluation_timeout_s)
        record = self.aggregate_step(context, step)
        context["ti"].xcom_push(key=RECORD_KEY, value=record)
        if step + 1 >= decision["n_steps"]:
            return finalize_experiment(exp_store, self.evaluation_timeout_s)
        self.open_next(exp_store, step + 1)
        self.trigger_next(context, step + 1)
        return record

    def open_next(self, exp_store: ExperimentStore, step: int) -> None:
        """Dispatch ``step`` and push it to the sites now, unless the experiment moved past it."""
        from jipfed.federation.dispatch import dispatch_step

        if exp_store.load_state().next_step != step:  # a re-run of an older step: nothing to open
            return
        dispatch = dispatch_step(exp_store, step)
        self.log.info("next step %s", describe_dispatch(dispatch))
        push_step(
            exp_store, dispatch, conn_id_template=self.site_conn_id_template, site_dag_id=self.site_dag_id
        )

    def trigger_next(self, context: Context, step: int) -> None:
        """Trigger the central run of ``step`` (on Airflow 3 by raising the task SDK's trigger exception)."""
        self.trigger_run_id = next_run_id(self.experiment, step)
        self.conf = {"experiment": self.experiment, "step": step}
        if run_exists(context, self.trigger_dag_id, self.trigger_run_id):
            self.log.info("run %s of DAG %s exists already: kept", self.trigger_run_id, self.trigger_dag_id)
            return
        self.log.info(
            "experiment %s: triggering run %s of DAG %s for step %d",
            self.experiment,
            self.trigger_run_id,
            self.trigger_dag_id,
            step,
        )
        try:
            TriggerDagRunOperator.execute(self, context)
        except AirflowSkipException:  # Airflow 2: the run exists already
            self.log.info("run %s of DAG %s exists already: kept", self.trigger_run_id, self.trigger_dag_id)
