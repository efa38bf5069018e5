"""``jipfed task <step>``: one heavy step of the site or central DAG, configured by the environment.

What a worker pod runs (``docs/pod-contract.md``): the same functions the in-process operators call
(``jipfed.tasks``), with the run's folders, identity, work item and connections read from the
Kaapana environment contract and ``JIPFED_*`` variables (``jipfed.tasks.env``). The result (the
operator's XCom value) goes to ``$WORKFLOW_DIR/$OPERATOR_OUT_DIR/task-result.json`` and, as JSON,
to the last line of stdout. Exit codes: 0 done, 1 failed (a retry may help), 2 bad configuration,
3 failed for good, 126 skipped (Kaapana's convention).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jipfed.tasks import env
from jipfed.tasks.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RETRY,
    EXIT_SKIPPED,
    EXIT_USAGE,
    TaskError,
    TaskFailed,
    TaskSkipped,
)
from jipfed.tasks.execution import STEPS
from jipfed.tasks.run import write_json

log = logging.getLogger(__name__)
#: Where Kubernetes reads a container's termination message (shown in the failed task's log).
TERMINATION_LOG = Path("/dev/termination-log")

Environ = Mapping[str, str]


def _data_step(step: Callable[..., str]) -> Callable[[Environ], str]:
    def run(environ: Environ) -> str:
        from jipfed.tasks.connections import pacs_config

        run_ = env.site_run(environ)
        return step(run_, pacs_config(env.connection(environ, "pacs")))

    return run


def _central_step(step: Callable[..., Any]) -> Callable[[Environ], Any]:
    def run(environ: Environ) -> Any:
        from jipfed.tasks.connections import central_client

        run_ = env.site_run(environ)
        return step(run_, central_client(env.connection(environ, "central")))

    return run


def _train(environ: Environ) -> str:
    from jipfed.tasks.site_model import train_local

    run = env.site_run(environ)
    model_dir = env.required(environ, env.MODEL_IN_DIR)
    if "/" in model_dir or model_dir in (".", ".."):
        raise ValueError(f"environment variable {env.MODEL_IN_DIR} must be a folder name, got {model_dir!r}")
    return train_local(run, run.run_dir / model_dir, evaluate=env.flag(environ, env.EVALUATE))


def _aggregate(environ: Environ) -> dict[str, Any]:
    from jipfed.storage.state import ExperimentStore
    from jipfed.tasks.aggregate import aggregate, step_number
    from jipfed.tasks.connections import open_model_store

    conf = env.run_conf(environ)
    experiment = environ.get(env.EXPERIMENT) or conf.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise ValueError(f"no experiment: set {env.EXPERIMENT} or 'experiment' in the run's conf.json")
    raw_step = environ.get(env.STEP) or conf.get("step")
    if raw_step in (None, ""):
        raise TaskSkipped(f"experiment {experiment!r}: no step to aggregate in this run")
    step = step_number(raw_step, experiment)
    store = open_model_store(env.connection(environ, "store"))
    return aggregate(ExperimentStore(store, experiment), step, open_next=env.flag(environ, env.DISPATCH_NEXT))


def step_functions() -> dict[str, Callable[[Environ], Any]]:
    """Step name -> the function running it from the environment (imports stay lazy)."""
    from jipfed.tasks import site_data, site_model

    return {
        "cohort": _data_step(site_data.select_cohort),
        "fetch": _data_step(site_data.fetch),
        "convert": _data_step(site_data.convert),
        "preprocess": _data_step(site_data.preprocess),
        "model": _central_step(site_model.get_global_model),
        "train": _train,
        "upload": _central_step(site_model.upload),
        "aggregate": _aggregate,
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "task",
        help="run one heavy DAG step (a pod's entry point), configured by the environment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("step", choices=STEPS, help="the step to run")
    parser.set_defaults(run=run)


def terminate_with(message: str) -> None:
    """Leave ``message`` where Kubernetes shows it for a failed container (when running in one)."""
    if TERMINATION_LOG.exists() and os.access(TERMINATION_LOG, os.W_OK):
        TERMINATION_LOG.write_text(message[-4000:])


def run_step(step: str, environ: Environ) -> int:
    """Run ``step``; write and print its result; return the exit code."""
    where = f"jipfed task {step} (dag {environ.get(env.DAG_ID, '?')}, run {environ.get(env.RUN_ID, '?')})"
    try:
        result = step_functions()[step](environ)
        write_json(env.result_path(environ), result)
    except TaskSkipped as exc:
        log.info("%s: skipped: %s", where, exc)
        return EXIT_SKIPPED
    except (TaskFailed, ValueError) as exc:
        message = f"{where}: {exc}"
        log.error("%s", message)
        terminate_with(message)
        return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
    except TaskError as exc:
        message = f"{where}: {exc}"
        log.error("%s", message)
        terminate_with(message)
        return EXIT_RETRY
    print(json.dumps(result, sort_keys=True))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return run_step(args.step, os.environ)


if __name__ == "__main__":
    sys.exit(run_step(sys.argv[1], os.environ))
