"""Wire format of updates and global models: a safetensors payload plus a JSON manifest.

Encodings (``UpdateManifest.encoding``) apply to float tensors only; integer and bool tensors
(BatchNorm's ``num_batches_tracked``) always travel as they are:

* ``"fp32"``: tensors as they are (lossless; a float64 tensor stays float64).
* ``"fp16"``: float tensors cast to float16. Error per element: ``|x - x^| <= 2**-11 * |x|`` for
  ``|x| >= 2**-14``, ``<= 2**-25`` below (subnormal spacing); ``|x| > 65504`` is refused.
* ``"int8"`` (deltas only): per-tensor symmetric quantisation ``q = round(x / s)`` with
  ``s = max|x| / 127``, stored as int8 plus a float32 0-d tensor ``<name>.__scale__``. Error per
  element: ``|x - q * s| <= s / 2 = max|x| / 254`` (plus float32 rounding, ~6e-8 relative).

Decoding validates *before* anything is used, raising :class:`UpdateRejected` with a reason: the
sha256 of the payload bytes, that the payload is safetensors at all (only ``safetensors`` parses
it; nothing is ever unpickled), the manifest's identity and tensor specs against an
:class:`ExpectedUpdate`, the payload's tensor names / shapes / dtypes, NaN/Inf, and optionally the
delta's L2 norm. Decoded tensors have the dtypes of the manifest's specs.

Files: ``<stem>.safetensors`` + ``<stem>.json``, each written atomically (temporary file in the same
folder, fsync, ``os.replace``); the payload is written first, so a manifest never points at a
missing payload.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from jipfed.federation.update import (
    DTYPES,
    GLOBAL_SITE,
    SCALE_SUFFIX,
    ManifestFields,
    ModelUpdate,
    TensorSpec,
    UpdateManifest,
)
from jipfed.federation.validation import (
    ExpectedUpdate,
    UpdateRejected,
    check_finite,
    check_manifest,
    check_norm,
    check_specs,
    check_tensors,
    count_non_finite,
    delta_sq_norm,
)
from jipfed.storage.layout import MANIFEST_SUFFIX, MODEL_SUFFIX

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
INT8_LEVELS = 127
_HASH_CHUNK = 1 << 20
# safetensors dtype codes (``get_slice(...).get_dtype()``) of the dtypes in ``update.DTYPES``
ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True, eq=False)
class EncodedUpdate:
    """Payload bytes (safetensors) and the manifest whose ``sha256`` / ``encoding`` describe them."""

    payload: bytes
    manifest: UpdateManifest

    def __post_init__(self) -> None:
        if self.manifest.sha256 != hashlib.sha256(self.payload).hexdigest():
            raise ValueError("manifest sha256 does not match the payload")


def payload_specs(manifest: UpdateManifest) -> dict[str, TensorSpec]:
    """Name -> spec of the tensors the payload must hold, given the manifest's specs and encoding."""
    out: dict[str, TensorSpec] = {}
    for name, spec in manifest.tensors.items():
        if not spec.is_floating or manifest.encoding == "fp32":
            out[name] = spec
        elif manifest.encoding == "fp16":
            out[name] = TensorSpec(spec.shape, "float16")
        else:  # int8
            out[name] = TensorSpec(spec.shape, "int8")
            out[name + SCALE_SUFFIX] = TensorSpec((), "float32")
    return out


def _encode_tensor(name: str, tensor: torch.Tensor, encoding: str) -> dict[str, torch.Tensor]:
    if not tensor.is_floating_point():
        return {name: tensor}
    if count_non_finite(tensor):
        raise ValueError(f"tensor {name!r} holds NaN/Inf; refusing to encode it")
    if encoding == "fp32":
        return {name: tensor}
    if encoding == "fp16":
        if tensor.numel() and float(tensor.abs().max()) > FP16_MAX:
            raise ValueError(f"tensor {name!r} exceeds the float16 range (|x| > {FP16_MAX}); use fp32")
        return {name: tensor.to(torch.float16)}
    x = tensor.to(torch.float32)
    amax = x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float32)
    scale = amax / INT8_LEVELS  # float32 0-d: the value stored is the value used
    if not bool(torch.isfinite(scale)):
        raise ValueError(f"tensor {name!r} exceeds the float32 range; int8 encoding impossible")
    if float(scale) == 0.0:
        q = torch.zeros(x.shape, dtype=torch.int8)
    else:
        q = (x / scale).round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return {name: q, name + SCALE_SUFFIX: scale}


