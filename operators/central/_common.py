"""What every central task shares: opening the experiment in the model store, naming a step."""

from __future__ import annotations

from jipfed.operators.hooks import ModelStoreHook

from jipfed.federation.dispatch import Dispatch, load_dispatch
from jipfed.federation.rounds import load_config
from jipfed.storage.state import ExperimentStore

#: The model store Connection the central tasks use unless told otherwise.
DEFAULT_STORE_CONN_ID = ModelStoreHook.default_conn_name


def open_experiment(model_store_conn_id: str, experiment: str) -> ExperimentStore:
    """The experiment's objects in the store the Connection ``model_store_conn_id`` names."""
    return ExperimentStore(ModelStoreHook(model_store_conn_id).get_conn(), experiment)


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


def step_dispatch(exp_store: ExperimentStore, step: int) -> Dispatch:
    """The stored dispatch of ``step``; ValueError if the step was never dispatched."""
    config, _ = load_config(exp_store)
    round_ = config.make_plan().step(step).round
    dispatch = load_dispatch(exp_store, round_, step)
    if dispatch is None:
        raise ValueError(f"{where(exp_store.experiment, step, round_)}: the step was not dispatched")
    return dispatch
