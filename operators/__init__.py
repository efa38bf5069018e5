"""Airflow operators, hooks, sensors and triggers for JIP Federated (installed as ``jipfed.operators``)."""