def encode_update(update: ModelUpdate, encoding: str = "fp32") -> EncodedUpdate:
    """Serialise ``update`` with ``encoding`` (see module docstring); the manifest gets sha256 + encoding.

    Raises ValueError for an unknown encoding, int8 on a ``"weights"`` update, NaN/Inf values or
    values outside the float16 range with ``"fp16"``.
    """
    manifest = update.manifest.replace(encoding=encoding, sha256=None)  # validates encoding vs kind
    entries: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in update.tensors.items():
        for key, value in _encode_tensor(name, tensor, encoding).items():
            value = value.contiguous()
            ident = (value.untyped_storage().data_ptr(), value.storage_offset())
            if value.numel() and ident in seen:  # safetensors refuses tensors that share memory
                value = value.clone()
            seen.add(ident)
            entries[key] = value
    payload = safetensors.torch.save(entries)
    return EncodedUpdate(
        payload=payload, manifest=manifest.replace(sha256=hashlib.sha256(payload).hexdigest())
    )


def encode_global(
    weights: Mapping[str, torch.Tensor],
    *,
    experiment: str,
    round: int,
    config_hash: str,
    n_samples: int = 0,
    metrics: Mapping[str, float] | None = None,
    created_at: str | None = None,
) -> EncodedUpdate:
    """Encode the global model of ``round``: kind ``"weights"``, site :data:`GLOBAL_SITE`, fp32.

    Read it back with ``decode_update`` / ``read_update`` and ``ExpectedUpdate.for_global``.
    """
    identity = {"experiment": experiment, "round": round, "config_hash": config_hash, "n_samples": n_samples}
    return encode_update(_global_update(weights, identity, metrics=metrics, created_at=created_at), "fp32")


def _global_update(
    weights: Mapping[str, torch.Tensor], identity: Mapping[str, Any], **extra: Any
) -> ModelUpdate:
    """The unencoded global model: kind ``"weights"``, site :data:`GLOBAL_SITE`."""
    return ModelUpdate.build(weights, site=GLOBAL_SITE, kind="weights", **identity, **extra)


#: safetensors writes tensors by dtype (this order, last first), then by name.
_ST_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
_ST_CODES = {name: code for code, name in ST_DTYPES.items()}


@dataclass(frozen=True)
class EncodedFile:
    """A payload written to a local file (``size`` bytes) and the manifest whose ``sha256`` describes it."""

    path: Path
    manifest: UpdateManifest
    size: int


