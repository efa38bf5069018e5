"""The last check before an update leaves a site: only the expected tensors and numeric fields.

:func:`check_outgoing_update` runs in :meth:`jipfed.central.client.CentralClient.put_update`
before anything is sent. It refuses (``OutgoingRejected``, naming the field, never its value):

* a manifest that is not a valid update manifest, or whose ``site`` is not the sender;
* metric names that are not short identifiers (a name can carry text), privacy values that are
  not numbers or booleans;
* a payload whose safetensors header is malformed, carries ``__metadata__`` (free text), holds a
  tensor the manifest does not list, or whose sha256 is not the manifest's.

Only the payload header is parsed here (8-byte length + JSON); the tensors are not loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any

_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SCALE_SUFFIX = ".__scale__"


class OutgoingRejected(ValueError):
    """The update would carry something besides the expected tensors and numbers."""


def safetensors_header(payload: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors payload (OutgoingRejected when malformed)."""
    if len(payload) < 8:
        raise OutgoingRejected("the payload is not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", payload[:8])
    if length > min(_MAX_HEADER_BYTES, len(payload) - 8):
        raise OutgoingRejected("the payload is not a safetensors file (bad header length)")
    try:
        header = json.loads(payload[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OutgoingRejected("the payload is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise OutgoingRejected("the payload is not a safetensors file (header is not an object)")
    return header


def check_outgoing_update(payload: bytes, manifest_json: str, site: str | None = None) -> None:
    """Raise :class:`OutgoingRejected` unless the update holds only expected tensors and numeric fields."""
    from jipfed.federation.update import UpdateManifest

    try:
        manifest = UpdateManifest.from_json(manifest_json)
    except ValueError as exc:
        raise OutgoingRejected(f"the manifest is not a valid update manifest: {exc}") from None
    if site is not None and manifest.site != site:
        raise OutgoingRejected(f"the manifest names site {manifest.site!r}, this client is {site!r}")
    bad_metrics = [name for name in manifest.metrics if not _METRIC_NAME.match(name)]
    if bad_metrics:
        raise OutgoingRejected(f"{len(bad_metrics)} metric name(s) are not short identifiers")
    bad_privacy = [
        key
        for key, value in manifest.privacy.items()
        if value is not None and not isinstance(value, (int, float))
    ]
    if bad_privacy or any(not _METRIC_NAME.match(key) for key in manifest.privacy):
        raise OutgoingRejected("privacy fields must be identifiers with numeric values")
    header = safetensors_header(payload)
    if header.pop("__metadata__", None):
        raise OutgoingRejected("the payload carries safetensors __metadata__ (free text)")
    allowed = set(manifest.tensors) | {name + _SCALE_SUFFIX for name in manifest.tensors}
    extra = sorted(set(header) - allowed)
    if extra:
        raise OutgoingRejected(f"the payload holds {len(extra)} tensor(s) the manifest does not list")
    if manifest.sha256 != hashlib.sha256(payload).hexdigest():
        raise OutgoingRejected("the payload's sha256 is not the manifest's")
