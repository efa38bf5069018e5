"""Operators of the central DAG: open the step, (collect per site), record metrics, close the step."""

from jipfed.operators.central.aggregate import AggregateStepOperator
from jipfed.operators.central.chain import CloseStepOperator, finalize_experiment, next_run_id
from jipfed.operators.central.dispatch import push_step, site_run_id
from jipfed.operators.central.open_step import OpenStepOperator
from jipfed.operators.central.report import RecordMetricsOperator
from jipfed.operators.central.start import StartExperimentOperator

__all__ = [
    "AggregateStepOperator",
    "CloseStepOperator",
    "OpenStepOperator",
    "RecordMetricsOperator",
    "StartExperimentOperator",
    "finalize_experiment",
    "next_run_id",
    "push_step",
    "site_run_id",
]