class SafetensorsWriter:
    """A safetensors file whose tensor specs are known up front, filled tensor by tensor in any order.

    The header is written at once and the file sized; :meth:`put` writes a tensor's bytes at its
    offset as soon as it is final, and hashes it once every tensor before it in the file is hashed
    (so a caller that finishes tensors in file order overlaps writing and hashing with its own
    work). :meth:`finish` returns ``(sha256, size)``. The bytes are those ``safetensors.torch.save``
    produces for the same tensors (same order, header and padding). ``check_finite``: :meth:`put`
    refuses a float tensor holding NaN/Inf (ValueError). ``hashing`` (a
    :class:`~jipfed.federation.payload_stream.HashPipeline`) writes and hashes on its background
    threads (:meth:`finish` waits for them and raises a write's error). A tensor handed to
    :meth:`put` must not change afterwards.
    """

    def __init__(
        self, path: Path, specs: Mapping[str, TensorSpec], hashing: Any = None, *, check_finite: bool = False
    ) -> None:
        codes = {name: _ST_CODES[spec.dtype] for name, spec in specs.items()}
        self.order = sorted(specs, key=lambda n: (-_ST_ORDER.index(codes[n]), n))
        self.specs = dict(specs)
        self._position = {name: i for i, name in enumerate(self.order)}
        header: dict[str, Any] = {}
        self._offsets: dict[str, int] = {}
        offset = 0
        for name in self.order:
            spec = specs[name]
            nbytes = math.prod(spec.shape) * spec.torch_dtype.itemsize
            header[name] = {
                "dtype": codes[name],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._offsets[name] = offset
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        head = struct.pack("<Q", len(text)) + text
        self.path = path
        self.size = len(head) + offset
        self.data_start = len(head)
        self._hashing = hashing
        self._check_finite = check_finite
        self._digest = hashlib.sha256(head)
        self._ready: dict[str, torch.Tensor] = {}  # put, not hashed yet
        self._next = 0  # index in ``order`` of the next tensor to hash
        self._data_put = 0  # bytes of the data section put by :meth:`put_data`
        self._writes: list[Future[None]] = []  # background writes (with ``hashing``)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self.size)
            _pwrite_all(self._fd, memoryview(head), 0)
        except BaseException:
            self.close()
            raise

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write (and, in file order, hash) tensor ``name``; ValueError if unknown, put twice or of another spec."""
        spec = self.specs.get(name)
        if spec is None or name in self._ready or self._position[name] < self._next:
            raise ValueError(f"tensor {name!r} is not in the file's header or was already written")
        if TensorSpec.of(tensor) != spec:
            raise ValueError(f"tensor {name!r} is {TensorSpec.of(tensor)}, the header says {spec}")
        if self._check_finite and count_non_finite(tensor):
            raise ValueError(f"tensor {name!r} holds NaN/Inf; refusing to encode it")
        tensor = tensor.contiguous()
        if tensor.numel():
            offset = self.data_start + self._offsets[name]
            data = _bytes_of(tensor)
            if self._hashing is None:
                _write_at(self._fd, data, offset)
            else:  # written on a background thread while the caller computes the next tensors
                self._writes.append(self._hashing.call(partial(_write_at, self._fd, data, offset), len(data)))
        self._ready[name] = tensor
        while self._next < len(self.order) and self.order[self._next] in self._ready:
            ready = self._ready.pop(self.order[self._next])
            self._next += 1
            if ready.numel():
                if self._hashing is None:
                    self._digest.update(_bytes_of(ready))
                else:
                    self._hashing.update(self._digest, _bytes_of(ready))

    def data_range(self, name: str) -> tuple[int, int]:
        """Byte range of tensor ``name`` within the data section."""
        begin = self._offsets[name]
        return begin, begin + self.specs[name].numel * self.specs[name].torch_dtype.itemsize

    def put_data(self, begin: int, data: memoryview) -> tuple[Future[None], ...]:
        """Write (and hash) the data section's next bytes, ``begin`` = bytes put so far, instead of
        tensor by tensor (callers that compute the data section in file order, e.g. a flat mean).

        Every tensor counts as put once the section is complete. Returns the background write and
        hash of ``data`` (none without ``hashing``): ``data`` must not change until they are done
        (a caller may then reuse its buffer). ValueError when a tensor was put by name or ``begin``
        is not the next byte.
        """
        done = self._data_put
        if begin != done or self._ready or (self._next and not done):
            raise ValueError(f"data section bytes must be put in order: expected offset {done}, got {begin}")
        if done + len(data) > self.size - self.data_start:
            raise ValueError("data section bytes past the end of the file")
        pending: tuple[Future[None], ...] = ()
        if len(data):
            offset = self.data_start + begin
            if self._hashing is None:
                _write_at(self._fd, data, offset)
                self._digest.update(data)
            else:
                self._writes.append(self._hashing.call(partial(_write_at, self._fd, data, offset), len(data)))
                pending = (self._writes[-1], self._hashing.update(self._digest, data))
        self._data_put = done + len(data)
        if self._data_put == self.size - self.data_start:
            self._next = len(self.order)
        return pending

    @property
    def missing(self) -> list[str]:
        """Names not put yet, in file order."""
        return [n for n in self.order[self._next :] if n not in self._ready]

    def finish(self) -> tuple[str, int]:
        """``(sha256, size)`` once every tensor was put; ValueError naming the first missing one."""
        if self.missing:
            raise ValueError(f"tensor {self.missing[0]!r} was never written")
        if self._hashing is not None:
            self._hashing.wait(self._digest)
        for write in self._writes:
            write.result()  # raises what a background write raised (e.g. the disk is full)
        self.close()
        return self._digest.hexdigest(), self.size

    def close(self) -> None:
        """Close the file (after the background writes still running: they use its descriptor)."""
        for write in self._writes:
            write.exception()
        self._writes.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: A tensor at least this large is sent to the disk as soon as it is written (the final fsync waits less).
WRITEBACK_BYTES = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2
#: Linux's sync_file_range, or None where the C library has none (macOS, Windows): then a no-op.
_SYNC_FILE_RANGE = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range of ``fd``'s dirty pages to the disk, not waiting for it (Linux; else nothing)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write ``data`` at ``offset``; a large one goes to the disk at once (the final fsync waits less)."""
    _pwrite_all(fd, data, offset)
    if len(data) >= WRITEBACK_BYTES:
        start_writeback(fd, offset, len(data))


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], hashing: Any = None
) -> tuple[str, int]:
    """Write ``tensors`` to ``path`` tensor by tensor (no payload copy in memory); ``(sha256, size)``.

    The bytes are those ``safetensors.torch.save`` produces (same tensor order, header and padding).
    ``hashing`` (a :class:`~jipfed.federation.payload_stream.HashPipeline`) hashes beside the writing.
    """
    with SafetensorsWriter(path, {n: TensorSpec.of(t) for n, t in tensors.items()}, hashing) as writer:
        for name in writer.order:
            writer.put(name, tensors[name])
        return writer.finish()


