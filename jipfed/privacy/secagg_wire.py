"""Secure aggregation over the wire: the central's side, kept in the model store.

Per round (and dispatch attempt ``d`` of its step) the central runs secagg *attempts* ``a = 0, 1, ...``::

    rounds/<r>/secagg/d<d>/a<a>/sites.json               the attempt's sites (attempt 0: the ticket's)
    rounds/<r>/secagg/d<d>/a<a>/keys/<site>.json         {"site", "public_key" (base64 X25519), "at"}, write-once
    rounds/<r>/secagg/d<d>/a<a>/masked/<site>.safetensors  one uint64 tensor "masked" (n float weights + 1)
    rounds/<r>/secagg/d<d>/a<a>/masked/<site>.json       its manifest (commit marker, written last)
    rounds/<r>/secagg/d<d>/a<a>/failed.json              {"dropped": {site: reason}, "at"}: the attempt failed

A site posts its key for the current attempt, reads the attempt's key set once every site of the
attempt posted one, masks (:func:`jipfed.privacy.secagg.masked_vector`) and uploads the masked
vector. An attempt is *complete* when every site of it uploaded. It *fails* when a site of it
reported a failure, when, ``key_timeout_s`` after the first key of the attempt arrived, a site of it
has posted no key (it dropped out before key agreement: the others do not wait for the step's
deadline), or when, ``upload_timeout_s`` after the last key arrived, a site that posted its key has
not uploaded (it dropped out after key agreement); :func:`advance` then records who dropped and why
and opens attempt ``a + 1`` without them (fresh keys; the masked vectors of a failed attempt
are never combined with another's) if they still make the quorum (``min_sites``, at least 2): an
attempt that could not be aggregated would only reveal a sum. No seed recovery (SecAgg+): a drop-out costs a retry.

Nothing here reads an unmasked update: the central stores masked vectors only and learns the sum
(:func:`unmask_attempt`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from jipfed.federation.dispatch import Dispatch, current_dispatch, load_dispatch, utcnow
from jipfed.federation.tickets import UpdateRefused, load_config
from jipfed.federation.update import UpdateManifest
from jipfed.privacy.secagg import PUBLIC_KEY_BYTES, unmask_mean
from jipfed.privacy.secure_dp import check_share, noise_share
from jipfed.privacy.settings import SecureAggregation
from jipfed.storage.base import ObjectExistsError
from jipfed.storage.layout import validate_slug
from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

MASKED_FORMAT = 1
#: The one tensor of a masked upload.
MASKED_TENSOR = "masked"
#: What a site signs for a masked upload (``jipfed.federation.signing.statement`` purpose).
MASKED_PURPOSE = "jipfed-secagg-masked-update-v1"
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Fields of a masked upload's manifest (all required; nothing else is accepted).
MANIFEST_FIELDS = (
    "format", "experiment", "round", "step", "dispatch_attempt", "attempt", "site", "config_hash",
    "sha256", "length", "fraction_bits", "metrics", "noise",
)  # fmt: skip


def settings_of(privacy: Mapping[str, Any]) -> SecureAggregation | None:
    """The experiment's secure-aggregation settings (``config.privacy``), None when it is off."""
    part = privacy.get("secure_aggregation") if privacy else None
    return SecureAggregation(**part) if part else None


def secure_settings(exp_store: ExperimentStore) -> SecureAggregation | None:
    """:func:`settings_of` the stored experiment config."""
    return settings_of(exp_store.load_config().get("privacy") or {})


def seed_context(experiment: str, round_: int, dispatch_attempt: int, attempt: int) -> str:
    """What an attempt's pair seeds are bound to (:func:`jipfed.privacy.secagg.pair_seed`)."""
    return f"{experiment}|round {round_}|dispatch {dispatch_attempt}|attempt {attempt}"


def vector_length(manifest: UpdateManifest) -> int:
    """Elements of a masked vector for a model described by ``manifest``: its float values + the weight."""
    return sum(spec.numel for spec in manifest.tensors.values() if spec.dtype in FLOAT_DTYPES) + 1


# -- layout ----------------------------------------------------------------------------------------


def _round_prefix(exp_store: ExperimentStore, round_: int, dispatch_attempt: int) -> str:
    return f"{exp_store.layout.round_prefix(round_)}secagg/d{int(dispatch_attempt)}/"


def attempt_prefix(exp_store: ExperimentStore, round_: int, dispatch_attempt: int, attempt: int) -> str:
    return f"{_round_prefix(exp_store, round_, dispatch_attempt)}a{int(attempt)}/"


