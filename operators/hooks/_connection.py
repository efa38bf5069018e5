"""Moved to :mod:`jipfed.tasks.connections` (no Airflow import, shared with ``jipfed task``)."""

from jipfed.tasks.connections import ConnectionLike, base_url, checked_extras, optional_str

__all__ = ["ConnectionLike", "base_url", "checked_extras", "optional_str"]
