"""An update's check at arrival: the checker for a step's upload and the record kept next to the update.

The central checks each update once, while its bytes stream into the store
(:class:`~jipfed.federation.payload_stream.PayloadChecker`), and records the result
(``updates/<site>.checked``: sha256, size, delta norm) before it commits the update's manifest.
The record holds the stored object's identity (size and mtime / inode, or ETag) taken right after
the bytes were stored. Deciding a step reads these records, not the updates; aggregating compares
the identities instead of hashing the bytes again, so each update is read
once after its arrival (:func:`unchanged_check` gives the check a
:class:`~jipfed.federation.payload_stream.StoredUpdate` makes after its reads). Only a committed
update without a record for its bytes (written around the upload path) is checked from the store,
once, and recorded.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from jipfed.federation.codec import parse_manifest
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.payload_stream import HASH_CHUNK, ArrivalCheck, PayloadChecker
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import (
    check_sample_bound,
    expected_update,
    identity_change,
    input_keys,
    load_weights,
    needs_start_weights,
    open_model,
    stored_path,
)
from jipfed.federation.update import TensorSpec, UpdateManifest
from jipfed.storage.base import StoreError, canonical_json
from jipfed.storage.layout import validate_slug
from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

#: Suffix of the arrival record next to ``updates/<site>.safetensors`` (not ``.json``: not a manifest).
ARRIVAL_SUFFIX = ".checked"


def arrival_key(exp_store: ExperimentStore, round_: int, site: str) -> str:
    """Key of the arrival record of ``site``'s update of ``round_``."""
    return f"{exp_store.layout.updates_prefix(round_)}{validate_slug(site, 'site id')}{ARRIVAL_SUFFIX}"


def start_expectation(
    exp_store: ExperimentStore, config: ExperimentConfig, config_hash: str, ps: PlanStep
) -> tuple[Mapping[str, TensorSpec], dict[str, torch.Tensor] | None]:
    """The specs of the step's start model, and its weights when checking an update needs them."""
    keys = input_keys(exp_store, ps)
    if not needs_start_weights(config):
        return UpdateManifest.from_dict(exp_store.store.get_json(keys[1])).tensors, None
    with (
        tempfile.TemporaryDirectory(prefix="jipfed-start-") as tmp,
        open_model(exp_store, keys, config_hash, Path(tmp)) as start,
    ):
        return start.manifest.tensors, load_weights(start)


def arrival_checker(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    manifest_json: str | bytes,
    start: tuple[Mapping[str, TensorSpec], Mapping[str, torch.Tensor] | None],
) -> PayloadChecker:
    """The checker of ``site``'s payload for ``round_``, after checking its manifest and sample count.

    Raises:
        UpdateRejected: the manifest is invalid, not for this step, or claims too many samples.
    """
    specs, reference = start
    expected = expected_update(exp_store, config, config_hash, round_, site, specs, reference)
    manifest = parse_manifest(manifest_json, expected)
    check_sample_bound(exp_store, config, manifest)
    return PayloadChecker(manifest, expected)


def record_arrival(exp_store: ExperimentStore, check: ArrivalCheck) -> None:
    """Store the arrival check, with the stored update's identity, next to the update.

    Called once the checked bytes are stored and before the update's manifest commits it (a retry
    replaces the record).
    """
    identity = exp_store.store.identity(exp_store.layout.update(check.round, check.site))
    key = arrival_key(exp_store, check.round, check.site)
    record = replace(check, identity=identity).to_dict()
    exp_store.store.put_bytes(key, canonical_json(record), overwrite=True)


def unchanged_identity(
    exp_store: ExperimentStore, manifest: UpdateManifest
) -> Mapping[str, int | str] | None:
    """The identity recorded at the arrival check of this manifest's bytes, if the stored update still has it.

    Then the update is still the bytes checked at arrival and needs no hashing again: a rewrite (in
    place or by replacement, locally or on S3) changes the identity
    (:meth:`jipfed.storage.base.ModelStore.identity`). None (logged) when no identity was recorded
    or it differs, e.g. the store was copied elsewhere: the caller hashes the bytes again.
    """
    check = recorded_arrival(exp_store, manifest)
    change = "no identity was recorded" if check is None or check.identity is None else None
    if check is not None and check.identity is not None:
        change = identity_change(
            exp_store, exp_store.layout.update(manifest.round, manifest.site), check.identity
        )
        if change is None:
            return check.identity
    logger.info(
        "experiment %s: round %d: the stored update of %s: %s since its arrival check; hashing it again",
        exp_store.experiment,
        manifest.round,
        manifest.site,
        change,
    )
    return None


def unchanged_check(
    exp_store: ExperimentStore, manifest: UpdateManifest, identity: Mapping[str, int | str]
) -> Callable[[], str | None]:
    """How the stored update differs from ``identity`` when called (None: unchanged), for :class:`StoredUpdate`."""
    return functools.partial(
        identity_change, exp_store, exp_store.layout.update(manifest.round, manifest.site), identity
    )


def recorded_arrival(exp_store: ExperimentStore, manifest: UpdateManifest) -> ArrivalCheck | None:
    """The arrival check recorded for exactly this manifest's bytes; None when there is none."""
    key = arrival_key(exp_store, manifest.round, manifest.site)
    try:
        check = ArrivalCheck.from_dict(exp_store.store.get_json(key))
    except (StoreError, ValueError):
        return None
    same = (check.site, check.round, check.sha256) == (manifest.site, manifest.round, manifest.sha256)
    return check if same else None


def check_stored(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    start: tuple[Mapping[str, TensorSpec], Mapping[str, torch.Tensor] | None],
    workdir: Path,
) -> ArrivalCheck:
    """Check a committed update that has no arrival record from the store (one read), and record it.

    Raises:
        UpdateRejected: as :func:`arrival_checker` and :meth:`PayloadChecker.finish`.
        StoreError: the update cannot be read.
    """
    lay = exp_store.layout
    manifest_json = exp_store.store.get_bytes(lay.update_manifest(round_, site))
    checker = arrival_checker(exp_store, config, config_hash, round_, site, manifest_json, start)
    logger.info(
        "experiment %s: round %d: checking the update of %s from the store", config.name, round_, site
    )
    with open(stored_path(exp_store, lay.update(round_, site), workdir), "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            checker.feed(chunk)
    check = checker.finish()
    record_arrival(exp_store, check)
    return check