def key_key(prefix: str, site: str) -> str:
    return f"{prefix}keys/{validate_slug(site, 'site id')}.json"


def masked_key(prefix: str, site: str, sha256: str) -> str:
    """The masked vector's key: named by its sha256, so two uploads of one site that race never
    write the same object (the manifest, written last and only once, names the one that counts)."""
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"masked update of {site!r}: sha256 {sha256[:80]!r} is not 64 lowercase hex digits")
    return f"{prefix}masked/{validate_slug(site, 'site id')}.{sha256}.safetensors"


def masked_manifest_key(prefix: str, site: str) -> str:
    return f"{prefix}masked/{validate_slug(site, 'site id')}.json"


# -- the attempt ----------------------------------------------------------------------------------


@dataclass
class AttemptView:
    """What the store says about one secagg attempt of a round."""

    round: int
    dispatch_attempt: int
    attempt: int
    sites: tuple[str, ...]
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    masked: tuple[str, ...] = ()
    failed: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def keys_complete(self) -> bool:
        return set(self.keys) >= set(self.sites)

    @property
    def complete(self) -> bool:
        return self.failed is None and set(self.masked) >= set(self.sites)

    @property
    def stage(self) -> str:
        """``d<dispatch>/a<attempt>/<open|keys|complete|failed>``: what a waiting site waits to change."""
        if self.failed:
            state = "failed"
        elif self.complete:
            state = "complete"
        else:
            state = "keys" if self.keys_complete else "open"
        return f"d{self.dispatch_attempt}/a{self.attempt}/{state}"

    def public_keys(self) -> dict[str, str] | None:
        """site -> base64 public key, once every site of the attempt posted one (else None)."""
        return {s: self.keys[s]["public_key"] for s in self.sites} if self.keys_complete else None

    def to_dict(self, experiment: str) -> dict[str, Any]:
        return {
            "experiment": experiment,
            "round": self.round,
            "dispatch_attempt": self.dispatch_attempt,
            "attempt": self.attempt,
            "sites": list(self.sites),
            "keys_posted": sorted(self.keys),
            "public_keys": self.public_keys(),
            "masked": list(self.masked),
            "complete": self.complete,
            "failed": self.failed,
            "history": self.history,
            "stage": self.stage,
        }


def _load(
    exp_store: ExperimentStore, dispatch: Dispatch, attempt: int, history: list[dict[str, Any]]
) -> AttemptView:
    store = exp_store.store
    prefix = attempt_prefix(exp_store, dispatch.ticket.round, dispatch.attempt, attempt)
    sites = tuple(store.get_json(f"{prefix}sites.json")["sites"])
    keys = {s: store.get_json(key_key(prefix, s)) for s in sites if store.exists(key_key(prefix, s))}
    masked = tuple(s for s in sites if store.exists(masked_manifest_key(prefix, s)))
    failed = store.get_json(f"{prefix}failed.json") if store.exists(f"{prefix}failed.json") else None
    return AttemptView(dispatch.ticket.round, dispatch.attempt, attempt, sites, keys, masked, failed, history)


def _put_once_json(exp_store: ExperimentStore, key: str, obj: Any) -> None:
    """Write-once; a concurrent writer's object wins (all writers derive it from the same state)."""
    with contextlib.suppress(ObjectExistsError):
        exp_store.store.put_json(key, obj)


def current_attempt(exp_store: ExperimentStore, dispatch: Dispatch) -> AttemptView:
    """The latest attempt of ``dispatch``'s round (attempt 0 opened with the ticket's sites), with the
    failed attempts before it in ``history``."""
    round_, d = dispatch.ticket.round, dispatch.attempt
    first = f"{attempt_prefix(exp_store, round_, d, 0)}sites.json"
    if not exp_store.store.exists(first):
        _put_once_json(exp_store, first, {"sites": sorted(dispatch.ticket.sites), "reason": "first attempt"})
    history: list[dict[str, Any]] = []
    attempt = 0
    while True:
        view = _load(exp_store, dispatch, attempt, list(history))
        nxt = f"{attempt_prefix(exp_store, round_, d, attempt + 1)}sites.json"
        if view.failed is None or not exp_store.store.exists(nxt):
            return view
        history.append({"attempt": attempt, "sites": list(view.sites), **view.failed})
        attempt += 1


