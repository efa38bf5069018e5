"""The central's heavy step: aggregate a plan step's updates (quorum rule), open the next step."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from jipfed.tasks.errors import TaskFailed

if TYPE_CHECKING:  # the federation modules import torch: only when the step runs
    from jipfed.storage.state import ExperimentStore

log = logging.getLogger(__name__)


def where(
    experiment: str, step: int | None = None, round_: int | None = None, site: str | None = None
) -> str:
    """``experiment 'x', round 0, step 0, site 'site-a'`` for log lines and errors."""
    parts = [f"experiment {experiment!r}"]
    if round_ is not None:
        parts.append(f"round {round_}")
    if step is not None:
        parts.append(f"step {step}")
    if site is not None:
        parts.append(f"site {site!r}")
    return ", ".join(parts)


def step_number(value: object, experiment: str) -> int:
    """A step number passed through XCom or a template, as an int (ValueError when it is none)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"experiment {experiment!r}: step must be an integer, got {value!r}")
    try:
        step = int(value)
    except ValueError:
        raise ValueError(f"experiment {experiment!r}: step must be an integer, got {value!r}") from None
    if step < 0:
        raise ValueError(f"experiment {experiment!r}: step must be >= 0, got {step}")
    return step


def step_record(exp_store: ExperimentStore, step: int) -> dict[str, Any]:
    """The stored decision record of a completed step (``aggregate.json`` or a cyclic hop's record)."""
    from jipfed.federation.rounds import load_config

    config, _ = load_config(exp_store)
    ps = config.make_plan().step(step)
    lay = exp_store.layout
    key = lay.aggregate(ps.round) if ps.is_last_in_round else lay.hop_record(ps.round, ps.hop or 0)
    return exp_store.store.get_json(key)


def dispatch_next(exp_store: ExperimentStore, step: int) -> None:
    """Open the next step for pulling sites now, while the central run does its bookkeeping.

    The next central run finds it dispatched (``dispatch_step`` is idempotent) and collects it;
    pulling sites start a few seconds earlier. Push sites are triggered by the next run's dispatch
    tasks as usual.
    """
    from jipfed.federation.dispatch import dispatch_step
    from jipfed.federation.rounds import load_config

    config, _ = load_config(exp_store)
    if config.transport != "pull" or step + 1 >= config.make_plan().n_steps:
        return
    if exp_store.load_state().next_step != step + 1:  # a re-run of an older step: nothing to open
        return
    dispatch = dispatch_step(exp_store, step + 1)
    log.info(
        "%s: next step dispatched for pulling sites (deadline %s)",
        where(exp_store.experiment, step + 1, dispatch.ticket.round),
        dispatch.deadline.isoformat(),
    )


def aggregate(exp_store: ExperimentStore, step: int, *, open_next: bool = True) -> dict[str, Any]:
    """``aggregate_step`` of ``step``; logs who was included, rejected, missing; returns the step's record.

    Raises:
        TaskFailed: too few valid updates (``QuorumNotMet``): the global model and the experiment
            state stay untouched; clearing the run retries the step.
    """
    from jipfed.federation.rounds import QuorumNotMet, aggregate_step

    try:
        aggregate_step(exp_store, step)
    except QuorumNotMet as exc:
        log.error("%s", exc)
        raise TaskFailed(
            f"{exc}. The global model and the experiment state are unchanged; clear this run to retry "
            "the step (after the round timeout it is dispatched again)."
        ) from None
    record = step_record(exp_store, step)
    here = where(exp_store.experiment, step, record["round"])
    log.info("%s: included %s", here, record["included"])
    for site, reason in record["rejected"].items():
        log.warning("%s: rejected %s: %s", here, site, reason)
    for site, reason in record.get("missing_reasons", {}).items():
        log.warning("%s: missing %s: %s", here, site, reason)
    log.info("%s: weighted metrics %s (n_samples %s)", here, record["metrics"], record["n_samples"])
    if open_next:
        dispatch_next(exp_store, step)
    return record
