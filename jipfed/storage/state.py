"""Experiment state and ``ExperimentStore``, the facade over layout + backend.

``ExperimentState`` is what lets a cleared or crashed central DAG run resume: status, the last
completed step, the current round and, per completed step, which sites were included or rejected
(with reasons) and the step's metrics. It round-trips through JSON and is rewritten atomically.

``ExperimentStore`` enforces the write rules of the layout: the config is write-once, round objects
(global model, updates, aggregate) are write-once — retrying with identical content is accepted,
different content is an error — and nothing under ``rounds/`` is ever deleted or overwritten.
Model and manifest are written model first, manifest last: a manifest's presence marks a complete
pair (the commit), a site whose manifest is missing is not listed as having uploaded, and a payload
without its manifest (a crash between the two writes) is replaced by the site's next upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import Enum
from typing import Any

from jipfed.storage.base import (
    DEFAULT_URL_EXPIRY,
    ModelStore,
    ObjectExistsError,
    ObjectIdentity,
    ObjectNotFoundError,
    StoreError,
    canonical_json,
    check_expiry,
    json_object,
)
from jipfed.storage.layout import ExperimentLayout, check_key, validate_round, validate_slug

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class ConfigConflictError(StoreError):
    """A different config is already stored for this experiment."""


class IntegrityError(StoreError):
    """A stored model does not match its manifest's sha256."""


def sha256_hex(data: bytes) -> str:
    """Lower-case hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def config_hash_of(config: Mapping[str, Any]) -> str:
    """sha256 of the config's canonical JSON (sorted keys, no whitespace, UTF-8)."""
    return sha256_hex(canonical_json(json_object(config, "config")))


class Status(str, Enum):
    """Lifecycle of an experiment: created → running → finished | failed (failed may resume)."""

    CREATED = "created"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