def _dropped(
    exp_store: ExperimentStore,
    dispatch: Dispatch,
    view: AttemptView,
    settings: SecureAggregation,
    now: datetime,
) -> dict[str, str]:
    """Sites of ``view`` that will not complete it, and why."""
    dropped = {}
    for site, failure in exp_store.site_failures(view.round).items():
        if site in view.sites and int(failure.get("attempt", 0)) >= dispatch.attempt:
            dropped[site] = f"reported a failure: {failure.get('reason')}"
    if view.keys and not view.keys_complete:
        first = min(datetime.fromisoformat(k["at"]) for k in view.keys.values())
        if now - first > timedelta(seconds=settings.key_timeout_s):
            for site in sorted(set(view.sites) - set(view.keys) - set(dropped)):
                dropped[site] = (
                    f"posted no key within {settings.key_timeout_s:g} s after the first key of attempt "
                    f"{view.attempt} (dropped out before key agreement)"
                )
    if view.keys_complete:
        agreed = max(datetime.fromisoformat(k["at"]) for k in view.keys.values())
        if (now - agreed).total_seconds() > settings.upload_timeout_s:
            for site in sorted(set(view.sites) - set(view.masked) - set(dropped)):
                dropped[site] = (
                    f"posted its key but sent no masked update within {settings.upload_timeout_s:g} s "
                    "after key agreement (dropped out)"
                )
    return dropped


def advance(
    exp_store: ExperimentStore, dispatch: Dispatch, settings: SecureAggregation, now: datetime | None = None
) -> AttemptView:
    """The current attempt after failing it when a site dropped (then the next one is opened without it).

    Idempotent: every caller (a site polling, an upload, the central's collect and aggregate) may
    call it; the first writer of ``failed.json`` and of the next ``sites.json`` wins.
    """
    now = now or utcnow()
    view = current_attempt(exp_store, dispatch)
    if view.complete:
        return view
    prefix = attempt_prefix(exp_store, view.round, view.dispatch_attempt, view.attempt)
    if view.failed is None:
        dropped = _dropped(exp_store, dispatch, view, settings, now)
        if not dropped:
            return view
        reason = "; ".join(f"{site} {why}" for site, why in sorted(dropped.items()))
        record = {"dropped": dropped, "reason": reason, "at": now.isoformat()}
        try:
            exp_store.store.put_json(f"{prefix}failed.json", record)
        except ObjectExistsError:  # a concurrent caller failed it first: its record holds
            pass
        else:
            logger.warning(
                "experiment %s: round %d: secure aggregation attempt %d failed: %s",
                exp_store.experiment, view.round, view.attempt, reason,
            )  # fmt: skip
        view.failed = exp_store.store.get_json(f"{prefix}failed.json")
    # open the next attempt from the stored record (also when the caller that failed it stopped before)
    remaining = sorted(set(view.sites) - set(view.failed["dropped"]))
    # an attempt below the quorum would reveal a sum (a noised release with client DP) never aggregated
    if len(remaining) >= max(2, load_config(exp_store)[0].min_quorum) and not dispatch.expired(now):
        nxt = attempt_prefix(exp_store, view.round, view.dispatch_attempt, view.attempt + 1)
        _put_once_json(
            exp_store,
            f"{nxt}sites.json",
            {
                "sites": remaining,
                "reason": f"attempt {view.attempt} failed: {view.failed['reason']}; retried without them",
            },
        )
    return current_attempt(exp_store, dispatch)


# -- the routes' work ------------------------------------------------------------------------------


def _refuse(exp_store: ExperimentStore, site: str, round_: int, code: str, reason: str) -> UpdateRefused:
    return UpdateRefused(exp_store.experiment, site, round_, code, reason)


def open_for_site(
    exp_store: ExperimentStore, site: str, round_: int, step: int, *, closed_too: bool = False
) -> tuple[Dispatch, SecureAggregation]:
    """The open dispatch of ``step`` if it selects ``site`` in a secure-aggregation experiment
    (``closed_too``: also the step's last dispatch once it closed, for reading its status).

    Raises:
        UpdateRefused: ``not_secure`` (the experiment does not use secure aggregation), ``not_open``,
            ``not_selected``.
    """
    settings = secure_settings(exp_store)
    if settings is None:
        raise _refuse(
            exp_store, site, round_, "not_secure", "this experiment does not use secure aggregation"
        )
    dispatch = load_dispatch(exp_store, round_, step) if closed_too else current_dispatch(exp_store)
    if dispatch is None or (dispatch.ticket.round, dispatch.ticket.step) != (round_, step):
        raise _refuse(exp_store, site, round_, "not_open", f"round {round_} step {step} is not open")
    if len(dispatch.ticket.sites) < 2:  # one masked update would be the update
        raise _refuse(exp_store, site, round_, "not_secure", f"step {step} selects fewer than 2 sites")
    if site not in dispatch.ticket.sites:
        raise _refuse(
            exp_store, site, round_, "not_selected", f"site {site!r} is not selected for step {step}"
        )
    return dispatch, settings


