"""Where a plan step's models and decision record live in the store, and reading / writing them.

Shared by the round actions (start, accept, decide, compute, close, finalize): the keys of a step's
input and output models, opening a stored model for reading (:class:`StoredUpdate`), write-once of
a model file, what an update of a step must look like (:class:`ExpectedUpdate`) and the
sample-count bound.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from jipfed.federation.bounds import sample_count_problem
from jipfed.federation.codec import EncodedFile
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.payload_stream import StoredUpdate
from jipfed.federation.plans import PlanStep
from jipfed.federation.tickets import ProtocolError
from jipfed.federation.update import TensorSpec, UpdateManifest
from jipfed.federation.validation import ExpectedUpdate, UpdateRejected, check_manifest
from jipfed.storage.base import ObjectExistsError, PendingObject, StoreError
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.state import ExperimentState, ExperimentStore, IntegrityError, Status, sha256_hex

logger = logging.getLogger(__name__)


def running_state(exp_store: ExperimentStore, what: str) -> ExperimentState:
    state = exp_store.load_state()
    if state.status is not Status.RUNNING:
        raise ProtocolError(
            f"experiment {exp_store.experiment!r} is {state.status.value}, cannot {what}"
            + (f" (error: {state.error})" if state.error else "")
        )
    return state


def input_keys(exp_store: ExperimentStore, ps: PlanStep) -> tuple[str, str]:
    """Keys (model, manifest) of the model step ``ps`` starts from."""
    lay = exp_store.layout
    if ps.hop:
        return lay.hop_model(ps.round, ps.hop - 1), lay.hop_manifest(ps.round, ps.hop - 1)
    return lay.global_model(ps.round), lay.global_manifest(ps.round)


def output_keys(exp_store: ExperimentStore, ps: PlanStep) -> tuple[str, str, int]:
    """Keys (model, manifest) of the model step ``ps`` produces, and that model's round."""
    lay = exp_store.layout
    if ps.is_last_in_round:
        nxt = ps.round + 1
        return lay.global_model(nxt), lay.global_manifest(nxt), nxt
    return lay.hop_model(ps.round, ps.hop or 0), lay.hop_manifest(ps.round, ps.hop or 0), ps.round


def decision_record_key(exp_store: ExperimentStore, ps: PlanStep) -> str:
    if ps.is_last_in_round:
        return exp_store.layout.aggregate(ps.round)
    return exp_store.layout.hop_record(ps.round, ps.hop or 0)


def stored_path(exp_store: ExperimentStore, key: str, workdir: Path) -> Path:
    """A local file holding the object ``key``: the store's own file, or a copy in ``workdir``."""
    store = exp_store.store
    if isinstance(store, LocalFolderStore):
        return Path(store.uri(key))
    path = workdir / key.replace("/", "__")
    path.write_bytes(store.get_bytes(key))
    return path


def open_model(
    exp_store: ExperimentStore, keys: tuple[str, str], config_hash: str, workdir: Path
) -> StoredUpdate:
    """A stored global / hop model, opened for reading (checked by ``verify()`` after the reads).

    While the model object still has the identity recorded with its sha256 when it was stored
    (:meth:`~jipfed.storage.state.ExperimentStore.record_model_check`), its bytes are not hashed:
    ``verify()`` compares the identity again. Otherwise they are hashed as read and compared with
    the manifest's sha256.

    Raises:
        IntegrityError: the manifest is invalid or not this experiment's, or the payload's header
            does not match it.
    """
    model_key, manifest_key = keys
    try:
        manifest = UpdateManifest.from_dict(exp_store.store.get_json(manifest_key))
        expected = ExpectedUpdate.for_global(
            experiment=exp_store.experiment,
            round=manifest.round,
            config_hash=config_hash,
            tensors=manifest.tensors,
        )
        check_manifest(manifest, expected)
        if manifest.sha256 is None:
            raise UpdateRejected(manifest.site, manifest.round, "manifest has no sha256")
        identity = exp_store.checked_model_identity(model_key, manifest.sha256)
        change = (
            "no check was recorded" if identity is None else identity_change(exp_store, model_key, identity)
        )
        path = stored_path(exp_store, model_key, workdir)
        if identity is None or change is not None:
            logger.info("stored model %r: %s since it was stored; hashing it", model_key, change)
            return StoredUpdate(path, manifest)
        unchanged = functools.partial(identity_change, exp_store, model_key, identity)
        return StoredUpdate(path, manifest, digest=False, unchanged=unchanged)
    except (ValueError, UpdateRejected) as exc:
        raise IntegrityError(f"stored model {model_key!r} is invalid: {exc}") from exc


