"""Computing a step's output model from its decided updates (and the server strategy state).

The updates are read from the store as :class:`~jipfed.federation.payload_stream.StoredUpdate`
sources, one tensor per access, not hashed again (their stored identity is compared with the one
recorded at their arrival check), so the strategy aggregates them in the bounded-pass path of
:func:`jipfed.federation.aggregate.mean_weights` (or tensor by tensor for the robust reducers),
summing on every CPU (:func:`~jipfed.federation.sum_threads.sum_threads`) while the finished
tensors are written and hashed on the hash pipeline's threads. A plain FedAvg step whose files
share one layout (the usual case) skips the tensors altogether: :mod:`jipfed.federation.flat_mean`
sums the files' data sections segment by segment and hands each finished segment to the output
file in order (same bytes as the tensor-by-tensor mean).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from jipfed.federation.arrival import unchanged_check, unchanged_identity
from jipfed.federation.bounds import Clip, scaled
from jipfed.federation.codec import EncodedFile, SafetensorsWriter, write_global_file
from jipfed.federation.decision import Decision
from jipfed.federation.experiment import ExperimentConfig
from jipfed.federation.flat_mean import fits_one_pass, flat_mean, shared_layout
from jipfed.federation.payload_stream import HashPipeline, PayloadEntry, StoredUpdate
from jipfed.federation.plans import PlanStep
from jipfed.federation.round_io import output_keys, stored_path
from jipfed.federation.strategies import Strategy, StrategyState
from jipfed.federation.strategies.base import checked_updates
from jipfed.federation.strategies.fedavg import FedAvg
from jipfed.federation.sum_threads import sum_threads
from jipfed.federation.update import ModelUpdate, UpdateManifest
from jipfed.federation.validation import UpdateRejected
from jipfed.storage.base import StoreError
from jipfed.storage.state import ExperimentStore, IntegrityError

logger = logging.getLogger(__name__)

#: Threads that hash the start and output models while they are read and written (sha256 costs more
#: than the sum).
HASH_THREADS = min(4, os.cpu_count() or 1)


def hash_pipeline(start: StoredUpdate) -> HashPipeline:
    """Background hashing for one step; it may hold a quarter of a model of buffers not hashed yet."""
    return HashPipeline(HASH_THREADS, start.tensor_bytes[1] // 4)


def strategy_for(exp_store: ExperimentStore, config: ExperimentConfig, round_: int) -> Strategy:
    """The strategy with the server state it had after round ``round_ - 1``."""
    strategy = config.make_strategy()
    if round_ == 0:
        return strategy
    lay = exp_store.layout
    try:
        payload = exp_store.store.get_bytes(lay.strategy_state(round_ - 1))
        text = exp_store.store.get_bytes(lay.strategy_state_manifest(round_ - 1))
        strategy.load_state_dict(StrategyState.from_payload(payload, text))
    except (StoreError, ValueError) as exc:
        raise IntegrityError(
            f"experiment {config.name!r}: server strategy state after round {round_ - 1} is missing or invalid: {exc}"
        ) from exc
    return strategy


def compute_output(
    exp_store: ExperimentStore,
    config: ExperimentConfig,
    config_hash: str,
    ps: PlanStep,
    start: StoredUpdate,
    decision: Decision,
    workdir: Path,
    on_exclusion: Callable[[Decision], None],
    hashing: HashPipeline | None = None,
    output: Path | None = None,
) -> tuple[EncodedFile, StrategyState | None]:
    """The step's output model (the file ``output``, default in ``workdir``) and, for parallel plans, the new server state.

    Each included update is read once, from the store, while it is aggregated. Its stored identity
    (size and mtime / inode, or ETag) is compared with the one recorded at its arrival check before
    and after the read, instead of hashing its bytes again; an update whose identity is not the
    recorded one (or none was recorded) is hashed on the way, as the start model is, and compared
    with its arrival digest. One that changed since its arrival check is moved from
    ``decision.included`` to ``decision.rejected`` with the reason, ``on_exclusion(decision)`` is
    called (it raises when the step cannot go on without it, e.g. QuorumNotMet) and the others are
    aggregated again. A strategy that finishes tensors one by one (FedAvg) hands each to the output
    file as it is final, so writing and hashing the output overlap the sum of the next tensors.

    Raises:
        IntegrityError: the start model's bytes differ from its manifest.
    """

    def attempt() -> tuple[EncodedFile, StrategyState | None]:
        path = output or workdir / "output.safetensors"
        # the output has the start model's specs: its tensors are written (and hashed) as they are final
        with (
            SafetensorsWriter(path, start.manifest.tensors, hashing, check_finite=True) as writer,
            sum_threads(),  # each large tensor is summed on every CPU at once
        ):
            weights, used, state = aggregated(writer)
            order = [n for n in start.manifest.tensors if n in weights] + [
                n for n in weights if n not in start.manifest.tensors
            ]
            encoded = write_global_file(
                {name: weights[name] for name in order},
                path,
                experiment=config.name,
                round=output_keys(exp_store, ps)[2],
                config_hash=config_hash,
                n_samples=sum(s.n_samples for s in used),
                hashing=hashing,
                writer=writer,
            )
        return encoded, state

    def aggregated(
        writer: SafetensorsWriter,
    ) -> tuple[dict[str, torch.Tensor], list[StoredUpdate], StrategyState | None]:
        """The output weights (some already handed to ``writer``), the updates used, the new state."""
        lay = exp_store.layout
        state: StrategyState | None = None
        with ExitStack() as stack:
            sources: list[StoredUpdate] = []
            for site in decision.included:
                manifest = decision.manifests.get(site) or _stored_manifest(exp_store, ps.round, site)
                identity = unchanged_identity(exp_store, manifest)
                path = stored_path(exp_store, lay.update(ps.round, site), workdir)
                if identity is None:  # hashed as read, compared with the arrival digest
                    source = StoredUpdate(path, manifest, hashing)
                else:  # still the bytes checked at arrival: not hashed again
                    unchanged = unchanged_check(exp_store, manifest, identity)
                    source = StoredUpdate(path, manifest, digest=False, unchanged=unchanged)
                sources.append(stack.enter_context(source))
            if config.plan == "parallel":
                used: list[StoredUpdate] = sources
                views = [
                    _clipped(s, start, decision.clips[s.site]) if s.site in decision.clips else s
                    for s in sources
                ]
                strategy = strategy_for(exp_store, config, ps.round)
                flat = None if decision.clips else flat_plan(strategy, start, sources, writer, ps.round)
                if flat is not None:
                    weights = flat_mean(flat, start, sources, writer, integer_mode=strategy.integer_mode)
                else:
                    weights = strategy.aggregate_streamed(start.tensors, views, ps.round, writer.put)
                state = strategy.state_dict()
            elif sources:  # a cyclic hop passes its (only) site's model on
                used = sources[:1]
                weights = dict(used[0].tensors.items())
            else:
                used = []
                weights = dict(start.tensors.items())
            for source in [*used, start]:
                source.verify()  # hashed, or still the checked object after the reads
        return weights, used, state

    while True:
        try:
            return attempt()
        except UpdateRejected as exc:
            if exc.site not in decision.included:
                raise IntegrityError(f"stored model {start.path} is invalid: {exc.reason}") from None
            logger.warning(
                "experiment %s: round %d: excluded %s while aggregating: %s",
                config.name,
                ps.round,
                exc.site,
                exc.reason,
            )
            decision.included.remove(exc.site)
            decision.manifests.pop(exc.site, None)
            decision.clips.pop(exc.site, None)
            decision.rejected[exc.site] = exc.reason
            on_exclusion(decision)


def flat_plan(
    strategy: Strategy,
    start: StoredUpdate,
    sources: list[StoredUpdate],
    writer: SafetensorsWriter,
    round_: int,
) -> list[PayloadEntry] | None:
    """The shared layout when the step's mean can run over the files' data sections at once
    (:mod:`jipfed.federation.flat_mean`: a plain FedAvg mean, no clipping, same layouts), else None."""
    if not isinstance(strategy, FedAvg) or strategy.plain_mean_mode() is None:
        return None
    list(checked_updates(sources, round_))  # the checks FedAvg makes: this round, each site once
    if not fits_one_pass(len(sources) + 1, start.tensor_bytes[1]):
        return None
    return shared_layout(start, sources, writer)


def _stored_manifest(exp_store: ExperimentStore, round_: int, site: str) -> UpdateManifest:
    """A committed update's manifest (the decision was recorded before a restart)."""
    try:
        return UpdateManifest.from_dict(
            exp_store.store.get_json(exp_store.layout.update_manifest(round_, site))
        )
    except (StoreError, ValueError) as exc:
        raise UpdateRejected(site, round_, f"invalid manifest: {exc}") from None


def _clipped(source: StoredUpdate, start: StoredUpdate, clip: Clip) -> ModelUpdate:
    """A clipped site's update, scaled in memory (clipping is the exception: one model at a time)."""
    tensors = dict(source.tensors.items())  # in file order: hashed as read
    loaded = ModelUpdate(tensors={n: tensors[n] for n in source.manifest.tensors}, manifest=source.manifest)
    return scaled(loaded, start.tensors, clip.scale)
