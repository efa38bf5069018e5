"""The central endpoint sites talk to, its client, and the central DAG's Params (no Airflow import)."""
