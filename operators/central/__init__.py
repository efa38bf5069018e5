"""Operators of the central DAG: start, dispatch, collect, aggregate, metrics, next step, finalize."""
