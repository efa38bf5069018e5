"""Site requests (a model line's census, federated evaluation) answered by the site's Airflow.

:class:`SiteRequestsSensor` waits (reschedule mode: no worker slot between pokes) until the
central lists an open request for this site; :class:`AnswerRequestsOperator` prepares the site's
data (cached, as the site DAG does) and answers every open request through the central endpoint
(:func:`jipfed.lines.site.answer_site_requests`): numbers only leave the site.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jipfed.operators.compat import (
    AirflowException,
    AirflowSkipException,
    BaseSensorOperator,
    Context,
    PokeReturnValue,
)
from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.hooks.pacs_hook import PacsHook
from jipfed.operators.sensors.central_work import CentralWorkError
from jipfed.operators.site.base import SiteOperator, task_errors
from jipfed.operators.site.identity import IDENTITY_VARIABLE, load_identity
from jipfed.operators.triggers.central_work import is_permanent

from jipfed.central.client import CentralError

if TYPE_CHECKING:
    from jipfed.central.client import CentralClient
    from jipfed.tasks.identity import SiteIdentity

T = TypeVar("T")


def open_counts(pending: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """How many open requests of each kind (``{"census": n, "evaluate": m}``)."""
    return {kind: len(items) for kind, items in pending.items()}


class SiteRequestsSensor(BaseSensorOperator):
    """Wait until the central lists an open census or evaluation request for this site.

    Pokes ``GET /v1/requests`` every ``poke_interval`` seconds in ``reschedule`` mode. A central
    that cannot be reached is poked again; a refusal (bad token, wrong URL) fails the task.
    After ``timeout`` seconds without a request the run ends as skipped (``soft_fail``).

    Returns (XCom): the number of open requests per kind.
    """

    ui_color = "#d9ecf2"

    def __init__(
        self,
        *,
        site_variable: str = IDENTITY_VARIABLE,
        hosted_site: str | None = None,
        poke_interval: float = 30.0,
        timeout: float = 3600.0,
        soft_fail: bool = True,
        mode: str = "reschedule",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            poke_interval=poke_interval, timeout=timeout, soft_fail=soft_fail, mode=mode, **kwargs
        )
        self.site_variable = site_variable
        self.hosted_site = hosted_site

    def poke(self, context: Context) -> bool | PokeReturnValue:
        identity = load_identity(self.site_variable, self.hosted_site)
        pending = poll_central(identity, lambda client: client.pending_requests(), self.log)
        counts = open_counts(pending or {})
        if not any(counts.values()):
            return False
        self.log.info("site %s: open requests %s", identity.site_id, counts)
        return PokeReturnValue(is_done=True, xcom_value=counts)


def poll_central(identity: SiteIdentity, ask: Callable[[CentralClient], T], log: logging.Logger) -> T | None:
    """``ask`` the central (through the identity's Connection); None when it cannot be reached now
    (logged: the sensor pokes on). A refusal (bad token, wrong URL) raises CentralWorkError, so
    ``soft_fail`` does not turn it into a skip."""
    try:
        return ask(CentralHook(identity.central_conn_id).get_conn())
    except CentralError as exc:
        if is_permanent(exc):
            raise CentralWorkError(f"site {identity.site_id!r}: the central refused the poll: {exc}") from exc
        log.warning("site %s: central not reachable, poking on: %s", identity.site_id, exc)
        return None


class AnswerRequestsOperator(SiteOperator):
    """Prepare the site's data (cached) and answer every open census and evaluation request.

    Skipped when nothing is open. A PACS that cannot be queried fails the try (retried); a request
    the site cannot answer is reported to the central with the reason and the others go on.

    Returns (XCom): how many requests of each kind were answered.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("work_task_id", None)
        super().__init__(**kwargs)

    def execute(self, context: Context) -> dict[str, int]:
        from jipfed.imaging.pacs import PacsError
        from jipfed.lines.site import answer_site_requests

        run = self.site_run(context)
        client = CentralHook(run.identity.central_conn_id).get_conn()
        pacs = PacsHook(run.identity.pacs_conn_id).get_conn()
        with task_errors():
            try:
                done = answer_site_requests(client, run.identity, pacs)
            except (PacsError, CentralError) as exc:
                raise AirflowException(
                    f"{run.where}: cannot answer the central's requests now: {exc}"
                ) from exc
        if not any(done.values()):
            raise AirflowSkipException(f"{run.where}: no open request (answered meanwhile or expired)")
        self.log.info("%s: answered %s", run.where, done)
        return done
