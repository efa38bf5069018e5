"""CollectUpdateSensor: wait until one site answered the dispatched step (or its deadline passed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from jipfed.operators.central._common import (
    DEFAULT_STORE_CONN_ID,
    open_experiment,
    step_dispatch,
    step_number,
    where,
)
from jipfed.operators.compat import (
    AirflowException,
    AirflowSkipException,
    BaseSensorOperator,
    Context,
    PokeReturnValue,
)
from jipfed.operators.triggers.site_update import ERROR, SiteUpdateTrigger

from jipfed.storage.state import ExperimentStore

if TYPE_CHECKING:  # the federation modules import torch: only at run time
    from jipfed.federation.dispatch import Dispatch


def default_poll_interval(timeout_s: float) -> float:
    """Seconds between checks of the store: 1 s up to a 10-minute round timeout, at most 5 s.

    A delivery is noticed within one interval, and every round waits for it: short intervals
    keep the rounds' orchestration overhead small (a check is three small store reads).
    """
    return min(5.0, max(1.0, timeout_s / 600.0))


class CollectUpdateSensor(BaseSensorOperator):
    """Wait until ``site`` delivered its update for the step, reported a failure, or timed out.

    Deferrable (default): after one immediate check the wait moves to the triggerer
    (:class:`SiteUpdateTrigger`); no worker slot is held. Otherwise the sensor pokes in the
    worker (``mode="poke"`` or ``"reschedule"`` as usual). Outcomes:

    * delivered → success, returns the event ``{"status", "detail", ...}``;
    * failed (the site reported why) → logged and skipped: the grid shows the site skipped;
    * timed out → the timeout is recorded in the store (``record_timeout``), logged and skipped.

    The aggregate task after the sensors decides with the quorum.

    Args:
        experiment: Experiment name (templated).
        step: The dispatched step (templated).
        site: The site id (templated; mapped).
        model_store_conn_id: Connection of the model store (templated); the triggerer resolves it.
        deferrable: Wait in the triggerer (True) or in the worker.
        poll_interval_s: Seconds between checks; None = :func:`default_poll_interval` of the
            round timeout.
    """

    template_fields: Sequence[str] = ("experiment", "step", "site", "model_store_conn_id")
    ui_color = "#fff4e0"

    def __init__(
        self,
        *,
        experiment: str,
        step: Any,
        site: str,
        model_store_conn_id: str = DEFAULT_STORE_CONN_ID,
        deferrable: bool = True,
        poll_interval_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if poll_interval_s is not None and not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0 or None, got {poll_interval_s!r}")
        self.experiment = experiment
        self.step = step
        self.site = site
        self.model_store_conn_id = model_store_conn_id
        self.deferrable = deferrable
        self.poll_interval_s = poll_interval_s

    @cached_property
    def exp_store(self) -> ExperimentStore:
        return open_experiment(self.model_store_conn_id, self.experiment)

    def _dispatch(self) -> Dispatch:
        return step_dispatch(self.exp_store, step_number(self.step, self.experiment))

    def _event(self, dispatch: Dispatch, status: str, detail: str) -> dict[str, Any]:
        ticket = dispatch.ticket
        return {
            "status": status,
            "detail": detail,
            "experiment": self.experiment,
            "site": self.site,
            "round": ticket.round,
            "step": ticket.step,
        }

    def execute(self, context: Context) -> dict[str, Any]:
        from jipfed.federation.dispatch import WAITING, site_status

        dispatch = self._dispatch()
        ticket = dispatch.ticket
        if self.site not in ticket.sites:
            raise AirflowException(
                f"{where(self.experiment, ticket.step, ticket.round, self.site)}: the site is not selected "
                f"({list(ticket.sites)})"
            )
        interval = self.poll_interval_s or default_poll_interval(ticket.timeout_s)
        status, detail = site_status(self.exp_store, dispatch, self.site)
        if status != WAITING:
            return self._finish(self._event(dispatch, status, detail))
        self.log.info(
            "%s: waiting for the update (%s), checking every %.0f s",
            where(self.experiment, ticket.step, ticket.round, self.site),
            detail,
            interval,
        )
        if self.deferrable:
            self.defer(
                trigger=SiteUpdateTrigger(
                    experiment=self.experiment,
                    site=self.site,
                    round=ticket.round,
                    step=ticket.step,
                    model_store_conn_id=self.model_store_conn_id,
                    poll_interval_s=interval,
                ),
                method_name="execute_complete",
            )
        self.poke_interval = interval
        return self._finish(super().execute(context))

    def poke(self, context: Context) -> PokeReturnValue:
        from jipfed.federation.dispatch import WAITING, site_status

        dispatch = self._dispatch()
        status, detail = site_status(self.exp_store, dispatch, self.site)
        return PokeReturnValue(is_done=status != WAITING, xcom_value=self._event(dispatch, status, detail))

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Called with the trigger's event when the site is no longer waiting (not after a delivery:
        that event ends the task in the triggerer, except in ``dag.test()``, which resumes the task
        with the end event's state instead of its payload: then the store is asked again)."""
        if isinstance(event, Mapping):
            return self._finish(event)
        answer = self.poke(context)
        if not answer.is_done:
            raise AirflowException(
                f"{where(self.experiment, site=self.site)}: trigger sent {event!r}, but the site is still waiting"
            )
        return self._finish(answer.xcom_value)

    def _finish(self, event: Mapping[str, Any]) -> dict[str, Any]:
        from jipfed.federation.dispatch import DELIVERED, FAILED, TIMED_OUT, record_timeout

        status, detail = event["status"], str(event["detail"])
        here = where(self.experiment, event["step"], event["round"], self.site)
        if status == DELIVERED:
            self.log.info("%s: update delivered", here)
            return dict(event)
        if status == FAILED:
            self.log.warning("%s: the site sends no update: %s", here, detail)
            raise AirflowSkipException(f"{here}: the site sends no update: {detail}")
        if status == TIMED_OUT:
            record = record_timeout(self.exp_store, self._dispatch(), self.site)
            self.log.warning("%s: %s", here, record["reason"])
            raise AirflowSkipException(f"{here}: {record['reason']}")
        if status == ERROR:
            raise AirflowException(f"{here}: could not read the site's status from the model store: {detail}")
        raise AirflowException(f"{here}: unexpected collect status {status!r} ({detail})")
