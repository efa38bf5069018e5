"""StartExperimentOperator: the first task of every central run; decides which step the run handles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jipfed.operators.central._common import DEFAULT_STORE_CONN_ID, open_experiment
from jipfed.operators.compat import AirflowFailException, BaseOperator, Context

from jipfed.storage.base import ObjectNotFoundError
from jipfed.storage.state import ConfigConflictError, ExperimentStore, Status

if TYPE_CHECKING:  # the federation modules import torch: only at run time
    from jipfed.federation.experiment import ExperimentConfig

#: XCom keys of the run's experiment and step (None: no step left); the return value is the full decision.
EXPERIMENT_KEY, STEP_KEY = "experiment", "step"


class StartExperimentOperator(BaseOperator):
    """Start or resume the experiment named by the run's params; return what the run should do.

    A run without ``step`` in its params (triggered from the form) builds the ExperimentConfig from
    the params and starts the experiment — idempotent for the same config; a different config under
    a used name fails and overwrites nothing. A run with ``step`` (triggered by the previous run)
    loads the stored config. Either way the run handles the stored ``state.next_step``: a cleared
    run of an earlier step finds that step completed and continues with the next one.

    Returns ``{"experiment", "status", "step", "n_steps", "requested_step", "transport"}``; ``step``
    is None when no step is left (the experiment is finished or only needs finalizing).
    ``experiment`` and ``step`` are also pushed as XCom keys of those names for the later tasks.

    Args:
        model_store_conn_id: Connection of the model store (templated).
    """

    template_fields: Sequence[str] = ("model_store_conn_id",)
    ui_color = "#e8f4ff"

    def __init__(self, *, model_store_conn_id: str = DEFAULT_STORE_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_store_conn_id = model_store_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from jipfed.central.params import submitted_values
        from jipfed.federation.rounds import start_experiment

        try:
            values = submitted_values(context["params"], context["dag_run"].conf)
            exp_store = open_experiment(self.model_store_conn_id, values.get("experiment"))
        except ValueError as exc:
            raise AirflowFailException(f"cannot start the run: {exc}") from None
        name, requested = exp_store.experiment, values.get("step")
        config = self._config(exp_store, values, requested)
        try:
            state = start_experiment(exp_store, config)
        except ConfigConflictError as exc:
            raise AirflowFailException(
                f"experiment {name!r} already exists with other settings; nothing was changed. Start it "
                f"under a new name, or trigger it with its stored settings to resume it. ({exc})"
            ) from None
        except ValueError as exc:  # e.g. a warm start from a missing or mismatching experiment: no retry helps
            raise AirflowFailException(f"cannot start the run: {exc}") from None
        n_steps = config.make_plan().n_steps
        step = state.next_step if state.status is Status.RUNNING and state.next_step < n_steps else None
        if state.status is Status.FINISHED:
            self.log.info("experiment %s is finished: nothing to do in this run", name)
        elif step is None:
            self.log.info("experiment %s: all %d steps are complete; the run finalizes it", name, n_steps)
        else:
            if requested is not None and requested != step:
                self.log.info(
                    "experiment %s: run for step %s, but the next open step is %d (earlier steps are "
                    "complete); continuing with step %d",
                    name,
                    requested,
                    step,
                    step,
                )
            self.log.info(
                "experiment %s: this run handles step %d of %d (%s plan, %s transport)",
                name,
                step,
                n_steps,
                config.plan,
                config.transport,
            )
        context["ti"].xcom_push(key=EXPERIMENT_KEY, value=name)
        context["ti"].xcom_push(key=STEP_KEY, value=step)
        return {
            "experiment": name,
            "status": state.status.value,
            "step": step,
            "n_steps": n_steps,
            "requested_step": requested,
            "transport": config.transport,
        }

    def _config(self, exp_store: ExperimentStore, values: dict[str, Any], requested: Any) -> ExperimentConfig:
        from jipfed.central.params import experiment_config
        from jipfed.federation.rounds import load_config

        name = exp_store.experiment
        if requested is None:
            try:
                config = experiment_config(values)
            except ValueError as exc:
                raise AirflowFailException(f"cannot start experiment {name!r}: {exc}") from None
            self.log.info("experiment %s: settings from the form: %s", name, config.to_json())
            return config
        try:
            config, config_hash = load_config(exp_store)
        except ObjectNotFoundError:
            raise AirflowFailException(
                f"experiment {name!r} has no stored config, so a run for step {requested} cannot continue "
                "it; start the experiment from the form (without step) first"
            ) from None
        self.log.info("experiment %s: stored settings (config %s)", name, config_hash[:12])
        return config
