"""SiteUpdateTrigger: wait in the triggerer until a site delivered, failed or timed out in a step.

Store access: the trigger carries the model store's *Connection id* and opens the store inside the
triggerer (``ModelStoreHook``), so no credentials travel in the trigger's kwargs. On Airflow 3 the
triggerer serves Connections to triggers through its supervisor; sync SDK calls are allowed from
a worker thread, which is where every store call runs here (``asyncio.to_thread``: the S3 client
and the local folder store block). tests/airflow/test_central_dag.py checks this against a real
``airflow standalone`` triggerer with the Connection stored in Airflow's database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from jipfed.operators.compat import BaseTrigger, TaskSuccessEvent, TriggerEvent
from jipfed.operators.hooks import ModelStoreHook

from jipfed.storage.base import ModelStore
from jipfed.storage.state import ExperimentStore

#: Event status when the trigger could not read the store (the sensor fails with the detail).
ERROR = "error"


def site_outcome(store: ModelStore, experiment: str, site: str, round_: int, step: int) -> tuple[str, str]:
    """``(status, detail)`` of ``site`` in the step's current dispatch (see ``site_status``).

    Raises:
        ValueError: the step has no dispatch record.
    """
    from jipfed.federation.dispatch import load_dispatch, site_status

    exp_store = ExperimentStore(store, experiment)
    dispatch = load_dispatch(exp_store, round_, step)
    if dispatch is None:
        raise ValueError(
            f"experiment {experiment!r}, round {round_}, step {step}: the step was not dispatched"
        )
    return site_status(exp_store, dispatch, site)


class SiteUpdateTrigger(BaseTrigger):
    """Poll the store until ``site`` is no longer waiting in the step; yield one event.

    A full check (:func:`site_outcome`: dispatch, update, failure report, deadline) every
    ``poll_interval_s``; between two, a look for the site's update manifest every
    ``dispatch.change_check_interval`` (0.1 s on a local folder: one stat; 1 s on S3), which
    starts a full check at once: a delivery is seen within that, not within the poll interval.

    Delivered: a ``TaskSuccessEvent`` with that payload as the task's XCom, so the task ends here in
    the triggerer (no worker start on the round's critical path). Otherwise a ``TriggerEvent``
    with payload ``{"status": "failed" | "timed_out" | "error", "detail", "experiment", "site",
    "round", "step"}``, which the sensor handles in a worker (skip, record the timeout, fail).

    Args:
        experiment, site, round, step: which site in which step.
        model_store_conn_id: Connection of the model store, resolved in the triggerer.
        poll_interval_s: seconds between full checks.
    """

    def __init__(
        self,
        *,
        experiment: str,
        site: str,
        round: int,
        step: int,
        model_store_conn_id: str,
        poll_interval_s: float = 10.0,
    ) -> None:
        super().__init__()
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s!r}")
        self.experiment = experiment
        self.site = site
        self.round = round
        self.step = step
        self.model_store_conn_id = model_store_conn_id
        self.poll_interval_s = float(poll_interval_s)
        self._store: ModelStore | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "experiment": self.experiment,
                "site": self.site,
                "round": self.round,
                "step": self.step,
                "model_store_conn_id": self.model_store_conn_id,
                "poll_interval_s": self.poll_interval_s,
            },
        )

    def _check(self) -> tuple[str, str]:
        """One blocking check (runs in a worker thread)."""
        if self._store is None:
            self._store = ModelStoreHook(self.model_store_conn_id).get_conn()
        return site_outcome(self._store, self.experiment, self.site, self.round, self.step)

    def _delivered(self) -> bool:
        """Whether the site's update manifest is in the store (one stat or HEAD); True on a store
        error, so that the full check runs and reports it."""
        assert self._store is not None, "after the first full check"
        key = ExperimentStore(self._store, self.experiment).layout.update_manifest(self.round, self.site)
        try:
            return self._store.exists(key)
        except Exception:
            return True

    async def _sleep_until_delivered(self, seconds: float) -> None:
        """Sleep up to ``seconds``; return early once :meth:`_delivered`."""
        from jipfed.federation.dispatch import change_check_interval

        assert self._store is not None, "after the first full check"
        look_s = change_check_interval(self._store)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(look_s, left))
            if await asyncio.to_thread(self._delivered):
                return

    def _event(self, status: str, detail: str) -> TriggerEvent:
        from jipfed.federation.dispatch import DELIVERED

        payload = {
            "status": status,
            "detail": detail,
            "experiment": self.experiment,
            "site": self.site,
            "round": self.round,
            "step": self.step,
        }
        if status == DELIVERED:
            return TaskSuccessEvent(xcoms={"return_value": payload})
        return TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from jipfed.federation.dispatch import WAITING

        while True:
            try:
                status, detail = await asyncio.to_thread(self._check)
            except (
                Exception
            ) as exc:  # reported to the sensor, which fails with it (no retry loop on bad config)
                self.log.exception("reading the model store failed")
                yield self._event(ERROR, f"{type(exc).__name__}: {exc}")
                return
            if status != WAITING:
                self.log.info("site %s in step %d: %s (%s)", self.site, self.step, status, detail)
                yield self._event(status, detail)
                return
            self.log.debug("site %s in step %d: waiting, %s", self.site, self.step, detail)
            await self._sleep_until_delivered(self.poll_interval_s)
