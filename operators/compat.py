"""The one place that decides Airflow 2 vs 3 names.

Operators, hooks, sensors, triggers and DAG files import Airflow names from here only, so the same
files run on Airflow 2.11 and 3.x. Names come from ``airflow.providers.common.compat.sdk`` (which
tries ``airflow.sdk`` first, then the Airflow 2 locations); without that provider, from the
version's own modules. Triggers (and ``TaskSuccessEvent``, which ends a deferred task in the triggerer, 2.10+) come from
``airflow.triggers.base`` on both versions.
"""

from __future__ import annotations

import importlib
from typing import Any

from airflow import __version__ as AIRFLOW_VERSION
from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent
from packaging.version import Version

#: True on Airflow 3.x (task SDK, REST API v2), False on 2.x.
AIRFLOW_V3: bool = Version(Version(AIRFLOW_VERSION).base_version) >= Version("3.0.0")

if AIRFLOW_V3:
    from airflow.triggers.base import BaseEventTrigger
else:  # Airflow 2 has no event triggers (asset watchers): a plain trigger stands in
    BaseEventTrigger = BaseTrigger

#: Name -> (Airflow 3 module, Airflow 2 module) for the fallback when common-compat is missing.
NATIVE_LOCATIONS: dict[str, tuple[str, str]] = {
    "DAG": ("airflow.sdk", "airflow.models.dag"),
    "dag": ("airflow.sdk", "airflow.decorators"),
    "task": ("airflow.sdk", "airflow.decorators"),
    "task_group": ("airflow.sdk", "airflow.decorators"),
    "Param": ("airflow.sdk", "airflow.models.param"),
    "BaseOperator": ("airflow.sdk", "airflow.models.baseoperator"),
    "BaseSensorOperator": ("airflow.sdk", "airflow.sensors.base"),
    "PokeReturnValue": ("airflow.sdk", "airflow.sensors.base"),
    "BaseHook": ("airflow.sdk", "airflow.hooks.base"),
    "Connection": ("airflow.sdk", "airflow.models.connection"),
    "Variable": ("airflow.sdk", "airflow.models.variable"),
    "Context": ("airflow.sdk", "airflow.utils.context"),
    "get_current_context": ("airflow.sdk", "airflow.operators.python"),
    "chain": ("airflow.sdk", "airflow.models.baseoperator"),
    "TriggerRule": ("airflow.sdk", "airflow.utils.trigger_rule"),
    "TriggerDagRunOperator": (
        "airflow.providers.standard.operators.trigger_dagrun",
        "airflow.operators.trigger_dagrun",
    ),
    "AirflowException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "AirflowFailException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "AirflowSkipException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "AirflowNotFoundException": ("airflow.sdk.exceptions", "airflow.exceptions"),
    "ParamValidationError": ("airflow.sdk.exceptions", "airflow.exceptions"),
}


def native_import(name: str) -> Any:
    """Import ``name`` from this Airflow version's own module (no common-compat provider)."""
    try:
        v3_module, v2_module = NATIVE_LOCATIONS[name]
    except KeyError:
        raise ValueError(f"no native location known for {name!r}") from None
    return getattr(importlib.import_module(v3_module if AIRFLOW_V3 else v2_module), name)


try:
    from airflow.providers.common.compat.sdk import (
        DAG,
        AirflowException,
        AirflowFailException,
        AirflowNotFoundException,
        AirflowSkipException,
        BaseHook,
        BaseOperator,
        BaseSensorOperator,
        Connection,
        Context,
        Param,
        ParamValidationError,
        PokeReturnValue,
        TriggerRule,
        Variable,
        chain,
        dag,
        get_current_context,
        task,
        task_group,
    )

    HAS_COMMON_COMPAT = True
except ImportError:  # older Airflow 2 without apache-airflow-providers-common-compat
    HAS_COMMON_COMPAT = False
    DAG = native_import("DAG")
    AirflowException = native_import("AirflowException")
    AirflowFailException = native_import("AirflowFailException")
    AirflowNotFoundException = native_import("AirflowNotFoundException")
    AirflowSkipException = native_import("AirflowSkipException")
    BaseHook = native_import("BaseHook")
    BaseOperator = native_import("BaseOperator")
    BaseSensorOperator = native_import("BaseSensorOperator")
    Connection = native_import("Connection")
    Context = native_import("Context")
    Param = native_import("Param")
    ParamValidationError = native_import("ParamValidationError")
    PokeReturnValue = native_import("PokeReturnValue")
    TriggerRule = native_import("TriggerRule")
    Variable = native_import("Variable")
    chain = native_import("chain")
    dag = native_import("dag")
    get_current_context = native_import("get_current_context")
    task = native_import("task")
    task_group = native_import("task_group")

#: Triggers a DAG run (the central DAG's next step): the standard provider on 3.x, core on 2.x.
TriggerDagRunOperator = native_import("TriggerDagRunOperator")

__all__ = [
    "AIRFLOW_V3",
    "AIRFLOW_VERSION",
    "DAG",
    "HAS_COMMON_COMPAT",
    "NATIVE_LOCATIONS",
    "AirflowException",
    "AirflowFailException",
    "AirflowNotFoundException",
    "AirflowSkipException",
    "BaseHook",
    "BaseOperator",
    "BaseEventTrigger",
    "BaseSensorOperator",
    "BaseTrigger",
    "Connection",
    "Context",
    "Param",
    "ParamValidationError",
    "PokeReturnValue",
    "TaskSuccessEvent",
    "TriggerDagRunOperator",
    "TriggerEvent",
    "TriggerRule",
    "Variable",
    "chain",
    "dag",
    "get_current_context",
    "native_import",
    "task",
    "task_group",
]
