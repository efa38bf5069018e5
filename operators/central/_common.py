"""What every central task shares: opening the experiment in the model store, naming a step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jipfed.operators.hooks import ModelStoreHook

from jipfed.storage.state import ExperimentStore
from jipfed.tasks.aggregate import step_number, where

if TYPE_CHECKING:  # the federation modules import torch: only at run time, never when the DAG is parsed
    from jipfed.federation.dispatch import Dispatch

__all__ = ["DEFAULT_STORE_CONN_ID", "open_experiment", "step_dispatch", "step_number", "where"]

#: The model store Connection the central tasks use unless told otherwise.
DEFAULT_STORE_CONN_ID = ModelStoreHook.default_conn_name


def open_experiment(model_store_conn_id: str, experiment: str) -> ExperimentStore:
    """The experiment's objects in the store the Connection ``model_store_conn_id`` names."""
    return ExperimentStore(ModelStoreHook(model_store_conn_id).get_conn(), experiment)


def step_dispatch(exp_store: ExperimentStore, step: int) -> Dispatch:
    """The stored dispatch of ``step``; ValueError if the step was never dispatched."""
    from jipfed.federation.dispatch import load_dispatch
    from jipfed.federation.rounds import load_config

    config, _ = load_config(exp_store)
    round_ = config.make_plan().step(step).round
    dispatch = load_dispatch(exp_store, round_, step)
    if dispatch is None:
        raise ValueError(f"{where(exp_store.experiment, step, round_)}: the step was not dispatched")
    return dispatch
