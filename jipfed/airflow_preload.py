"""Import the heavy libraries once in Airflow's scheduler, so every task starts without them.

With the LocalExecutor, the scheduler forks its worker processes and each worker forks one
process per task (Airflow 3 on Linux: a bare ``os.fork``). Modules the scheduler imported before
that are simply there in every task; otherwise each task imports torch, MONAI and the DAG files'
operators itself (4-8 s per task on 2 cores, most of a round's orchestration time).

Use it from ``airflow_local_settings.py`` (Airflow imports it in every component at start-up;
put it in ``$AIRFLOW_HOME/config/``)::

    from jipfed.airflow_preload import preload_for_component
    preload_for_component()

Only the scheduler and the DAG processor preload (see ``COMPONENTS``): the API server and the
triggerer do not need torch. No Airflow import here. It is an option for the LocalExecutor with
in-process steps; the DAG files and operators themselves import without torch (a scheduler image
without it, steps as pods: see ``docs/pod-contract.md``), and a missing module is only logged.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)

#: Airflow sub-commands whose processes fork the task / parsing processes.
COMPONENTS = ("scheduler", "dag-processor")
#: What tasks and DAG files of JIP Federated import (heaviest first).
MODULES = (
    "torch",
    "monai.networks.nets",
    "monai.transforms",
    "jipfed.federation.dispatch",
    "jipfed.federation.site_round",
    "jipfed.imaging.pipeline",
    "jipfed.training.local",
    "jipfed.tasks.site_data",
    "jipfed.tasks.site_model",
    "jipfed.tasks.aggregate",
    "jipfed.central.client",
    "jipfed.operators.central",
    "jipfed.operators.site",
)


def component(argv: Sequence[str] | None = None) -> str | None:
    """The Airflow sub-command this process runs (``airflow scheduler`` → ``scheduler``), if any."""
    args = list(sys.argv if argv is None else argv)
    if not args or not args[0].endswith("airflow"):
        return None
    return next((arg for arg in args[1:] if not arg.startswith("-")), None)


def preload(modules: Iterable[str] = MODULES) -> dict[str, float]:
    """Import ``modules``; returns seconds per module. A module that fails to import is logged, not raised."""
    seconds = {}
    for name in modules:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - preloading must never stop Airflow from starting
            logger.warning("jipfed preload: could not import %s: %s", name, exc)
            continue
        seconds[name] = round(time.perf_counter() - start, 2)
    return seconds


def preload_for_component(components: Sequence[str] = COMPONENTS) -> dict[str, float]:
    """:func:`preload` when this process is one of ``components``, else nothing."""
    name = component()
    if name not in components:
        return {}
    seconds = preload()
    logger.info("jipfed preload in airflow %s: %s", name, seconds)
    return seconds