def _int(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class StepRecord:
    """What one completed step did.

    Args:
        step: Step number (0-based, consecutive).
        round: Round the step belongs to (parallel plan: == step).
        included: Sites whose updates went into the result.
        rejected: Site id → reason it was left out.
        metrics: JSON-serialisable numbers (loss, Dice, ...); NaN is refused, use None.
    """

    step: int
    round: int
    included: tuple[str, ...] = ()
    rejected: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _int(self.step, "step")
        validate_round(self.round)
        object.__setattr__(self, "included", tuple(validate_slug(s, "site id") for s in self.included))
        rejected = json_object(self.rejected, "rejected")
        for site, reason in rejected.items():
            validate_slug(site, "site id")
            if not isinstance(reason, str) or not reason:
                raise ValueError(f"rejection reason for site {site!r} must be a non-empty string")
        both = sorted(set(self.included) & set(rejected))
        if both or len(set(self.included)) != len(self.included):
            raise ValueError(f"step {self.step}: a site is listed twice (included/rejected): {both}")
        object.__setattr__(self, "rejected", rejected)
        metrics = json_object(self.metrics, "metrics")
        canonical_json(metrics)  # refuses NaN/Infinity and non-JSON values
        object.__setattr__(self, "metrics", metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "round": self.round,
            "included": list(self.included),
            "rejected": dict(self.rejected),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        data = json_object(data, "step record")
        unknown = sorted(set(data) - {"step", "round", "included", "rejected", "metrics"})
        if unknown:
            raise ValueError(f"unknown step record field(s) {unknown}")
        return cls(
            step=data["step"],
            round=data["round"],
            included=tuple(data.get("included", ())),
            rejected=data.get("rejected", {}),
            metrics=data.get("metrics", {}),
        )


@dataclass(frozen=True)
class ExperimentState:
    """Where an experiment stands. Transitions return a new state; the instance never changes.

    Args:
        experiment: Experiment name (slug).
        config_hash: sha256 of the experiment's config (see :func:`config_hash_of`).
        status: Lifecycle status.
        last_completed_step: None before the first step completes.
        current_round: The round the next step belongs to.
        history: One record per completed step, in order.
        error: Why the experiment failed (status ``failed``), else None.
    """

    experiment: str
    config_hash: str
    status: Status = Status.CREATED
    last_completed_step: int | None = None
    current_round: int = 0
    history: tuple[StepRecord, ...] = ()
    error: str | None = None

    def __post_init__(self) -> None:
        validate_slug(self.experiment, "experiment name")
        if not (len(self.config_hash) == 64 and all(c in "0123456789abcdef" for c in self.config_hash)):
            raise ValueError(f"config_hash must be 64 lower-case hex digits, got {self.config_hash!r}")
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "history", tuple(self.history))
        validate_round(self.current_round)
        expected_last = len(self.history) - 1 if self.history else None
        if self.last_completed_step != expected_last:
            raise ValueError(
                f"last_completed_step {self.last_completed_step!r} disagrees with a history of "
                f"{len(self.history)} step(s)"
            )
        for i, record in enumerate(self.history):
            if record.step != i:
                raise ValueError(f"history entry {i} is step {record.step}; steps must be 0, 1, 2, ...")

    @property
    def next_step(self) -> int:
        """The step number to run next."""
        return 0 if self.last_completed_step is None else self.last_completed_step + 1

    def start(self) -> ExperimentState:
        """created or failed → running (a failed experiment resumes where it stopped)."""
        if self.status is Status.FINISHED:
            raise ValueError(f"experiment {self.experiment!r} is finished; it cannot start again")
        return replace(self, status=Status.RUNNING, error=None)

    def complete_step(self, record: StepRecord, *, next_round: int | None = None) -> ExperimentState:
        """Record step ``next_step`` as done; ``next_round`` defaults to ``record.round + 1``."""
        if self.status is not Status.RUNNING:
            raise ValueError(f"cannot complete a step while the experiment is {self.status.value}")
        if record.step != self.next_step:
            raise ValueError(
                f"step {record.step} completed, but the next step is {self.next_step} "
                "(a step is never repeated or skipped)"
            )
        return replace(
            self,
            last_completed_step=record.step,
            current_round=record.round + 1 if next_round is None else validate_round(next_round),
            history=(*self.history, record),
        )

    def finish(self) -> ExperimentState:
        """running → finished."""
        if self.status is not Status.RUNNING:
            raise ValueError(f"cannot finish an experiment that is {self.status.value}")
        return replace(self, status=Status.FINISHED)

    def fail(self, reason: str) -> ExperimentState:
        """Any status but finished → failed, with ``reason``."""
        if self.status is Status.FINISHED:
            raise ValueError(f"experiment {self.experiment!r} is finished; it cannot fail")
        if not reason:
            raise ValueError("a failure needs a reason")
        return replace(self, status=Status.FAILED, error=reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "experiment": self.experiment,
            "config_hash": self.config_hash,
            "status": self.status.value,
            "last_completed_step": self.last_completed_step,
            "current_round": self.current_round,
            "history": [r.to_dict() for r in self.history],
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentState:
        data = json_object(data, "experiment state")
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported state format {data.get('format')!r}; expected {STATE_FORMAT}")
        fields = {
            "experiment",
            "config_hash",
            "status",
            "last_completed_step",
            "current_round",
            "history",
            "error",
        }
        unknown = sorted(set(data) - fields - {"format"})
        if unknown:
            raise ValueError(f"unknown experiment state field(s) {unknown}")
        return cls(
            experiment=data["experiment"],
            config_hash=data["config_hash"],
            status=Status(data["status"]),
            last_completed_step=data.get("last_completed_step"),
            current_round=data.get("current_round", 0),
            history=tuple(StepRecord.from_dict(r) for r in data.get("history", [])),
            error=data.get("error"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> ExperimentState:
        return cls.from_dict(json.loads(text))


def _check_manifest(manifest: Mapping[str, Any], payload: bytes, round_: int, site: str | None) -> dict:
    """The manifest as a dict; its ``sha256``/``round``/``site`` fields, where present, must agree."""
    data = json_object(manifest, "manifest")
    if "sha256" in data and data["sha256"] != sha256_hex(payload):
        raise ValueError(f"manifest sha256 {data['sha256']!r} does not match the payload's")
    if "round" in data and data["round"] != round_:
        raise ValueError(f"manifest says round {data['round']!r}, but it is stored for round {round_}")
    if site is not None and "site" in data and data["site"] != site:
        raise ValueError(f"manifest says site {data['site']!r}, but it is stored for site {site!r}")
    return data


class ExperimentStore:
    """One experiment's objects in a :class:`ModelStore`, laid out as in :mod:`.layout`.

    Args:
        store: The backend.
        experiment: Experiment name (slug).
    """

    def __init__(self, store: ModelStore, experiment: str) -> None:
        self.store = store
        self.layout = ExperimentLayout(experiment)

    @property
    def experiment(self) -> str:
        return self.layout.experiment

    def __repr__(self) -> str:
        return f"ExperimentStore({self.store!r}, {self.experiment!r})"

    # -- config ------------------------------------------------------------------------------------

    def save_config(self, config: Mapping[str, Any]) -> str:
        """Store the config once and return its hash; saving the same config again is a no-op.

        Raises:
            ConfigConflictError: a different config is already stored.
        """
        data = canonical_json(json_object(config, "config"))
        key = self.layout.config()
        try:
            self.store.put_if_absent_or_same(key, data)
        except ObjectExistsError:
            raise ConfigConflictError(
                f"experiment {self.experiment!r} already has a different config at {key!r} "
                f"(stored sha256 {self.config_hash()}, new {sha256_hex(data)}); the config is "
                "immutable once saved — start a new experiment instead"
            ) from None
        return sha256_hex(data)

    def load_config(self) -> dict[str, Any]:
        return json_object(self.store.get_json(self.layout.config()), "config")

    def config_hash(self) -> str:
        """sha256 of the stored config (its canonical JSON bytes, so ``sha256sum config.json``)."""
        return sha256_hex(self.store.get_bytes(self.layout.config()))

    # -- state -------------------------------------------------------------------------------------

    def load_state(self) -> ExperimentState:
        """The stored state. Raises ObjectNotFoundError, or StoreError if it is corrupt."""
        key = self.layout.state()
        try:
            return ExperimentState.from_dict(self.store.get_json(key))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"experiment state {key!r} is invalid: {exc}") from exc

    def load_or_create_state(self) -> ExperimentState:
        """The stored state, or a new ``created`` one bound to the stored config (resume-safe)."""
        if self.store.exists(self.layout.state()):
            return self.load_state()
        state = ExperimentState(experiment=self.experiment, config_hash=self.config_hash())
        try:
            self.store.put_bytes(self.layout.state(), state.to_json().encode("utf-8"))
        except ObjectExistsError:  # another run created it meanwhile
            return self.load_state()
        return state

    def save_state(self, state: ExperimentState) -> None:
        """Replace the stored state atomically (the only object that is ever overwritten)."""
        if state.experiment != self.experiment:
            raise ValueError(f"state of experiment {state.experiment!r} given to {self.experiment!r}")
        if state.config_hash != self.config_hash():
            raise ValueError(f"state's config_hash {state.config_hash} is not the stored config's")
        self.store.put_bytes(self.layout.state(), state.to_json().encode("utf-8"), overwrite=True)

    # -- global model ------------------------------------------------------------------------------

    def save_global(self, round_: int, payload: bytes, manifest: Mapping[str, Any]) -> None:
        """Store round ``round_``'s global model and manifest (write-once; identical retry ok)."""
        data = _check_manifest(manifest, payload, validate_round(round_), None)
        self.store.put_if_absent_or_same(self.layout.global_model(round_), payload)
        self.record_model_check(self.layout.global_model(round_), data.get("sha256") or sha256_hex(payload))
        self.store.put_if_absent_or_same(self.layout.global_manifest(round_), canonical_json(data))
        log.info("saved global model of round %d (%d bytes)", round_, len(payload))

    def record_model_check(self, model_key: str, sha256: str) -> None:
        """Record that the stored model at ``model_key`` has ``sha256``, with the object's identity now.

        Reading the model back then needs no hashing while its identity is still this one
        (:meth:`checked_model_identity`). Called right after the model's bytes are stored (or
        found to be the same bytes); a later record replaces it.
        """
        record = {"format": 1, "sha256": sha256, "identity": self.store.identity(model_key)}
        self.store.put_bytes(check_key(model_key), canonical_json(record), overwrite=True)

    def checked_model_identity(self, model_key: str, sha256: str | None) -> ObjectIdentity | None:
        """The identity recorded with ``sha256`` for the model at ``model_key``; None when there is
        no such record (hash the bytes instead)."""
        try:
            record = self.store.get_json(check_key(model_key))
        except StoreError:
            return None
        if not isinstance(record, dict) or record.get("format") != 1 or record.get("sha256") != sha256:
            return None
        identity = record.get("identity")
        return dict(identity) if isinstance(identity, dict) else None

    def has_global(self, round_: int) -> bool:
        """Whether round ``round_``'s global model is complete (its manifest exists)."""
        return self.store.exists(self.layout.global_manifest(round_))

    def load_global(self, round_: int) -> tuple[bytes, dict[str, Any]]:
        """``(payload, manifest)``; the manifest's sha256, if any, is verified."""
        return self._load_pair(self.layout.global_model(round_), self.layout.global_manifest(round_))

    # -- site updates ------------------------------------------------------------------------------

    def save_update(self, round_: int, site: str, payload: bytes, manifest: Mapping[str, Any]) -> None:
        """Store ``site``'s update for ``round_``. Never overwrites: a second upload is refused.

        Raises:
            ObjectExistsError: the site already uploaded (part of) an update for this round.
        """
        data = _check_manifest(manifest, payload, validate_round(round_), validate_slug(site, "site id"))
        self._refuse_existing_update(round_, site)
        # A payload without its manifest is a half-written update (a crash between the two writes):
        # it was never committed, so it is replaced.
        self.store.put_bytes(self.layout.update(round_, site), payload, overwrite=True)
        self.commit_update_manifest(round_, site, data)
        log.info("saved update of site %s for round %d (%d bytes)", site, round_, len(payload))

    def commit_update_manifest(self, round_: int, site: str, manifest: Mapping[str, Any]) -> None:
        """Write ``site``'s update manifest: the commit marker, written last and never replaced.

        Raises:
            ObjectExistsError: the manifest exists (the site already uploaded for this round).
        """
        key = self.layout.update_manifest(round_, site)
        try:
            self.store.put_bytes(key, canonical_json(json_object(manifest, "manifest")))
        except ObjectExistsError:
            raise ObjectExistsError(
                key, f"site {site!r} already uploaded an update for round {round_}"
            ) from None

    def update_committed(self, round_: int, site: str) -> bool:
        """Whether ``site``'s update of ``round_`` is complete (its manifest, the commit marker, exists)."""
        return self.store.exists(self.layout.update_manifest(round_, site))

    def _refuse_existing_update(self, round_: int, site: str) -> None:
        if self.update_committed(round_, site):
            raise ObjectExistsError(
                self.layout.update_manifest(round_, site),
                f"site {site!r} already uploaded an update for round {round_}",
            )

    def list_updates(self, round_: int) -> list[str]:
        """Sites with a complete update (manifest present) in ``round_``, sorted."""
        sites = []
        for key in self.store.list(self.layout.updates_prefix(round_)):
            site = self.layout.site_of_update(round_, key)
            if site is not None:
                sites.append(site)
        return sorted(sites)

    def load_update(self, round_: int, site: str) -> tuple[bytes, dict[str, Any]]:
        """``(payload, manifest)`` of ``site``'s update; the manifest's sha256, if any, is verified."""
        return self._load_pair(self.layout.update(round_, site), self.layout.update_manifest(round_, site))

    # -- dispatch and site failures -----------------------------------------------------------------

    def save_dispatch(self, round_: int, step: int, record: Mapping[str, Any]) -> None:
        """Store what the central sent out for ``step``; a re-dispatch (cleared run) replaces it."""
        data = canonical_json(json_object(record, "dispatch record"))
        self.store.put_bytes(self.layout.dispatch(round_, step), data, overwrite=True)

    def load_dispatch(self, round_: int, step: int) -> dict[str, Any] | None:
        """The dispatch record of ``step``, or None when the step was not dispatched yet."""
        key = self.layout.dispatch(round_, step)
        if not self.store.exists(key):
            return None
        return json_object(self.store.get_json(key), f"dispatch record {key!r}")

    def record_site_failure(self, round_: int, site: str, failure: Mapping[str, Any]) -> dict[str, Any]:
        """Record why ``site`` sends no update in ``round_``; the first record of a dispatch attempt wins.

        ``failure["attempt"]`` (default 0) is the dispatch attempt it belongs to: a record of an
        earlier attempt (before the step was re-dispatched) is replaced, one of the same attempt is
        kept. Returns the stored record.
        """
        key = self.layout.site_failure(round_, site)
        record = json_object(failure, "site failure")
        data = canonical_json(record)
        try:
            self.store.put_bytes(key, data)
        except ObjectExistsError:
            stored = json_object(self.store.get_json(key), f"site failure {key!r}")
            if int(stored.get("attempt", 0)) >= int(record.get("attempt", 0)):
                return stored
            self.store.put_bytes(key, data, overwrite=True)
        return record

    def site_failures(self, round_: int) -> dict[str, dict[str, Any]]:
        """``site -> failure record`` for every failure recorded in ``round_``."""
        head = self.layout.failures_prefix(round_)
        failures = {}
        for key in self.store.list(head):
            name = key[len(head) :]
            if name.endswith(".json") and "/" not in name:
                failures[name[: -len(".json")]] = json_object(self.store.get_json(key), key)
        return failures

    def record_cohort(self, round_: int, site: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """Record the cohort size ``site`` reported for ``round_``; the first report stays. Returns the stored one."""
        key = self.layout.cohort(round_, site)
        data = json_object(record, "cohort report")
        try:
            self.store.put_bytes(key, canonical_json(data))
        except ObjectExistsError:
            return json_object(self.store.get_json(key), f"cohort report {key!r}")
        return data

    def reported_cohort(self, round_: int, site: str) -> int | None:
        """The cohort size ``site`` reported for ``round_``, or None when it reported none."""
        key = self.layout.cohort(round_, site)
        if not self.store.exists(key):
            return None
        value = json_object(self.store.get_json(key), f"cohort report {key!r}").get("n_cases")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StoreError(f"cohort report {key!r} holds no valid n_cases: {value!r}")
        return value

    # -- aggregate and final -----------------------------------------------------------------------

    def save_aggregate(self, round_: int, aggregate: Mapping[str, Any]) -> None:
        """Store round ``round_``'s aggregate.json (write-once; identical retry ok)."""
        data = canonical_json(json_object(aggregate, "aggregate"))
        self.store.put_if_absent_or_same(self.layout.aggregate(validate_round(round_)), data)

    def load_aggregate(self, round_: int) -> dict[str, Any]:
        return json_object(self.store.get_json(self.layout.aggregate(round_)), "aggregate")

    def save_final(self, name: str, data: bytes, *, overwrite: bool = False) -> str:
        """Store a final artefact (model, model card, report, plot) as ``final/<name>``; returns the key."""
        key = self.layout.final(name)
        self.store.put_bytes(key, data, overwrite=overwrite)
        return key

    # -- site access -------------------------------------------------------------------------------

    def issue_site_urls(
        self, round_: int, site: str, expires: timedelta | float = DEFAULT_URL_EXPIRY
    ) -> dict[str, str]:
        """Presigned URLs for one site and round, each scoped to exactly one object and method.

        Returns ``{"global_get": ..., "update_put": ..., "manifest_put": ...}``: GET of the round's
        global model, PUT of the site's own update and manifest. The site needs no credentials.

        Raises:
            ObjectNotFoundError: the round's global model is not complete yet.
            ObjectExistsError: the site already uploaded for this round (a PUT URL would overwrite).
            ValueError: ``expires`` outside 1 s to 7 days.
            PresignNotSupportedError: the backend cannot presign (local folder).
        """
        lifetime = check_expiry(expires)
        validate_round(round_)
        validate_slug(site, "site id")
        if not self.has_global(round_):
            raise ObjectNotFoundError(self.layout.global_manifest(round_))
        self._refuse_existing_update(round_, site)
        urls = {
            "global_get": self.store.presign_get(self.layout.global_model(round_), lifetime),
            "update_put": self.store.presign_put(self.layout.update(round_, site), lifetime),
            "manifest_put": self.store.presign_put(self.layout.update_manifest(round_, site), lifetime),
        }
        log.info("issued URLs for site %s, round %d, valid %s", site, round_, lifetime)
        return urls

    def _load_pair(self, model_key: str, manifest_key: str) -> tuple[bytes, dict[str, Any]]:
        manifest = json_object(self.store.get_json(manifest_key), f"manifest {manifest_key!r}")
        payload = self.store.get_bytes(model_key)
        expected = manifest.get("sha256")
        if expected is not None and expected != sha256_hex(payload):
            raise IntegrityError(
                f"{model_key!r} has sha256 {sha256_hex(payload)}, its manifest says {expected}"
            )
        return payload, manifest
