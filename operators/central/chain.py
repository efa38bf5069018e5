"""The end of a central run: route, trigger the next step's run, or finalize the experiment.

One central run handles one plan step; Airflow DAGs are acyclic, so the experiment is a chain of
runs of the same DAG. :class:`NextStepOperator` triggers the run of step ``n`` (run id
``jipfed__<experiment>__step<nnnn>``, conf ``{"experiment", "step": n}``) with Airflow's own
TriggerDagRunOperator (the standard provider's on Airflow 3, core's on 2); an existing run of
that id is fine (the task is skipped). ``dag.test()`` does not start triggered runs: a test runs
the next step's conf itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment, step_number
from jipfed.operators.central.report import refresh_html_reports, write_report
from jipfed.operators.compat import BaseOperator, Context, TriggerDagRunOperator


def next_run_id(experiment: str, step: int) -> str:
    """Run id of the central run that handles ``step`` (one per experiment and step)."""
    return f"jipfed__{experiment}__step{step:04d}"


def route_after_start(decision: Mapping[str, Any], *, run_step: str, after_step: str) -> list[str]:
    """Branch after the start task: which of ``run_step`` / ``after_step`` the run follows.

    A finished experiment follows neither (the run ends); a step to run follows both (the
    ``after_step`` router waits for the step's tasks); no step left follows ``after_step`` only
    (it finalizes).
    """
    if decision["status"] == "finished":
        return []
    if decision["step"] is None:
        return [after_step]
    return [run_step, after_step]


def route_after_step(decision: Mapping[str, Any], *, next_step: str, finalize: str) -> str:
    """Branch after the step: ``next_step`` while steps remain, else ``finalize``."""
    step = decision["step"]
    if step is not None and step + 1 < decision["n_steps"]:
        return next_step
    return finalize


class NextStepOperator(TriggerDagRunOperator):
    """Trigger the central run of the step after ``step`` (same DAG unless ``trigger_dag_id`` says).

    With ``max_active_runs=1`` on the DAG the new run waits until this one has finished.

    Args:
        experiment: Experiment name (templated).
        step: The step this run handled (templated); the new run handles ``step + 1``.
        trigger_dag_id: DAG to trigger (templated; default: this run's DAG).
        **kwargs: BaseOperator arguments.
    """

    template_fields: Sequence[str] = (*TriggerDagRunOperator.template_fields, "experiment", "step")

    def __init__(
        self, *, experiment: str, step: Any, trigger_dag_id: str = "{{ dag.dag_id }}", **kwargs: Any
    ) -> None:
        super().__init__(
            trigger_dag_id=trigger_dag_id,
            logical_date=None,
            skip_when_already_exists=True,
            **kwargs,
        )
        self.experiment = experiment
        self.step = step

    def execute(self, context: Context) -> Any:
        step = step_number(self.step, self.experiment) + 1
        self.trigger_run_id = next_run_id(self.experiment, step)
        self.conf = {"experiment": self.experiment, "step": step}
        self.log.info(
            "experiment %s: triggering run %s of DAG %s for step %d (an existing run of that id is kept)",
            self.experiment,
            self.trigger_run_id,
            self.trigger_dag_id,
            step,
        )
        return super().execute(context)


class FinalizeOperator(BaseOperator):
    """``rounds.finalize``: publish the final model, card and metrics under ``final/``; write the reports.

    Then asks every site to score the final model (federated evaluation ``final``, answered by the
    sites' ``jipfed_site_requests`` DAG) without waiting: the experiment finishes now, and a later
    RecordMetrics run (of any experiment in the store) collects the summary
    (``evaluation/final/summary.json``) and rewrites the HTML report ``final/report.html``.
    Idempotent: a finished experiment returns its stored model card.

    Args:
        experiment: Experiment name (templated).
        model_store_conn_id: Connection of the model store (templated).
        evaluation_timeout_s: how long the sites may take to score the final model (default the
            experiment's ``round_timeout_s``).
    """

    template_fields: Sequence[str] = ("experiment", "model_store_conn_id")
    ui_color = "#e6ffe6"

    def __init__(
        self,
        *,
        experiment: str,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        evaluation_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.experiment = experiment
        self.model_store_conn_id = model_store_conn_id
        self.evaluation_timeout_s = evaluation_timeout_s

    def execute(self, context: Context) -> dict[str, Any]:
        from jipfed.federation.evaluation import request_final_evaluation
        from jipfed.federation.rounds import FINAL_MODEL, MODEL_CARD, finalize

        exp_store = open_experiment(self.model_store_conn_id, self.experiment)
        card = finalize(exp_store)
        report = write_report(exp_store)
        request = request_final_evaluation(exp_store, self.evaluation_timeout_s)
        self.log.info(
            "experiment %s: sites %s asked to score the final model until %s (evaluation %s)",
            self.experiment,
            list(request.sites),
            request.deadline.isoformat(timespec="seconds"),
            request.id,
        )
        html = refresh_html_reports(exp_store)
        model_key = exp_store.layout.final(f"{FINAL_MODEL}.safetensors")
        self.log.info("experiment %s, rounds:\n%s", self.experiment, report["table"])
        self.log.info(
            "experiment %s finished: final model %s (sha256 %s) in %r; model card %s",
            self.experiment,
            model_key,
            card["model"]["sha256"],
            exp_store.store,
            exp_store.layout.final(MODEL_CARD),
        )
        return {"final_model": model_key, "model_card": card, "report_html": html}