def attempt_status(exp_store: ExperimentStore, site: str, round_: int, step: int) -> dict[str, Any]:
    """The current attempt as a site sees it (every site's public key once all are posted); still
    readable after the central closed the step (a site may ask once more after the last upload)."""
    dispatch, settings = open_for_site(exp_store, site, round_, step, closed_too=True)
    view = advance(exp_store, dispatch, settings)
    return {**view.to_dict(exp_store.experiment), "upload_timeout_s": settings.upload_timeout_s,
            "key_timeout_s": settings.key_timeout_s, "deadline": dispatch.deadline.isoformat()}  # fmt: skip


#: Longest wait one status request may ask for (``wait_s``), seconds: below the clients' read timeout.
MAX_WAIT_S = 20.0
#: Seconds between the central's looks at the store while a status request waits.
WAIT_CHECK_S = 0.05


async def wait_for_change(
    status: Callable[[], Awaitable[dict[str, Any]]], since: str | None, wait_s: float
) -> dict[str, Any]:
    """``status()`` once its ``stage`` differs from ``since`` or ``wait_s`` passed (a long poll: the
    site learns of the last key or upload within :data:`WAIT_CHECK_S` instead of its own poll interval).
    The drop-out deadlines are checked on every look (``status`` calls :func:`advance`)."""
    import asyncio
    import time

    end = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
    while True:
        current = await status()
        if since is None or current["stage"] != since or time.monotonic() >= end:
            return current
        await asyncio.sleep(WAIT_CHECK_S)


def _check_attempt(exp_store: ExperimentStore, site: str, view: AttemptView, attempt: int) -> None:
    round_ = view.round
    if attempt != view.attempt or view.failed is not None:
        raise _refuse(
            exp_store, site, round_, "wrong_attempt",
            f"round {round_}: attempt {attempt} is not open; the current secure-aggregation attempt is "
            f"{view.attempt}" + (f" (failed: {view.failed['reason']})" if view.failed else ""),
        )  # fmt: skip
    if site not in view.sites:
        raise _refuse(
            exp_store, site, round_, "dropped",
            f"round {round_}: site {site!r} is not in secure-aggregation attempt {attempt} (sites {list(view.sites)})",
        )  # fmt: skip


def decode_public_key(text: object, site: str) -> bytes:
    """The 32 raw bytes of a base64 X25519 public key; ValueError naming the site otherwise."""
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"site {site!r}: public_key must be {PUBLIC_KEY_BYTES} bytes in base64")
    return raw


def post_key(
    exp_store: ExperimentStore, site: str, round_: int, step: int, attempt: int, public_key: str
) -> dict[str, Any]:
    """Store ``site``'s public key for ``attempt`` (write-once: the same key again is accepted, another refused).

    Raises:
        UpdateRefused: not open / not selected / wrong_attempt / dropped / late / key_exists.
        ValueError: the key is not 32 bytes of base64.
    """
    from jipfed.federation.dispatch import check_deadline

    dispatch, settings = open_for_site(exp_store, site, round_, step)
    check_deadline(exp_store, site, round_)
    decode_public_key(public_key, site)
    view = advance(exp_store, dispatch, settings)
    _check_attempt(exp_store, site, view, attempt)
    key = key_key(attempt_prefix(exp_store, round_, dispatch.attempt, attempt), site)
    record = {"site": site, "public_key": public_key, "at": utcnow().isoformat()}
    try:
        exp_store.store.put_json(key, record)
    except ObjectExistsError:
        stored = exp_store.store.get_json(key)
        if stored["public_key"] != public_key:
            raise _refuse(
                exp_store, site, round_, "key_exists",
                f"round {round_} attempt {attempt}: site {site!r} already posted a different key",
            ) from None  # fmt: skip
        return stored
    logger.info(
        "experiment %s: round %d attempt %d: key of %s stored", exp_store.experiment, round_, attempt, site
    )
    return record