def load_weights(model: StoredUpdate) -> dict[str, torch.Tensor]:
    """All tensors of a stored model, checked against the sha256 of its manifest."""
    weights = dict(model.tensors.items())
    try:
        model.verify()
    except UpdateRejected as exc:
        raise IntegrityError(f"stored model {model.path} is invalid: {exc.reason}") from None
    return {name: weights[name] for name in model.manifest.tensors}


def identity_change(exp_store: ExperimentStore, key: str, identity: Mapping[str, int | str]) -> str | None:
    """How the stored object's identity differs from ``identity`` (e.g. "its mtime_ns changed"); None if not."""
    try:
        now = exp_store.store.identity(key)
    except StoreError as exc:
        return f"its identity cannot be read ({exc})"
    if now == dict(identity):
        return None
    return (
        "its "
        + ", ".join(sorted(k for k in set(now) | set(identity) if now.get(k) != identity.get(k)))
        + " changed"
    )


def put_file_once(
    exp_store: ExperimentStore, key: str, encoded: EncodedFile, pending: PendingObject | None = None
) -> None:
    """Write-once of a model file, as ``put_if_absent_or_same`` (a rerun finds the same bytes); records its check.

    ``pending``: ``encoded.path`` is this pending object's file, published in place (not copied).
    """
    store = exp_store.store
    try:
        if pending is not None and pending.path == encoded.path:
            pending.commit()
        else:
            with open(encoded.path, "rb") as fh:
                store.put_stream(key, fh, encoded.size)
    except ObjectExistsError:
        if sha256_hex(store.get_bytes(key)) != encoded.manifest.sha256:
            raise ObjectExistsError(key, "it holds different content") from None
    exp_store.record_model_check(key, encoded.manifest.sha256 or "")


def put_once(exp_store: ExperimentStore, key: str, data: bytes) -> None:
    exp_store.store.put_if_absent_or_same(key, data)


def update_kind(config: ExperimentConfig) -> str:
    return "weights" if config.plan == "cyclic" else "delta"


def needs_start_weights(config: ExperimentConfig) -> bool:
    """Whether checking an update needs the start weights (to bound the norm of a weights update)."""
    return config.max_update_norm is not None and update_kind(config) == "weights"


def expected_update(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    round_: int,
    site: str,
    specs: Mapping[str, TensorSpec],
    reference: Mapping[str, torch.Tensor] | None = None,
) -> ExpectedUpdate:
    """What ``site``'s update of ``round_`` must be (``reference``: see :func:`needs_start_weights`)."""
    return ExpectedUpdate(
        tensors=specs,
        reference=reference,
        experiment=exp_store.experiment,
        round=round_,
        site=site,
        config_hash=config_hash,
        kinds=(update_kind(config),),
        min_samples=1,
        max_delta_norm=config.max_update_norm,
    )


def check_sample_bound(exp_store: ExperimentStore, config: ExperimentConfig, update: UpdateManifest) -> None:
    """UpdateRejected when the update (manifest) claims more cases than its site's cohort or the configured cap."""
    cohort = exp_store.reported_cohort(update.round, update.site)
    problem = sample_count_problem(update.n_samples, config.max_site_samples, cohort)
    if problem is not None:
        raise UpdateRejected(update.site, update.round, problem)