def write_global_file(
    weights: Mapping[str, torch.Tensor],
    path: Path,
    *,
    experiment: str,
    round: int,
    config_hash: str,
    n_samples: int = 0,
    hashing: Any = None,
    writer: SafetensorsWriter | None = None,
) -> EncodedFile:
    """:func:`encode_global` written to ``path`` instead of memory (same bytes, same manifest).

    ``writer``: a :class:`SafetensorsWriter` on ``path`` (``check_finite=True``) that may already
    hold some of ``weights``; it is completed when its specs are those of ``weights``, else
    closed and the file written anew. Raises ValueError for NaN/Inf values, as
    :func:`encode_update` does.
    """
    specs = {name: TensorSpec.of(t) for name, t in weights.items()}
    identity = {"experiment": experiment, "round": round, "config_hash": config_hash, "n_samples": n_samples}
    manifest = _global_update(weights, identity).manifest
    if writer is not None and writer.specs == specs:
        for name in writer.missing:
            writer.put(name, weights[name])
        digest, size = writer.finish()
        return EncodedFile(path, manifest.replace(sha256=digest), size)
    if writer is not None:
        writer.close()
    for name, tensor in weights.items():
        if count_non_finite(tensor):
            raise ValueError(f"tensor {name!r} holds NaN/Inf; refusing to encode it")
    digest, size = write_safetensors(path, weights, hashing)
    return EncodedFile(path, manifest.replace(sha256=digest), size)


def parse_manifest(
    manifest: UpdateManifest | str | bytes | Mapping[str, Any], expected: ExpectedUpdate
) -> UpdateManifest:
    if isinstance(manifest, UpdateManifest):
        return manifest
    try:
        if isinstance(manifest, (str, bytes)):
            return UpdateManifest.from_json(manifest)
        return UpdateManifest.from_dict(manifest)
    except ValueError as exc:
        raise UpdateRejected(expected.site, expected.round, f"invalid manifest: {exc}") from None


def check_hash(digest: str, manifest: UpdateManifest) -> None:
    if manifest.sha256 is None:
        raise UpdateRejected(manifest.site, manifest.round, "manifest has no sha256")
    if digest != manifest.sha256:
        raise UpdateRejected(
            manifest.site,
            manifest.round,
            f"payload sha256 {digest[:12]}... does not match the manifest's {manifest.sha256[:12]}... (tampered or corrupt)",
        )


