"""Deterministic DICOM UIDs: ``2.25.<UUID>`` with a name-based (SHA-1, version 5) UUID.

``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and returns a random
UUID, and its hashed form joins the sources without a separator; so the UID is built here from
the UUID of ``"<seed>/<site_id>/<case_index>/<part>/..."`` under a fixed namespace instead.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:jipfed:synth")


def synth_uid(seed: int, site_id: str, case_index: int, *parts: str | int) -> UID:
    """The UID named by (seed, site, case, parts…); the same arguments always give the same UID."""
    if any("/" in str(p) for p in (site_id, *parts)):
        raise ValueError(f"UID name parts must not contain '/', got {(site_id, *parts)!r}")
    name = "/".join(str(p) for p in (seed, site_id, case_index, *parts))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")
