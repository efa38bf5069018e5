"""Secure aggregation over the wire: the site's side (no Airflow import).

After training, :func:`secure_upload` takes the encoded update the site built, and until the
round's secure sum is complete: posts an X25519 public key for the current attempt, waits for every
peer's key, masks its fixed-point weighted update (:func:`jipfed.privacy.secagg.masked_vector`) and
uploads the masked uint64 vector; when a peer drops out the central opens a new attempt without it
and the site masks the same update again under fresh keys. Nothing unmasked leaves the site: the
central receives the public key, the masked vector and a manifest of identity fields and the
site's aggregate metrics (no sample count: the weight is hidden in the sum). The private key of an
attempt is kept in ``key_dir`` (the run folder), so a retried task posts the same key again.

With client-level DP (:mod:`jipfed.privacy.secure_dp`) the site clips its delta to C, masks it with
weight 1 and adds, per attempt, fresh noise of its share ``z C / sqrt(sites of the attempt)``; the
manifest's ``noise`` field declares the share (null without client-level DP).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from jipfed.federation.dispatch import utcnow
from jipfed.federation.update import UpdateManifest
from jipfed.privacy import secagg, secagg_wire, secure_dp
from jipfed.privacy.secure_dp import NoiseShare
from jipfed.privacy.settings import SecureAggregation

log = logging.getLogger(__name__)

#: Seconds to pause after a status that did not change (a central without the long poll answers at once).
POLL_INTERVAL_S = 0.2


class SecAggSiteError(Exception):
    """The site cannot complete secure aggregation (dropped from the round, deadline, failed attempt)."""


@dataclass(frozen=True)
class SiteUpdate:
    """What the site masks: the float values of its update (name order), its weight and its metrics;
    ``noise``: the client-DP share rule (the values are clipped then, the weight 1)."""

    values: np.ndarray
    weight: float
    metrics: dict[str, float]
    noise: NoiseShare | None = None


def site_update(
    payload: bytes, manifest_json: str, max_weight: int, noise: NoiseShare | None = None
) -> SiteUpdate:
    """The flattened float tensors of an encoded (fp32) update, its weight capped at ``max_weight``;
    with ``noise`` (client-level DP) clipped to its C, weight 1.

    The cap keeps the masked sum inside the ring that ``check_capacity`` sized for ``max_site_samples``.
    """
    from safetensors.torch import load

    manifest = UpdateManifest.from_json(manifest_json)
    if hashlib.sha256(payload).hexdigest() != manifest.sha256:
        raise SecAggSiteError(f"round {manifest.round}: the update file does not match its manifest's sha256")
    values = secagg.flatten(load(payload))
    metrics = {k: float(v) for k, v in manifest.metrics.items() if math.isfinite(v)}
    if noise is not None:
        return SiteUpdate(secure_dp.clip_values(values, noise.clip_norm), 1.0, metrics, noise)
    return SiteUpdate(values, float(min(manifest.n_samples, max_weight)), metrics)


def load_or_create_key(path: Path) -> secagg.X25519PrivateKey:
    """The attempt's private key kept at ``path`` (created, owner-only, on first use)."""
    from cryptography.hazmat.primitives import serialization

    if path.is_file():
        return secagg.X25519PrivateKey.from_private_bytes(path.read_bytes())
    key = secagg.new_private_key()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.touch(mode=0o600)
    tmp.write_bytes(raw)
    tmp.replace(path)
    return key