def decode_entry(name: str, spec: TensorSpec, manifest: UpdateManifest, get: Any) -> torch.Tensor:
    """Decoded tensor ``name`` (dtype of ``spec``); ``get(key)`` returns a raw payload tensor."""
    raw = get(name)
    if not spec.is_floating or manifest.encoding == "fp32":
        return raw
    if manifest.encoding == "fp16":
        return raw.to(spec.torch_dtype)
    scale = get(name + SCALE_SUFFIX)
    s = float(scale)
    if not (s >= 0.0 and s < float("inf")):
        raise UpdateRejected(
            manifest.site, manifest.round, f"int8 scale of tensor {name!r} is {s}, not finite >= 0"
        )
    return (raw.to(torch.float32) * scale).to(spec.torch_dtype)


def decode_update(
    payload: bytes, manifest: UpdateManifest | str | bytes | Mapping[str, Any], expected: ExpectedUpdate
) -> ModelUpdate:
    """Validate and decode an update; raises :class:`UpdateRejected` naming the first problem.

    ``manifest`` may be the object, its JSON text, or the parsed JSON object. Order of checks:
    manifest well-formed, sha256 of ``payload``, identity / kind / n_samples / tensor specs against
    ``expected``, safetensors structure, payload names / shapes / dtypes, values (NaN/Inf, int8
    scales), delta norm. The payload is parsed by ``safetensors.torch.load`` only.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    man = parse_manifest(manifest, expected)
    check_hash(hashlib.sha256(payload).hexdigest(), man)
    check_manifest(man, expected)
    try:
        raw = safetensors.torch.load(bytes(payload))
    except SafetensorError as exc:
        raise UpdateRejected(man.site, man.round, f"payload is not a safetensors file ({exc})") from None
    check_specs(spec_of_payload(raw, man), payload_specs(man), man.site, man.round, what="payload")
    tensors = {name: decode_entry(name, spec, man, raw.__getitem__) for name, spec in man.tensors.items()}
    check_tensors(tensors, man, expected)
    return ModelUpdate(tensors=tensors, manifest=man)


def spec_of_payload(raw: Mapping[str, torch.Tensor], manifest: UpdateManifest) -> dict[str, TensorSpec]:
    """Specs of raw payload tensors; an unsupported dtype is a rejection."""
    try:
        return {name: TensorSpec.of(t) for name, t in raw.items()}
    except ValueError as exc:
        raise UpdateRejected(manifest.site, manifest.round, f"payload: {exc}") from None


def payload_path(path_stem: str | os.PathLike[str]) -> Path:
    """``<stem>.safetensors``."""
    return Path(os.fspath(path_stem) + MODEL_SUFFIX)


def manifest_path(path_stem: str | os.PathLike[str]) -> Path:
    """``<stem>.json``."""
    return Path(os.fspath(path_stem) + MANIFEST_SUFFIX)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_update(path_stem: str | os.PathLike[str], encoded: EncodedUpdate) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` then ``<stem>.json``; returns both paths."""
    payload, manifest = payload_path(path_stem), manifest_path(path_stem)
    atomic_write_bytes(payload, encoded.payload)
    atomic_write_bytes(manifest, encoded.manifest.to_json().encode())
    logger.debug(
        "wrote %s (%s, %d bytes, %s)",
        payload,
        encoded.manifest.site,
        len(encoded.payload),
        encoded.manifest.encoding,
    )
    return payload, manifest


def _read_manifest_file(path_stem: str | os.PathLike[str], expected: ExpectedUpdate) -> UpdateManifest:
    try:
        text = manifest_path(path_stem).read_bytes()
    except FileNotFoundError:
        raise UpdateRejected(
            expected.site, expected.round, f"manifest {manifest_path(path_stem)} is missing"
        ) from None
    return parse_manifest(text, expected)