def parse_masked_manifest(text: str | bytes) -> dict[str, Any]:
    """A masked upload's manifest as a dict with exactly :data:`MANIFEST_FIELDS`; ValueError otherwise."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the masked manifest is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != set(MANIFEST_FIELDS):
        raise ValueError(f"the masked manifest must hold exactly the fields {list(MANIFEST_FIELDS)}")
    metrics = data["metrics"]
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in metrics.values()
    ):
        raise ValueError("the masked manifest's metrics must be an object of finite numbers")
    return data


def check_masked_payload(payload: bytes, length: int, where: str) -> np.ndarray:
    """The uint64 vector of a masked payload (safetensors, one tensor ``masked`` of ``length``); ValueError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(payload)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise ValueError(f"{where}: not a safetensors file: {exc}") from None
    vector = tensors.get(MASKED_TENSOR)
    if (
        set(tensors) != {MASKED_TENSOR}
        or vector is None
        or vector.dtype != np.uint64
        or vector.shape != (length,)
    ):
        got = {n: (str(t.dtype), list(t.shape)) for n, t in tensors.items()}
        raise ValueError(
            f"{where}: expected one uint64 tensor {MASKED_TENSOR!r} of shape [{length}], got {got}"
        )
    return vector


def commit_masked(
    exp_store: ExperimentStore,
    site: str,
    round_: int,
    step: int,
    attempt: int,
    manifest_text: str,
    payload: bytes,
    *,
    signing_key: bytes | None = None,
    signature: str | None = None,
) -> dict[str, Any]:
    """Check and store ``site``'s masked vector for ``attempt``; returns the stored manifest.

    Checks: the attempt is open and holds the site, every key is in, the manifest names this
    experiment / round / step / attempt / site / config, the payload's sha256 and its safetensors
    header (one uint64 tensor of the model's float size + 1), its declared noise share (client-level
    DP: :func:`jipfed.privacy.secure_dp.check_share`), the site's Ed25519 signature when it has a
    registered key. No NaN or norm check: the values are masked ring elements.

    Raises:
        UpdateRefused: not open, late, wrong_attempt, dropped, keys_missing, duplicate, rejected,
            unsigned, bad_signature.
    """
    from jipfed.federation.dispatch import check_deadline
    from jipfed.federation.signing import SignatureInvalid, statement, verify

    dispatch, settings = open_for_site(exp_store, site, round_, step)
    check_deadline(exp_store, site, round_)
    view = advance(exp_store, dispatch, settings)
    _check_attempt(exp_store, site, view, attempt)
    where = f"experiment {exp_store.experiment!r}, round {round_}, attempt {attempt}, site {site!r}"
    if not view.keys_complete:
        raise _refuse(
            exp_store,
            site,
            round_,
            "keys_missing",
            f"{where}: keys of {sorted(set(view.sites) - set(view.keys))} missing",
        )
    prefix = attempt_prefix(exp_store, round_, dispatch.attempt, attempt)
    if exp_store.store.exists(masked_manifest_key(prefix, site)):
        raise _refuse(
            exp_store, site, round_, "duplicate", f"{where}: the masked update was already received"
        )
    start = UpdateManifest.from_dict(exp_store.store.get_json(dispatch.ticket.manifest_key))
    length = vector_length(start)
    expected = {
        "format": MASKED_FORMAT, "experiment": exp_store.experiment, "round": round_, "step": step,
        "dispatch_attempt": dispatch.attempt, "attempt": attempt, "site": site,
        "config_hash": dispatch.ticket.config_hash, "length": length, "fraction_bits": settings.fraction_bits,
    }  # fmt: skip
    try:
        manifest = parse_masked_manifest(manifest_text)
        wrong = {k: manifest[k] for k, v in expected.items() if manifest[k] != v}
        if wrong:
            raise ValueError(f"manifest fields {wrong} do not match { ({k: expected[k] for k in wrong}) }")
        digest = hashlib.sha256(payload).hexdigest()
        if digest != manifest["sha256"]:
            raise ValueError(f"payload sha256 {digest} differs from the manifest's {manifest['sha256']}")
        check_masked_payload(payload, length, where)
        check_share(manifest["noise"], noise_share(load_config(exp_store)[0]), len(view.sites))
    except ValueError as exc:
        raise _refuse(exp_store, site, round_, "rejected", f"{where}: {exc}") from None
    if signing_key is not None:
        text = manifest_text.encode("utf-8") if isinstance(manifest_text, str) else manifest_text
        claim = statement(
            MASKED_PURPOSE, experiment=exp_store.experiment, round=round_, step=step, site=site,
            config_hash=dispatch.ticket.config_hash, manifest_text=text, payload_sha256=manifest["sha256"],
        )  # fmt: skip
        try:
            verify(signing_key, claim, signature, f"the masked update of site {site!r} for round {round_}")
        except SignatureInvalid as exc:
            raise _refuse(exp_store, site, round_, exc.code, str(exc)) from None
    # The payload under its own digest (a retry of the same bytes finds it there), then the
    # manifest, create-exclusive: of two racing uploads the first manifest wins and names its payload.
    payload_key = masked_key(prefix, site, manifest["sha256"])
    written = exp_store.store.put_if_absent_or_same(payload_key, payload)
    try:
        exp_store.store.put_json(masked_manifest_key(prefix, site), manifest)
    except ObjectExistsError:
        winner = exp_store.store.get_json(masked_manifest_key(prefix, site))
        if written and winner.get("sha256") != manifest["sha256"]:
            exp_store.store.delete(payload_key)  # nothing names it
        raise _refuse(
            exp_store, site, round_, "duplicate", f"{where}: the masked update was already received"
        ) from None
    logger.info(
        "experiment %s: round %d attempt %d: masked update of %s stored",
        exp_store.experiment,
        round_,
        attempt,
        site,
    )
    return manifest


