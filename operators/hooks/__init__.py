"""Hooks: the only code that reads Connections (URLs, credentials) for JIP Federated."""

from jipfed.operators.hooks.airflow_api_hook import AirflowApiHook
from jipfed.operators.hooks.central_hook import CentralHook
from jipfed.operators.hooks.model_store_hook import ModelStoreHook
from jipfed.operators.hooks.pacs_hook import PacsHook

__all__ = ["AirflowApiHook", "CentralHook", "ModelStoreHook", "PacsHook"]
