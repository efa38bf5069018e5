"""Handing a plan step to the sites and hearing back: dispatch records, deadlines, site failures.

The central *dispatches* a step (:func:`dispatch_step`): it stores the step's ticket with a
deadline (``round_timeout_s`` from now) as ``rounds/<r>/steps/<s>/dispatch.json``. From then on:

* a site asks for its work (:func:`pending_work`): the dispatched steps that select it and that it
  has not answered yet (no update, no failure report), in every running experiment;
* it downloads the model its ticket names (:func:`model_for_site`), only while it is selected;
* it uploads its update (:func:`accept_in_time`) — refused after the deadline or once the step
  closed — or reports that it cannot deliver (:func:`report_site_failure`);
* the central's collect waits per site (:func:`site_status`) until the update arrived, the site
  reported a failure, or the deadline passed (then :func:`record_timeout`).

Everything here is keyed by (experiment, round, step, site) and works on any ModelStore; the
central HTTP endpoint and the Airflow tasks only call these functions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.tickets import ProtocolError, StepTicket, UpdateRefused, load_config
from jipfed.storage.base import ModelStore, ObjectNotFoundError
from jipfed.storage.layout import validate_slug
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentStore, Status

if TYPE_CHECKING:  # the actions import torch; a work item is parsed without it (light tasks)
    from jipfed.federation.update import UpdateManifest

logger = logging.getLogger(__name__)

DISPATCH_FORMAT = 1
#: Longest failure reason stored (a site's traceback tail is cut to this).
MAX_REASON_CHARS = 2000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not an ISO timestamp: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Dispatch:
    """One dispatched step: its ticket, how it reached the sites, and until when updates count.

    Attributes:
        ticket: the step ticket (``open_step``).
        transport: ``"push"`` or ``"pull"`` (from the experiment config).
        attempt: 0 for the first dispatch, +1 for each re-dispatch (a cleared central run).
        dispatched_at, deadline: timezone-aware UTC times.
    """

    ticket: StepTicket
    transport: str
    attempt: int
    dispatched_at: datetime
    deadline: datetime

    def expired(self, now: datetime | None = None) -> bool:
        return (now or utcnow()) >= self.deadline

    def seconds_left(self, now: datetime | None = None) -> float:
        return (self.deadline - (now or utcnow())).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DISPATCH_FORMAT,
            "ticket": self.ticket.to_dict(),
            "transport": self.transport,
            "attempt": self.attempt,
            "dispatched_at": _iso(self.dispatched_at),
            "deadline": _iso(self.deadline),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dispatch:
        if data.get("format") != DISPATCH_FORMAT:
            raise ValueError(f"unsupported dispatch record format {data.get('format')!r}")
        return cls(
            ticket=StepTicket.from_dict(data["ticket"]),
            transport=str(data["transport"]),
            attempt=int(data["attempt"]),
            dispatched_at=_parse_time(data["dispatched_at"], "dispatched_at"),
            deadline=_parse_time(data["deadline"], "deadline"),
        )


def load_dispatch(exp_store: ExperimentStore, round_: int, step: int) -> Dispatch | None:
    """The dispatch of ``step`` (in round ``round_``), or None if it was never dispatched."""
    data = exp_store.load_dispatch(round_, step)
    return None if data is None else Dispatch.from_dict(data)


def dispatch_step(exp_store: ExperimentStore, step: int, *, now: datetime | None = None) -> Dispatch:
    """Open ``step`` and record its dispatch with a deadline ``round_timeout_s`` from ``now``.

    Idempotent while the deadline has not passed (a retried task gets the same dispatch back);
    after it passed (the central run was cleared to retry the step) the step is dispatched again
    as attempt + 1 with a fresh deadline, so sites that failed before may try again.
    """
    now = now or utcnow()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as stored (ms)
    from jipfed.federation.rounds import open_step

    ticket = open_step(exp_store, step)
    config, _ = load_config(exp_store)
    earlier = load_dispatch(exp_store, ticket.round, step)
    if earlier is not None and earlier.ticket == ticket and not earlier.expired(now):
        return earlier
    dispatch = Dispatch(
        ticket=ticket,
        transport=config.transport,
        attempt=0 if earlier is None else earlier.attempt + 1,
        dispatched_at=now,
        deadline=now + timedelta(seconds=config.round_timeout_s),
    )
    exp_store.save_dispatch(ticket.round, step, dispatch.to_dict())
    _index_open(exp_store, dispatch)
    logger.info(
        "experiment %s: dispatched step %d (round %d, attempt %d) to %s by %s; deadline %s",
        ticket.experiment,
        step,
        ticket.round,
        dispatch.attempt,
        list(ticket.sites),
        dispatch.transport,
        _iso(dispatch.deadline),
    )
    return dispatch


def current_dispatch(exp_store: ExperimentStore) -> Dispatch | None:
    """The dispatch of the experiment's next step, if it is running and that step was dispatched."""
    try:
        state = exp_store.load_state()
    except ObjectNotFoundError:
        return None
    if state.status is not Status.RUNNING:
        return None
    config, _ = load_config(exp_store)
    plan = config.make_plan()
    if state.next_step >= plan.n_steps:
        return None
    return load_dispatch(exp_store, plan.step(state.next_step).round, state.next_step)