# -- the central's side ----------------------------------------------------------------------------


def completed_attempt(
    exp_store: ExperimentStore, dispatch: Dispatch, settings: SecureAggregation
) -> AttemptView | None:
    """The round's complete attempt (every site of it uploaded), or None."""
    view = advance(exp_store, dispatch, settings)
    return view if view.complete else None


def unmask_attempt(
    exp_store: ExperimentStore, view: AttemptView, settings: SecureAggregation, length: int
) -> tuple[np.ndarray, float, dict[str, dict[str, Any]]]:
    """(weighted mean of the sites' vectors, total weight, their manifests) of a complete attempt."""
    prefix = attempt_prefix(exp_store, view.round, view.dispatch_attempt, view.attempt)
    vectors, manifests = [], {}
    for site in view.sites:
        manifests[site] = exp_store.store.get_json(masked_manifest_key(prefix, site))
        payload = exp_store.store.get_bytes(masked_key(prefix, site, manifests[site]["sha256"]))
        if hashlib.sha256(payload).hexdigest() != manifests[site]["sha256"]:
            raise ValueError(
                f"round {view.round} attempt {view.attempt}: stored masked update of {site!r} changed"
            )
        vectors.append(check_masked_payload(payload, length, f"masked update of {site!r}"))
    mean, weight = unmask_mean(vectors, settings)
    return mean, weight, manifests


def site_status(exp_store: ExperimentStore, dispatch: Dispatch, site: str) -> tuple[str, str] | None:
    """The collect's view of ``site`` in a secure-aggregation round (None: not such an experiment).

    ``delivered`` once an attempt that holds the site completed; ``failed`` when the site was
    dropped from the round's attempts (with the reason); otherwise None for the ordinary checks
    (failure reports, deadline, waiting).
    """
    from jipfed.federation.dispatch import DELIVERED, FAILED, TIMED_OUT, WAITING

    settings = secure_settings(exp_store)
    if settings is None:
        return None
    view = advance(exp_store, dispatch, settings)
    if view.failed is not None:  # no attempt left (fewer than 2 sites, or past the deadline)
        return FAILED, f"secure aggregation failed in attempt {view.attempt}: {view.failed['reason']}"
    if site in view.sites:
        if view.complete:
            return DELIVERED, f"masked update of {site} in the complete attempt {view.attempt}"
        if dispatch.expired():
            return (
                TIMED_OUT,
                f"secure aggregation did not complete before the deadline (attempt {view.attempt})",
            )
        return (
            WAITING,
            f"secure-aggregation attempt {view.attempt}: {len(view.masked)}/{len(view.sites)} masked",
        )
    reasons = [h["dropped"][site] for h in view.history if site in h.get("dropped", {})]
    return FAILED, f"dropped from secure aggregation: {reasons[-1] if reasons else 'not in the attempt'}"


def took_part(exp_store: ExperimentStore, dispatch: Dispatch, site: str) -> bool:
    """Whether ``site`` posted a key in any attempt of ``dispatch`` (it then gets no work item again)."""
    head = _round_prefix(exp_store, dispatch.ticket.round, dispatch.attempt)
    suffix = f"/keys/{site}.json"
    return any(key.endswith(suffix) for key in exp_store.store.list(head))
