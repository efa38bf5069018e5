"""Receiving a site's update: authorise first, stream the body to the store, validate from there.

The endpoint's upload route runs three phases:

1. :func:`authorise_upload` (before a byte of the body is read): the experiment runs, the round's
   step is open and selects the site, its deadline has not passed, the site has not uploaded yet.
   It returns the byte limits derived from the size of the model the step starts from.
2. :func:`read_upload` streams the multipart body: the ``manifest`` field (bounded), the ``payload``
   file spooled to a temporary file (Starlette keeps at most 1 MiB of it in memory); a body past
   the limit is cut off with 413 while it is read.
3. :func:`commit_upload`: the manifest is checked, then the payload is written to its key
   (replacing a half-written one, i.e. a payload without manifest) and checked once while its
   bytes stream into the store (sha256, safetensors header, tensor specs, NaN/Inf, norm bound);
   the check is recorded next to the update (``updates/<site>.checked``, so aggregation does not
   read the update to decide) and the manifest is written last, create-exclusive (a conditional
   PUT on S3): the commit marker. A site with a
   registered Ed25519 key must sign its update (form field ``signature``); the signature is
   checked before the commit and stored as ``updates/<site>.sig``. A refused payload is removed.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import Message, Receive

from jipfed.central.credentials import load_credential
from jipfed.federation.dispatch import check_deadline, current_dispatch
from jipfed.federation.payload_stream import CheckingReader
from jipfed.federation.rounds import (
    UpdateRefused,
    check_upload_allowed,
    commit_checked,
    finish_upload,
    open_upload,
)
from jipfed.federation.signing import SignatureInvalid, update_statement, verify
from jipfed.federation.update import DTYPES, UpdateManifest
from jipfed.storage.state import ExperimentStore

#: Default upload limit: this many times the byte size of the model the step starts from (an
#: update may carry one control variate per weight, SCAFFOLD) plus header room.
DEFAULT_SIZE_FACTOR = 2.0
#: Room for the safetensors / manifest JSON header, per tensor and in all.
HEADER_BYTES_PER_TENSOR = 2 * 1024
HEADER_BYTES = 1024 * 1024
#: Room for the multipart boundaries and part headers around manifest and payload.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UploadTooLarge(Exception):
    """The body exceeded its limit (raised while it is read)."""


class MalformedUpload(ValueError):
    """The body is not ``multipart/form-data`` with a text ``manifest`` and a file ``payload``."""


@dataclass(frozen=True)
class UploadLimits:
    """Byte limits of one upload, derived from the size of the step's start model."""

    payload_bytes: int
    manifest_bytes: int

    @property
    def body_bytes(self) -> int:
        return self.payload_bytes + self.manifest_bytes + MULTIPART_OVERHEAD_BYTES


@dataclass(frozen=True)
class UploadPermit:
    """What :func:`authorise_upload` decided: the limits, the open step, the site's public key."""

    limits: UploadLimits
    step: int
    public_key: bytes | None


def model_bytes(manifest: UpdateManifest) -> int:
    """Bytes of the tensors a manifest describes (decoded dtypes)."""
    return sum(spec.numel * DTYPES[spec.dtype].itemsize for spec in manifest.tensors.values())


def limits_for(manifest: UpdateManifest, factor: float, ceiling: int) -> UploadLimits:
    """The limits of an update of a model described by ``manifest`` (never above ``ceiling``)."""
    room = HEADER_BYTES + HEADER_BYTES_PER_TENSOR * len(manifest.tensors)
    payload = min(int(factor * model_bytes(manifest)) + room, ceiling)
    return UploadLimits(payload_bytes=payload, manifest_bytes=room)


def authorise_upload(
    exp_store: ExperimentStore, site: str, round_: int, factor: float, ceiling: int
) -> UploadPermit:
    """Everything that decides an upload before its body is read: limits, step, the site's key.

    Raises:
        UpdateRefused: late (deadline or closed round), wrong_round, not_selected, duplicate,
            not_running.
    """
    check_upload_allowed(exp_store, site, round_)
    check_deadline(exp_store, site, round_)
    if (exp_store.load_config().get("privacy") or {}).get("secure_aggregation"):
        reason = "this experiment uses secure aggregation: send the masked update (secagg routes)"
        raise UpdateRefused(exp_store.experiment, site, round_, "masked_only", reason)
    dispatch = current_dispatch(exp_store)
    if dispatch is None:  # the step is open (checked above) but was never dispatched to the sites
        raise UpdateRefused(exp_store.experiment, site, round_, "not_open", "the step was not dispatched")
    start = UpdateManifest.from_dict(exp_store.store.get_json(dispatch.ticket.manifest_key))
    credential = load_credential(exp_store.store, site)
    return UploadPermit(
        limits=limits_for(start, factor, ceiling),
        step=dispatch.ticket.step,
        public_key=credential.public_key_bytes() if credential else None,
    )


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises :class:`UploadTooLarge` once the body exceeds ``limit`` bytes."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise UploadTooLarge
        return message

    return wrapped