def _site_dispatch(exp_store: ExperimentStore, site: str, round_: int, step: int | None = None) -> Dispatch:
    """The current dispatch if it selects ``site`` (and is round ``round_``), else ProtocolError."""
    validate_slug(site, "site id")
    dispatch = current_dispatch(exp_store)
    where = f"experiment {exp_store.experiment!r}, round {round_}"
    if (
        dispatch is None
        or dispatch.ticket.round != round_
        or (step is not None and dispatch.ticket.step != step)
    ):
        raise ProtocolError(f"{where}: no open step{'' if step is None else f' {step}'} for site {site!r}")
    if site not in dispatch.ticket.sites:
        raise ProtocolError(f"{where}: site {site!r} is not selected for step {dispatch.ticket.step}")
    return dispatch


# -- the site's side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """A step a site still has to answer: the ticket plus what the site needs to run it."""

    dispatch: Dispatch
    config: dict[str, Any]
    dataset: str | None

    @property
    def ticket(self) -> StepTicket:
        return self.dispatch.ticket

    def to_dict(self) -> dict[str, Any]:
        return {**self.dispatch.to_dict(), "config": self.config, "dataset": self.dataset}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkItem:
        return cls(
            dispatch=Dispatch.from_dict(data),
            config=dict(data["config"]),
            dataset=data.get("dataset"),
        )


#: Index of the experiments that may have an open dispatch: one small object per experiment,
#: written by :func:`dispatch_step` and dropped by :func:`pending_work` once the experiment is no
#: longer running (finished, failed). Sites poll only these, so finished experiments cost nothing.
OPEN_INDEX_PREFIX = "index/open/"


def open_index_key(experiment: str) -> str:
    return f"{OPEN_INDEX_PREFIX}{validate_slug(experiment, 'experiment')}.json"


def _index_open(exp_store: ExperimentStore, dispatch: Dispatch | None = None) -> None:
    """List the experiment in the open-dispatch index; naming the dispatch rewrites the entry with new
    content, so its identity changes on every store (S3's ETag is the content's hash): see :func:`work_version`."""
    key = open_index_key(exp_store.experiment)
    entry: dict[str, Any] = {"experiment": exp_store.experiment}
    if dispatch is not None:
        entry.update(
            step=dispatch.ticket.step, attempt=dispatch.attempt, dispatched_at=_iso(dispatch.dispatched_at)
        )
    exp_store.store.put_json(key, entry, overwrite=True)


def _running(exp_store: ExperimentStore) -> bool:
    try:
        return exp_store.load_state().status is Status.RUNNING
    except ObjectNotFoundError:
        return False


def open_experiments(store: ModelStore) -> list[str]:
    """Experiments in the open-dispatch index."""
    names = []
    for key in store.list(OPEN_INDEX_PREFIX):
        name = key[len(OPEN_INDEX_PREFIX) :]
        if name.endswith(".json") and "/" not in name:
            names.append(name[: -len(".json")])
    return sorted(names)


