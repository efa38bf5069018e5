"""Operators of the central DAG: start, dispatch, collect, aggregate, metrics, next step, finalize."""

from jipfed.operators.central.aggregate import AggregateStepOperator
from jipfed.operators.central.chain import (
    FinalizeOperator,
    NextStepOperator,
    next_run_id,
    route_after_start,
    route_after_step,
)
from jipfed.operators.central.dispatch import DispatchStepOperator, DispatchToSiteOperator, site_run_id
from jipfed.operators.central.report import RecordMetricsOperator
from jipfed.operators.central.start import StartExperimentOperator

__all__ = [
    "AggregateStepOperator",
    "DispatchStepOperator",
    "DispatchToSiteOperator",
    "FinalizeOperator",
    "NextStepOperator",
    "RecordMetricsOperator",
    "StartExperimentOperator",
    "next_run_id",
    "route_after_start",
    "route_after_step",
    "site_run_id",
]
