"""AggregateStepOperator: close the run's step with the quorum rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment, step_number, where
from jipfed.operators.compat import (
    AirflowFailException,
    AirflowSkipException,
    BaseOperator,
    Context,
    TriggerRule,
)

from jipfed.federation.dispatch import dispatch_step
from jipfed.federation.rounds import QuorumNotMet, aggregate_step, load_config
from jipfed.storage.state import ExperimentStore


def step_record(exp_store: ExperimentStore, step: int) -> dict[str, Any]:
    """The stored decision record of a completed step (``aggregate.json`` or a cyclic hop's record)."""
    config, _ = load_config(exp_store)
    ps = config.make_plan().step(step)
    lay = exp_store.layout
    key = lay.aggregate(ps.round) if ps.is_last_in_round else lay.hop_record(ps.round, ps.hop or 0)
    return exp_store.store.get_json(key)


class AggregateStepOperator(BaseOperator):
    """``aggregate_step`` of the run's step once every collect task is done (trigger rule all_done).

    Logs the sites included, rejected and missing with their reasons, and returns the step's
    stored record. Too few valid updates (``QuorumNotMet``) fails the task without retries: the
    global model and the experiment state stay untouched, and clearing the run retries the step
    (after the deadline it is dispatched again as a new attempt). With no step left (the run only
    finalizes) the task is skipped.

    Args:
        experiment: Experiment name (templated).
        step: The step to aggregate (templated; None = no step in this run: skipped).
        model_store_conn_id: Connection of the model store (templated).
    """

    template_fields: Sequence[str] = ("experiment", "step", "model_store_conn_id")

    def __init__(
        self,
        *,
        experiment: str,
        step: Any,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        dispatch_next: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trigger_rule", TriggerRule.ALL_DONE)
        super().__init__(**kwargs)
        self.experiment = experiment
        self.step = step
        self.model_store_conn_id = model_store_conn_id
        self.dispatch_next = dispatch_next

    def execute(self, context: Context) -> dict[str, Any]:
        if self.step is None:
            raise AirflowSkipException("no step to aggregate in this run")
        step = step_number(self.step, self.experiment)
        exp_store = open_experiment(self.model_store_conn_id, self.experiment)
        try:
            aggregate_step(exp_store, step)
        except QuorumNotMet as exc:
            self.log.error("%s", exc)
            raise AirflowFailException(
                f"{exc}. The global model and the experiment state are unchanged; clear this run to retry "
                "the step (after the round timeout it is dispatched again)."
            ) from None
        record = step_record(exp_store, step)
        here = where(self.experiment, step, record["round"])
        self.log.info("%s: included %s", here, record["included"])
        for site, reason in record["rejected"].items():
            self.log.warning("%s: rejected %s: %s", here, site, reason)
        for site, reason in record.get("missing_reasons", {}).items():
            self.log.warning("%s: missing %s: %s", here, site, reason)
        self.log.info("%s: weighted metrics %s (n_samples %s)", here, record["metrics"], record["n_samples"])
        if self.dispatch_next:
            self._dispatch_next(exp_store, step)
        return record

    def _dispatch_next(self, exp_store: ExperimentStore, step: int) -> None:
        """Open the next step for pulling sites now, while this run does its bookkeeping.

        The next central run finds it dispatched (``dispatch_step`` is idempotent) and collects it;
        pulling sites start a few seconds earlier instead of after this run and the next one's
        first tasks. Push sites are triggered by the next run's dispatch tasks as usual.
        """
        config, _ = load_config(exp_store)
        if config.transport != "pull" or step + 1 >= config.make_plan().n_steps:
            return
        if exp_store.load_state().next_step != step + 1:  # a re-run of an older step: nothing to open
            return
        dispatch = dispatch_step(exp_store, step + 1)
        self.log.info(
            "%s: next step dispatched for pulling sites (deadline %s)",
            where(self.experiment, step + 1, dispatch.ticket.round),
            dispatch.deadline.isoformat(),
        )