def read_update(path_stem: str | os.PathLike[str], expected: ExpectedUpdate) -> ModelUpdate:
    """Read ``<stem>.safetensors`` + ``<stem>.json`` into memory and :func:`decode_update` them.

    Peak memory is about twice the payload while decoding; see :func:`open_update` for O(1 tensor).
    """
    man = _read_manifest_file(path_stem, expected)
    try:
        payload = payload_path(path_stem).read_bytes()
    except FileNotFoundError:
        raise UpdateRejected(man.site, man.round, f"payload {payload_path(path_stem)} is missing") from None
    return decode_update(payload, man, expected)


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _file_sha256(path: Path) -> str:
    """sha256 of a file through one reused buffer (no per-chunk allocations for the heap to keep)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


class LazyTensors(Mapping[str, torch.Tensor]):
    """Read-only mapping over a validated payload file: each access decodes one tensor.

    ``tensors[name]`` opens the file for that one tensor; iterating ``items()`` opens it once for
    the whole pass. fp32 tensors are memory-mapped (copy-on-write, never written back).
    """

    def __init__(self, path: Path, manifest: UpdateManifest, identity: tuple[int, int, int, int]) -> None:
        self._path = path
        self._manifest = manifest
        self._identity = identity

    def _open(self) -> Any:
        if _file_identity(self._path) != self._identity:
            raise UpdateRejected(
                self._manifest.site, self._manifest.round, f"{self._path} changed after validation"
            )
        return safe_open(os.fspath(self._path), framework="pt")

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._manifest.tensors[name]
        with self._open() as fh:
            return decode_entry(name, spec, self._manifest, fh.get_tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._manifest.tensors)

    def __len__(self) -> int:
        return len(self._manifest.tensors)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        """(name, decoded tensor) pairs in model order, one file open for the whole pass."""
        with self._open() as fh:
            for name, spec in self._manifest.tensors.items():
                yield name, decode_entry(name, spec, self._manifest, fh.get_tensor)


class LazyUpdate(ManifestFields):
    """A validated update file whose tensors are loaded on access (see :func:`open_update`)."""

    def __init__(self, path: Path, manifest: UpdateManifest, identity: tuple[int, int, int, int]) -> None:
        self.path = path
        self.manifest = manifest
        self.tensors: Mapping[str, torch.Tensor] = LazyTensors(path, manifest, identity)

    def load(self) -> ModelUpdate:
        """All tensors in memory (copied out of the file mapping)."""
        return ModelUpdate(tensors={n: t.clone() for n, t in self.tensors.items()}, manifest=self.manifest)

    def __repr__(self) -> str:
        return f"LazyUpdate({self.path}, site={self.site!r}, round={self.round}, kind={self.kind!r})"


def open_update(path_stem: str | os.PathLike[str], expected: ExpectedUpdate) -> LazyUpdate:
    """Validate ``<stem>.safetensors`` + ``<stem>.json`` like :func:`decode_update`, keeping tensors on disk.

    The payload is hashed in chunks and checked tensor by tensor, so peak memory is about one
    tensor (plus file pages the kernel maps and may drop). The file is the receiver's own local
    copy: a later change of its inode, size or mtime makes every access raise :class:`UpdateRejected`.
    """
    man = _read_manifest_file(path_stem, expected)
    path = payload_path(path_stem)
    if not path.is_file():
        raise UpdateRejected(man.site, man.round, f"payload {path} is missing")
    identity = _file_identity(path)
    check_hash(_file_sha256(path), man)
    check_manifest(man, expected)
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            raw_specs: dict[str, TensorSpec] = {}
            names = fh.keys()
            for key in names:
                info = fh.get_slice(key)
                dtype = ST_DTYPES.get(info.get_dtype())
                if dtype is None or dtype not in DTYPES:
                    raise UpdateRejected(
                        man.site,
                        man.round,
                        f"payload tensor {key!r} has unsupported dtype {info.get_dtype()}",
                    )
                raw_specs[key] = TensorSpec(tuple(info.get_shape()), dtype)
            check_specs(raw_specs, payload_specs(man), man.site, man.round, what="payload")
            sq_norm = 0.0
            for name, spec in man.tensors.items():
                tensor = decode_entry(name, spec, man, fh.get_tensor)
                check_finite(name, tensor, man.site, man.round)
                if expected.max_delta_norm is not None and spec.is_floating:
                    sq_norm += delta_sq_norm(name, tensor, man.kind, expected.reference)
            check_norm(sq_norm, expected, man.site, man.round)
    except SafetensorError as exc:
        raise UpdateRejected(man.site, man.round, f"payload is not a safetensors file ({exc})") from None
    if _file_identity(path) != identity:
        raise UpdateRejected(man.site, man.round, f"{path} changed while it was validated")
    return LazyUpdate(path, man, identity)
