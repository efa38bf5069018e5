"""Append-only audit log of what each site did at the central, kept in the model store.

One JSON object per event, written create-exclusive and never replaced:
``audit/<YYYY-MM-DD>/<HHMMSS.ffffff>-<site>-<random>.json`` with ``at``, ``site``, ``key_id``,
``action`` (``update``, ``failure_report``, ``model``), ``outcome`` (``accepted`` or the refusal
code), ``experiment``, ``round``, ``step`` and, for updates, the payload's ``sha256`` and
``n_samples``. An audit write that fails is logged and does not fail the request.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timezone
from typing import Any

from jipfed.storage.base import ModelStore

logger = logging.getLogger(__name__)

AUDIT_PREFIX = "audit/"


def record_event(store: ModelStore, site: str, action: str, outcome: str, **fields: Any) -> str | None:
    """Append one event; returns its key (None when the write failed, which is logged)."""
    now = datetime.now(timezone.utc)
    key = f"{AUDIT_PREFIX}{now:%Y-%m-%d}/{now:%H%M%S.%f}-{site}-{secrets.token_hex(4)}.json"
    event = {"at": now.isoformat(timespec="microseconds"), "site": site, "action": action, "outcome": outcome}
    event.update({k: v for k, v in fields.items() if v is not None})
    try:
        store.put_json(key, event)
    except Exception:
        logger.exception("central: could not write the audit record %s", event)
        return None
    return key


def read_events(store: ModelStore, day: str | None = None) -> list[dict[str, Any]]:
    """The events of ``day`` (``YYYY-MM-DD``) or of every day, oldest first."""
    keys = store.list(f"{AUDIT_PREFIX}{day}/" if day else AUDIT_PREFIX)
    return [store.get_json(key) for key in keys]