@dataclass
class ReceivedUpload:
    """A parsed upload: the manifest text, the spooled payload file and its size; close it."""

    manifest: str
    payload: IO[bytes]
    size: int
    fields: dict[str, str]
    _close: Callable[[], Awaitable[Any]]

    async def close(self) -> None:
        await self._close()


async def read_upload(
    request: Request, limits: UploadLimits, extra_fields: tuple[str, ...] = ()
) -> ReceivedUpload:
    """Stream the multipart body of ``request`` within ``limits``.

    Raises:
        UploadTooLarge: the Content-Length or the body read so far exceeds the limit.
        MalformedUpload: not multipart with a text ``manifest`` and a file ``payload``.
    """
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.body_bytes:
        raise UploadTooLarge
    body = Request(request.scope, receive=_limited(request.receive, limits.body_bytes))
    try:
        form = await body.form(
            max_files=1, max_fields=1 + len(extra_fields), max_part_size=limits.manifest_bytes
        )
    except StarletteHTTPException as exc:
        raise MalformedUpload(f"malformed upload: {exc.detail}") from None
    manifest, payload = form.get("manifest"), form.get("payload")
    fields = {name: form.get(name) for name in extra_fields}
    if (
        not isinstance(manifest, str)
        or not isinstance(payload, UploadFile)
        or not all(isinstance(value, (str, type(None))) for value in fields.values())
    ):
        await form.close()
        raise MalformedUpload(
            "an upload is multipart/form-data with a text field 'manifest' and a file 'payload'"
        )
    size = payload.size if payload.size is not None else 0
    if size > limits.payload_bytes:
        await form.close()
        raise UploadTooLarge
    payload.file.seek(0)
    return ReceivedUpload(manifest, payload.file, size, {k: v for k, v in fields.items() if v}, form.close)


_site_locks: dict[tuple[str, int, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _site_lock(experiment: str, round_: int, site: str) -> threading.Lock:
    """One lock per (experiment, round, site): a site's concurrent uploads commit one at a time here."""
    with _locks_guard:
        if len(_site_locks) > 10_000:
            _site_locks.clear()
        return _site_locks.setdefault((experiment, round_, site), threading.Lock())


def _check_signature(permit: UploadPermit, upload: ReceivedUpload, manifest: UpdateManifest) -> str | None:
    """The upload's signature if the site has a registered key and it verifies; None without a key."""
    if permit.public_key is None:
        return None
    signature = upload.fields.get("signature")
    try:
        verify(
            permit.public_key,
            update_statement(manifest.to_dict(), upload.manifest, permit.step),
            signature,
            f"the update of site {manifest.site!r} for round {manifest.round} (step {permit.step})",
        )
    except SignatureInvalid as exc:
        raise UpdateRefused(manifest.experiment, manifest.site, manifest.round, exc.code, str(exc)) from None
    return signature


def commit_upload(
    exp_store: ExperimentStore, site: str, round_: int, upload: ReceivedUpload, permit: UploadPermit
) -> UpdateManifest:
    """Check the manifest, store the payload while checking it, check its signature, commit the manifest.

    Order of writes: payload (replacing a half-written one), signature, arrival check, manifest
    last (create-exclusive: the commit marker).

    Raises:
        UpdateRefused: refused before or after reading the stored payload (``unsigned`` /
            ``bad_signature`` when the site has a registered key); nothing is committed.
    """
    lay = exp_store.layout
    key = lay.update(round_, site)
    with _site_lock(exp_store.experiment, round_, site):
        # again: another upload may have committed; the manifest is checked before any payload byte
        checker = open_upload(exp_store, site, round_, upload.manifest)
        try:
            # checked once, while the bytes stream into the store
            exp_store.store.put_stream(
                key, CheckingReader(upload.payload, checker), upload.size, overwrite=True
            )
            check = finish_upload(exp_store, checker)
            signature = _check_signature(permit, upload, checker.manifest)
            if signature is not None:
                exp_store.store.put_bytes(
                    lay.update_signature(round_, site), signature.encode(), overwrite=True
                )
            commit_checked(exp_store, check, checker.manifest)
        except BaseException:
            if not exp_store.update_committed(round_, site):
                exp_store.store.delete(key)  # never committed: no one may mistake it for an update
            raise
    return checker.manifest
