"""The JIP Federated Airflow plugin (installed as ``jipfed.plugins``)."""