def masked_upload(
    update: SiteUpdate,
    status: Mapping[str, Any],
    site: str,
    step: int,
    config_hash: str,
    key: secagg.X25519PrivateKey,
    settings: SecureAggregation,
) -> tuple[bytes, str]:
    """(safetensors payload, manifest JSON) of this site's masked vector for the attempt in ``status``
    (with client-level DP: fresh noise of this site's share of the attempt)."""
    from safetensors.numpy import save

    peers = {
        s: secagg_wire.decode_public_key(k, s) for s, k in (status["public_keys"] or {}).items() if s != site
    }
    context = secagg_wire.seed_context(
        status["experiment"], status["round"], status["dispatch_attempt"], status["attempt"]
    )
    values, noise = update.values, None
    if update.noise is not None:
        n_sites = len(status["sites"])
        values = secure_dp.add_share(values, update.noise, n_sites)
        noise = secure_dp.noise_record(update.noise, n_sites)
    vector = secagg.masked_vector(site, values, update.weight, key, peers, context, settings)
    payload = save({secagg_wire.MASKED_TENSOR: vector})
    manifest = {
        "format": secagg_wire.MASKED_FORMAT,
        "experiment": status["experiment"],
        "round": status["round"],
        "step": step,
        "dispatch_attempt": status["dispatch_attempt"],
        "attempt": status["attempt"],
        "site": site,
        "config_hash": config_hash,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "length": int(vector.size),
        "fraction_bits": settings.fraction_bits,
        "metrics": update.metrics,
        "noise": noise,
    }
    return payload, json.dumps(manifest, sort_keys=True)


def _dropped_reason(status: Mapping[str, Any], site: str) -> str:
    for failed in reversed(status.get("history") or []):
        if site in failed.get("dropped", {}):
            return str(failed["dropped"][site])
    return "not among the attempt's sites"


def secure_upload(
    client: Any,
    *,
    experiment: str,
    round: int,
    step: int,
    site: str,
    config_hash: str,
    update: SiteUpdate,
    settings: SecureAggregation,
    deadline: datetime,
    key_dir: Path,
    poll_interval_s: float = POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Run this site's part of the round's secure aggregation through ``client`` (a ``CentralClient``).

    While waiting for the peers' keys or uploads the site long-polls the status (``since`` its last
    ``stage``): the central answers as soon as the last key or upload arrived.

    Returns the central's status of the complete attempt holding this site.

    Raises:
        SecAggSiteError: the site was dropped from the round, the aggregation failed, or the step's
            deadline passed before it completed.
        CentralError: a call failed (the task may be retried: the key and the upload are idempotent).
    """
    where = f"site {site}: experiment {experiment!r}, round {round}"
    said = ""

    def say(text: str) -> None:
        nonlocal said
        if text != said:
            log.info("%s: secure aggregation: %s", where, text)
            said = text

    since: str | None = None
    wait_s = min(
        secagg_wire.MAX_WAIT_S, 0.5 * float(getattr(client, "timeout_s", 2 * secagg_wire.MAX_WAIT_S))
    )
    while True:
        status = client.secagg_status(experiment, round, step, since=since, wait_s=wait_s)
        unchanged, since = status["stage"] == since, status["stage"]
        attempt = status["attempt"]
        if site not in status["sites"]:
            raise SecAggSiteError(
                f"{where}: dropped from secure aggregation: {_dropped_reason(status, site)}"
            )
        if status["complete"]:
            say(f"attempt {attempt} complete with {status['sites']}; the central can unmask the sum")
            return status
        if status["failed"]:
            raise SecAggSiteError(f"{where}: secure aggregation failed: {status['failed']['reason']}")
        for failed in status.get("history") or []:
            say(f"attempt {failed['attempt']} failed ({failed['reason']}); now attempt {attempt}")
        key = load_or_create_key(key_dir / f"d{status['dispatch_attempt']}-a{attempt}.x25519")
        if site not in status["keys_posted"]:
            public = base64.b64encode(secagg.public_bytes(key)).decode("ascii")
            client.post_secagg_key(experiment, round, step, attempt, public)
            say(f"posted the public key of attempt {attempt}; waiting for the keys of {status['sites']}")
            continue
        if status["public_keys"] and site not in status["masked"]:
            payload, manifest = masked_upload(update, status, site, step, config_hash, key, settings)
            client.put_masked_update(experiment, round, step, attempt, payload, manifest)
            say(f"masked update of attempt {attempt} uploaded ({len(payload)} bytes)")
            continue
        waiting = sorted(
            set(status["sites"])
            - set(status["keys_posted"] if not status["public_keys"] else status["masked"])
        )
        stage = "keys" if not status["public_keys"] else "masked updates"
        say(f"attempt {attempt}: waiting for the {stage} of {waiting}")
        if utcnow() >= deadline:
            raise SecAggSiteError(
                f"{where}: the step's deadline {deadline.isoformat()} passed while waiting for {waiting}"
            )
        if unchanged:
            sleep(poll_interval_s)