def experiments_in(store: ModelStore) -> list[str]:
    """Names of the experiments that have a state in ``store``."""
    names = []
    for key in store.list("experiments/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "state.json":
            names.append(parts[1])
    return sorted(names)


def work_for_site(exp_store: ExperimentStore, site: str, now: datetime | None = None) -> WorkItem | None:
    """The experiment's dispatched step if it selects ``site`` and the site has not answered it."""
    dispatch = current_dispatch(exp_store)
    if dispatch is None or site not in dispatch.ticket.sites or dispatch.expired(now):
        return None
    round_ = dispatch.ticket.round
    lay = exp_store.layout
    if exp_store.store.exists(lay.update_manifest(round_, site)):
        return None
    if _secure_took_part(exp_store, dispatch, site):  # its masked update is on the way or it dropped out
        return None
    failure = exp_store.site_failures(round_).get(site)
    if failure is not None and int(failure.get("attempt", 0)) >= dispatch.attempt:
        return None
    config, _ = load_config(exp_store)
    return WorkItem(
        dispatch=replace(dispatch, ticket=_ticket_for(dispatch.ticket, site)),
        config=_config_for(exp_store.load_config(), site),
        dataset=config.datasets.get(site),
    )


def _ticket_for(ticket: StepTicket, site: str) -> StepTicket:
    """The ticket as ``site`` sees it: itself as the only selected site, only its own local work."""
    return replace(ticket, sites=(site,), local_work={site: ticket.local_work[site]})


def _config_for(config: Mapping[str, Any], site: str) -> dict[str, Any]:
    """The experiment config as ``site`` sees it: no other site's id, cohort selector or size.

    Still a valid ``ExperimentConfig`` (one site, quorum 1); its hash is not the experiment's,
    which is ``ticket.config_hash``.
    """
    view = dict(config)
    view["sites"] = [site]
    view["min_sites"] = 1
    for key in ("site_samples", "datasets"):
        own = dict(view.get(key) or {})
        view[key] = {site: own[site]} if site in own else {}
    selection = dict(view.get("case_selection") or {})
    if selection:
        view["case_selection"] = {site: selection[site]} if site in selection else {}
    return view


def pending_work(store: ModelStore, site: str, now: datetime | None = None) -> list[WorkItem]:
    """Every dispatched step, across running experiments, that ``site`` still has to answer (oldest first).

    Reads only the experiments of the open-dispatch index; an entry whose experiment has no open
    step any more is dropped from the index here.
    """
    validate_slug(site, "site id")
    items = []
    for name in open_experiments(store):
        exp_store = ExperimentStore(store, name)
        if not _running(exp_store):
            store.delete(open_index_key(name))
            if _running(exp_store):  # resumed (and dispatched) meanwhile: keep it listed
                _index_open(exp_store)
            continue
        item = work_for_site(exp_store, site, now)
        if item is not None:
            items.append(item)
    return sorted(items, key=lambda item: item.dispatch.dispatched_at)


#: Longest a work request waits for work at the central (long poll); the site's HTTP timeout is longer.
MAX_WORK_WAIT_S = 25.0
#: While a work request waits: seconds between full checks (:func:`pending_work`); between them only
#: the open-dispatch index is looked at (:func:`work_version`, every :func:`change_check_interval`).
FULL_CHECK_S = 2.0


def change_check_interval(store: ModelStore) -> float:
    """Seconds between cheap looks for a change while something waits on the store: 0.1 s on a local
    folder (a stat), 1 s elsewhere (S3: every look is a request)."""
    return 0.1 if isinstance(store, LocalFolderStore) else 1.0


def work_version(store: ModelStore) -> tuple[tuple[str, str], ...]:
    """What changes whenever a step is dispatched: the open-dispatch index's keys and their objects'
    identities (one listing plus one stat or HEAD per open experiment; no object is read)."""
    version = []
    for key in store.list(OPEN_INDEX_PREFIX):
        try:
            identity = store.identity(key)
        except ObjectNotFoundError:  # dropped meanwhile: it is missing from the version, which changed
            continue
        version.append((key, json.dumps(identity, sort_keys=True)))
    return tuple(version)


SyncRunner = Callable[..., Awaitable[Any]]


async def wait_for_work(
    store: ModelStore, site: str, wait_s: float, run_sync: SyncRunner = asyncio.to_thread
) -> list[WorkItem]:
    """:func:`pending_work`, or, while there is none, the same once a step is dispatched or after
    ``wait_s`` (at most :data:`MAX_WORK_WAIT_S`): the long poll behind ``GET /v1/work?wait_s=``.

    The store is touched from ``run_sync`` (``asyncio.to_thread`` or the web server's thread pool):
    a cheap :func:`work_version` look every :func:`change_check_interval`, a full check when it
    changed and every :data:`FULL_CHECK_S`. ``wait_s`` 0 answers at once.
    """
    end = time.monotonic() + min(max(float(wait_s), 0.0), MAX_WORK_WAIT_S)
    check_s = change_check_interval(store)
    while True:
        version = await run_sync(work_version, store)  # before the check: a dispatch after it changes it
        items = await run_sync(pending_work, store, site)
        if items or time.monotonic() >= end:
            return items
        full_at = min(end, time.monotonic() + FULL_CHECK_S)
        while (left := full_at - time.monotonic()) > 0:
            await asyncio.sleep(min(check_s, left))
            if await run_sync(work_version, store) != version:
                break


def model_for_site(
    exp_store: ExperimentStore, site: str, round_: int, step: int
) -> tuple[bytes, dict[str, Any]]:
    """The payload and manifest of the model ``site``'s ticket for ``step`` names (only while selected)."""
    ticket = _site_dispatch(exp_store, site, round_, step).ticket
    payload = exp_store.store.get_bytes(ticket.model_key)
    manifest = exp_store.store.get_json(ticket.manifest_key)
    return payload, manifest


def accept_in_time(
    exp_store: ExperimentStore,
    site: str,
    round_: int,
    payload: bytes,
    manifest_json: str | bytes,
    *,
    now: datetime | None = None,
) -> UpdateManifest:
    """:func:`~jipfed.federation.rounds.accept_update`, refusing it once the step's deadline passed.

    Raises:
        UpdateRefused: ``code="late"`` after the deadline, or any refusal of ``accept_update``.
    """
    from jipfed.federation.rounds import accept_update

    check_deadline(exp_store, site, round_, now)
    return accept_update(exp_store, site, round_, payload, manifest_json)


def check_deadline(exp_store: ExperimentStore, site: str, round_: int, now: datetime | None = None) -> None:
    """Raise ``UpdateRefused(code="late")`` when the open step of ``round_`` is past its deadline."""
    now = now or utcnow()
    dispatch = current_dispatch(exp_store)
    if dispatch is not None and dispatch.ticket.round == round_ and dispatch.expired(now):
        reason = (
            f"late update refused: round {round_} (step {dispatch.ticket.step}) timed out at "
            f"{_iso(dispatch.deadline)}, the update arrived at {_iso(now)}"
        )
        logger.warning("experiment %s: refused update of %s: %s", exp_store.experiment, site, reason)
        raise UpdateRefused(exp_store.experiment, site, round_, "late", reason)


def report_site_failure(
    exp_store: ExperimentStore,
    site: str,
    round_: int,
    step: int,
    reason: str,
    *,
    source: str = "site",
    now: datetime | None = None,
) -> dict[str, Any]:
    """Record that ``site`` will send no update for ``step`` and why (first report of an attempt wins).

    Raises:
        ProtocolError: the step is not open or does not select ``site``.
    """
    dispatch = _site_dispatch(exp_store, site, round_, step)
    text = str(reason).strip() or "no reason given"
    record = {
        "site": site,
        "round": round_,
        "step": step,
        "attempt": dispatch.attempt,
        "source": source,
        "reason": text[-MAX_REASON_CHARS:],
        "at": _iso(now or utcnow()),
    }
    stored = exp_store.record_site_failure(round_, site, record)
    logger.warning(
        "experiment %s: round %d step %d: site %s sends no update: %s",
        exp_store.experiment,
        round_,
        step,
        site,
        stored["reason"],
    )
    return stored


#: Largest cohort a site may report (a sanity bound; the experiment's max_site_samples bounds more).
MAX_COHORT_CASES = 10**9


def report_cohort(
    exp_store: ExperimentStore,
    site: str,
    round_: int,
    step: int,
    n_cases: int,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Record the cohort size ``site`` took the step's work with; its update's n_samples may not exceed it.

    The first report of a round stays (a later, larger one cannot raise the bound).

    Raises:
        ProtocolError: the step is not open or does not select ``site``.
        ValueError: ``n_cases`` is not an int in [0, MAX_COHORT_CASES].
    """
    dispatch = _site_dispatch(exp_store, site, round_, step)
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or not 0 <= n_cases <= MAX_COHORT_CASES:
        raise ValueError(f"n_cases must be an int in [0, {MAX_COHORT_CASES}], got {str(n_cases)[:40]}")
    record = {"site": site, "round": round_, "step": step, "attempt": dispatch.attempt, "n_cases": n_cases}
    return exp_store.record_cohort(round_, site, {**record, "at": _iso(now or utcnow())})


# -- the central's side ----------------------------------------------------------------------------

DELIVERED, FAILED, TIMED_OUT, WAITING = "delivered", "failed", "timed_out", "waiting"


def site_status(
    exp_store: ExperimentStore, dispatch: Dispatch, site: str, now: datetime | None = None
) -> tuple[str, str]:
    """Where ``site`` stands in ``dispatch``: (``delivered|failed|timed_out|waiting``, detail)."""
    round_ = dispatch.ticket.round
    if exp_store.store.exists(exp_store.layout.update_manifest(round_, site)):
        return DELIVERED, f"update of {site} for round {round_} received"
    secure = _secure_status(exp_store, dispatch, site)
    if secure is not None:  # a secure-aggregation round (jipfed/privacy/secagg_wire.py)
        return secure
    failure = exp_store.site_failures(round_).get(site)
    if failure is not None and int(failure.get("attempt", 0)) >= dispatch.attempt:
        return FAILED, str(failure.get("reason"))
    if dispatch.expired(now):
        return TIMED_OUT, f"no update within the round timeout (deadline {_iso(dispatch.deadline)})"
    return WAITING, f"{dispatch.seconds_left(now):.0f} s left"


def _secure_took_part(exp_store: ExperimentStore, dispatch: Dispatch, site: str) -> bool:
    """Whether ``site`` posted a secure-aggregation key in this dispatch (it answered; no work again)."""
    if not (exp_store.load_config().get("privacy") or {}).get("secure_aggregation"):
        return False
    from jipfed.privacy.secagg_wire import took_part

    return took_part(exp_store, dispatch, site)


def _secure_status(exp_store: ExperimentStore, dispatch: Dispatch, site: str) -> tuple[str, str] | None:
    from jipfed.privacy.secagg_wire import site_status as secure_site_status

    return secure_site_status(exp_store, dispatch, site)


def record_timeout(exp_store: ExperimentStore, dispatch: Dispatch, site: str) -> dict[str, Any]:
    """Record that ``site`` timed out in ``dispatch`` (unless it reported a failure first)."""
    ticket = dispatch.ticket
    reason = (
        f"timed out: no update within {dispatch.seconds_left(dispatch.dispatched_at):.0f} s "
        f"(deadline {_iso(dispatch.deadline)})"
    )
    return exp_store.record_site_failure(
        ticket.round,
        site,
        {
            "site": site,
            "round": ticket.round,
            "step": ticket.step,
            "attempt": dispatch.attempt,
            "source": "central",
            "reason": reason,
            "at": _iso(utcnow()),
        },
    )


def experiment_config(exp_store: ExperimentStore) -> ExperimentConfig:
    """The stored experiment config, validated."""
    return load_config(exp_store)[0]
