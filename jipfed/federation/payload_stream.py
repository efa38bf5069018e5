"""Safetensors update payloads checked while their bytes stream past, and read back from a stored file.

:class:`PayloadChecker` is fed a payload's bytes in order (chunks of any size, e.g. while the
central writes an upload to its store). It hashes them (sha256), parses the safetensors header as
soon as it is complete (checked as safetensors checks it: JSON, known dtypes, offsets contiguous
from 0 to the end of the data), checks the payload's tensor names / shapes / dtypes against the
manifest and its encoding, and decodes and checks each tensor (NaN/Inf, int8 scale, delta norm)
as soon as its bytes are complete. Memory: the header plus the tensor being received. The result,
an :class:`ArrivalCheck`, is what the central records next to the stored update, so aggregation
does not read the update to decide whether to use it. The first problem found is reported, except
that a payload whose bytes do not match the manifest's sha256 is always reported as such.

:class:`StoredUpdate` reads a stored payload file back for aggregation, one tensor per access:
each raw tensor is a copy-on-write memory map of its own byte range of the file (no copy, no
zeroed buffer: the page cache's pages are used directly; writing to it changes only the process's
copy), unmapped when the tensor is dropped; a small one (under :data:`MAP_MIN_BYTES`) is read into
a buffer of its own. :meth:`StoredUpdate.data_section` maps all tensors' bytes at once for a reader
that goes through them in file order (:mod:`jipfed.federation.flat_mean`). An fp32-encoded update's decoded tensors are these
maps, so it is *paged* (:attr:`StoredUpdate.paged`): a reader that consumed part of a tensor may
drop its pages (:mod:`jipfed.federation.aggregate` does so chunk by chunk), so a pass over many
sites holds a few chunks of each, not whole tensors. Aggregation opens an update whose stored identity is still the one recorded
at its arrival check with ``digest=False``: its bytes are not hashed again. Otherwise (and for the
start model) the bytes are hashed as they are read: read in file order (the order its ``tensors``
mapping iterates in), the file is hashed in the same single read; :meth:`StoredUpdate.verify`
hashes what was not read and compares the digest with the one recorded at arrival.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jipfed.federation.aggregate import PAGED_MIN_BYTES
from jipfed.federation.codec import ST_DTYPES, check_hash, decode_entry, payload_specs
from jipfed.federation.update import (
    DTYPES,
    SCALE_SUFFIX,
    ManifestFields,
    TensorSpec,
    UpdateManifest,
    is_buffer,
    is_control,
)
from jipfed.federation.validation import (
    ExpectedUpdate,
    UpdateRejected,
    check_finite,
    check_manifest,
    check_norm,
    check_specs,
    delta_sq_norm,
)

#: safetensors refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
#: Bytes hashed per read when :meth:`StoredUpdate.verify` reads what aggregation did not.
HASH_CHUNK = 1 << 22
ARRIVAL_FORMAT = 1
#: A stored tensor of at least this many bytes is read as a map of the file, a smaller one with one
#: ``pread`` into a buffer of its own (a map costs more than copying a few pages); aggregation drops
#: pages of exactly the former.
MAP_MIN_BYTES = PAGED_MIN_BYTES
_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class PayloadEntry:
    """One tensor of a safetensors payload: its key, dtype name, shape and absolute byte range."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.shape, self.dtype)


def parse_header(text: bytes, data_start: int, data_bytes: int | None) -> list[PayloadEntry]:
    """The entries of a safetensors header in file order; ValueError saying what is wrong.

    ``data_bytes`` (the file size minus ``data_start``), when known, must equal the end of the
    last tensor. The updates of one round usually have byte-identical headers: a header parsed
    recently is not parsed again (only valid ones are remembered).
    """
    return list(_parsed_header(text, data_start, data_bytes))


@functools.lru_cache(maxsize=4)
def _parsed_header(text: bytes, data_start: int, data_bytes: int | None) -> tuple[PayloadEntry, ...]:
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {key!r}: entry must have dtype, shape and data_offsets")
        dtype, shape, offsets = ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']!r}")
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        if not ints or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets
        ):
            raise ValueError(f"tensor {key!r}: shape and data_offsets must be lists of integers >= 0")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {key!r}: data_offsets {offsets} do not hold shape {shape} of {dtype}")
        entries.append(PayloadEntry(key, dtype, tuple(shape), data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.begin, e.end))
    position = data_start
    for entry in entries:
        if entry.begin != position:
            raise ValueError(f"tensor {entry.key!r} does not start where the previous one ends")
        position = entry.end
    if data_bytes is not None and position != data_start + data_bytes:
        raise ValueError(
            f"the tensors cover {position - data_start} bytes of data, the file has {data_bytes}"
        )
    return tuple(entries)


@dataclass(frozen=True)
class ArrivalCheck:
    """What the central found when an update arrived: its bytes' sha256 and size, its delta norm.

    ``delta_norm`` is the L2 norm of the change to the model's float weights (no buffers, no
    control variates), as :func:`jipfed.federation.bounds.delta_norm` computes it; None when it
    could not be computed (a ``"weights"`` update checked without the start model).
    """

    site: str
    round: int
    sha256: str
    size: int
    delta_norm: float | None
    #: The stored object's identity (:meth:`jipfed.storage.base.ModelStore.identity`) when its
    #: bytes were checked; None when not recorded (then aggregation hashes the bytes again).
    identity: Mapping[str, int | str] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"format": ARRIVAL_FORMAT, **self.__dict__}
        data["identity"] = None if self.identity is None else dict(self.identity)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArrivalCheck:
        """Inverse of :meth:`to_dict`; ValueError when it is not one."""
        if not isinstance(data, Mapping) or data.get("format") != ARRIVAL_FORMAT:
            raise ValueError(f"an arrival check is a JSON object with format {ARRIVAL_FORMAT}")
        identity = data.get("identity")
        if identity is not None and not isinstance(identity, Mapping):
            raise ValueError("an arrival check's identity must be a JSON object")
        try:
            return cls(
                data["site"], data["round"], data["sha256"], data["size"], data["delta_norm"], identity
            )
        except KeyError as exc:
            raise ValueError(f"arrival check lacks {exc}") from None


class PayloadChecker:
    """Check a payload fed in order with :meth:`feed`; :meth:`finish` returns the :class:`ArrivalCheck`.

    Args:
        manifest: the update's manifest (checked against ``expected`` here, before any byte).
        expected: what the update must be (identity, specs, norm bound).
        start: the step's start model, to compute the norm of a ``"weights"`` update (optional).

    Raises:
        UpdateRejected: from the constructor (manifest) or :meth:`finish` (payload).
    """

    def __init__(
        self,
        manifest: UpdateManifest,
        expected: ExpectedUpdate,
        start: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if manifest.sha256 is None:
            raise UpdateRejected(manifest.site, manifest.round, "manifest has no sha256")
        check_manifest(manifest, expected)
        self.manifest, self.expected = manifest, expected
        self._start = start if start is not None else expected.reference
        self._hash = hashlib.sha256()
        self._size = 0
        self._head = bytearray()
        self._header_end = 0
        self._entries: list[PayloadEntry] | None = None
        self._index = 0
        self._buffer = bytearray()
        self._scales: dict[str, torch.Tensor] = {}
        self._waiting: dict[str, torch.Tensor] = {}  # int8 tensors whose scale comes later
        self._sq_norm = 0.0
        self._bounded_sq: float | None = 0.0 if manifest.kind == "delta" or self._start is not None else None
        self._error: UpdateRejected | None = None

    def _reject(self, reason: str) -> UpdateRejected:
        return UpdateRejected(self.manifest.site, self.manifest.round, reason)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Hash and check the next bytes of the payload."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._size += len(view)
        try:
            while view and self._error is None:
                view = self._take_header(view) if self._entries is None else self._take_data(view)
        except UpdateRejected as exc:
            self._error = exc  # reported by finish(), unless the bytes are not the manifest's

    def _take_header(self, view: memoryview) -> memoryview:
        if len(self._head) < _LENGTH.size:
            take = min(_LENGTH.size - len(self._head), len(view))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) < _LENGTH.size:
                return view
            (length,) = _LENGTH.unpack(self._head)
            if not 0 < length <= MAX_HEADER_BYTES:
                raise self._reject(f"payload is not a safetensors file (header length {length})")
            self._header_end = _LENGTH.size + length
        take = min(self._header_end - len(self._head), len(view))
        self._head += view[:take]
        if len(self._head) == self._header_end:
            try:
                self._entries = parse_header(bytes(self._head[_LENGTH.size :]), self._header_end, None)
            except ValueError as exc:
                raise self._reject(f"payload is not a safetensors file ({exc})") from None
            raw = {e.key: e.spec for e in self._entries}
            man = self.manifest
            check_specs(raw, payload_specs(man), man.site, man.round, what="payload")
            self._next_entry()
        return view[take:]

    def _take_data(self, view: memoryview) -> memoryview:
        assert self._entries is not None
        if self._index >= len(self._entries):
            raise self._reject("payload has bytes after its last tensor")
        entry = self._entries[self._index]
        take = min(entry.nbytes - len(self._buffer), len(view))
        self._buffer += view[:take]
        if len(self._buffer) == entry.nbytes:
            self._index += 1
            self._on_entry(entry, self._buffer)
            self._next_entry()
        return view[take:]

    def _next_entry(self) -> None:
        """Start the next tensor's buffer; tensors of zero bytes are complete at once."""
        assert self._entries is not None
        self._buffer = bytearray()
        while self._index < len(self._entries) and self._entries[self._index].nbytes == 0:
            self._index += 1
            self._on_entry(self._entries[self._index - 1], bytearray())

    def _on_entry(self, entry: PayloadEntry, data: bytearray) -> None:
        raw = _tensor_from(data, entry)
        if entry.key.endswith(SCALE_SUFFIX):
            name = entry.key[: -len(SCALE_SUFFIX)]
            self._scales[name] = raw
            if name in self._waiting:
                self._check(name, self._waiting.pop(name))
        elif self.manifest.encoding == "int8" and self.manifest.tensors[entry.key].is_floating:
            if entry.key in self._scales:
                self._check(entry.key, raw)
            else:
                self._waiting[entry.key] = raw
        else:
            self._check(entry.key, raw)

    def _check(self, name: str, raw: torch.Tensor) -> None:
        spec, man = self.manifest.tensors[name], self.manifest
        tensor = decode_entry(name, spec, man, lambda key: raw if key == name else self._scales[name])
        check_finite(name, tensor, man.site, man.round)
        if not tensor.is_floating_point():
            return
        if self.expected.max_delta_norm is not None:
            self._sq_norm += delta_sq_norm(name, tensor, man.kind, self.expected.reference)
        if self._bounded_sq is not None and not is_control(name) and not is_buffer(name):
            delta = tensor.double() if man.kind == "delta" else tensor.double() - self._start[name].double()
            self._bounded_sq += float(torch.sum(delta * delta))

    def finish(self) -> ArrivalCheck:
        """The check of the whole payload; UpdateRejected naming the first problem."""
        check_hash(self._hash.hexdigest(), self.manifest)
        if self._error is not None:
            raise self._error
        if self._entries is None or self._index < len(self._entries):
            raise self._reject(
                f"payload is not a complete safetensors file: it ends after {self._size} bytes, "
                "before its last tensor"
            )
        man = self.manifest
        check_norm(self._sq_norm, self.expected, man.site, man.round)
        norm = None if self._bounded_sq is None else math.sqrt(self._bounded_sq)
        return ArrivalCheck(man.site, man.round, self._hash.hexdigest(), self._size, norm)


def _tensor_from(data: bytearray | memoryview, entry: PayloadEntry) -> torch.Tensor:
    dtype = DTYPES[entry.dtype]
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)


class CheckingReader:
    """A binary stream that feeds every byte read from ``stream`` to ``checker`` (for ``put_stream``)."""

    def __init__(self, stream: Any, checker: PayloadChecker) -> None:
        self._stream, self._checker = stream, checker

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._checker.feed(data)
        return data


def check_payload(payload: bytes, checker: PayloadChecker, chunk: int = HASH_CHUNK) -> ArrivalCheck:
    """Feed ``payload`` to ``checker`` in chunks and finish it."""
    view = memoryview(payload)
    for start in range(0, len(view), chunk):
        checker.feed(view[start : start + chunk])
    return checker.finish()


class HashPipeline:
    """sha256 updates on background threads, in order per digest, holding at most ``limit_bytes`` of buffers.

    Aggregation reads a tensor, hands its bytes here and sums it while they are hashed; when the
    buffers not hashed (or written, :meth:`call`) yet exceed the limit, :meth:`update` and
    :meth:`call` wait for the oldest (memory stays bounded).
    """

    def __init__(self, threads: int, limit_bytes: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="jipfed-hash")
        self._limit = max(1, limit_bytes)
        self._queue: deque[tuple[Future[None], int]] = deque()
        self._held = 0
        self._last: dict[int, Future[None]] = {}

    def update(self, digest: Any, view: memoryview) -> Future[None]:
        """``digest.update(view)`` after the earlier updates of ``digest``; ``view`` must stay unchanged
        until the returned future is done."""
        future = self._pool.submit(_update_after, self._last.get(id(digest)), digest, view)
        self._last[id(digest)] = future
        self._hold(future, len(view))
        return future

    def call(self, fn: Callable[[], None], nbytes: int) -> Future[None]:
        """Run ``fn()`` on a background thread, not ordered with the digests (e.g. writing ``nbytes``
        of a buffer that must stay unchanged until it is done); counts in the held bytes."""
        future = self._pool.submit(fn)
        self._hold(future, nbytes)
        return future

    def _hold(self, future: Future[None], nbytes: int) -> None:
        self._queue.append((future, nbytes))
        self._held += nbytes
        while self._held > self._limit and self._queue:
            done, n = self._queue.popleft()
            done.result()
            self._held -= n

    def wait(self, digest: Any) -> None:
        """Until every update of ``digest`` handed in so far is done."""
        future = self._last.pop(id(digest), None)
        if future is not None:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._queue.clear()
        self._held = 0

    def __enter__(self) -> HashPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _update_after(previous: Future[None] | None, digest: Any, view: memoryview) -> None:
    if previous is not None:
        previous.result()  # submitted earlier, so already running or done: no deadlock
    digest.update(view)


class StoredUpdate(ManifestFields):
    """A stored update file read back one tensor per access, hashed as it is read (see module docstring).

    Args:
        path: the payload file (the store's own file, or a local copy of it).
        manifest: its manifest; ``manifest.sha256`` is the digest checked at arrival.
        hashing: hash on these background threads instead of the reading thread (``hashing``
            may also be set after opening, before the first read).
        digest: hash the bytes read (for :meth:`verify`); False when the caller knows the file
            is unchanged since its check in another way (its stored identity), so nothing is hashed.
        unchanged: with ``digest=False``, what :meth:`verify` asks instead of hashing: how the
            stored object changed since its check (e.g. "its mtime_ns changed"), None if it did not.

    Raises:
        UpdateRejected: the file is missing, not safetensors, or its tensors differ from the manifest.
    """

    def __init__(
        self,
        path: Path,
        manifest: UpdateManifest,
        hashing: HashPipeline | None = None,
        *,
        digest: bool = True,
        unchanged: Callable[[], str | None] | None = None,
    ) -> None:
        self.path, self.manifest = path, manifest
        self.hashing, self.digest, self._unchanged = hashing, digest, unchanged
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._reject(f"stored payload cannot be opened ({exc.strerror})") from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.tensors: Mapping[str, torch.Tensor] = _StoredTensors(self)

    def _reject(self, reason: str) -> UpdateRejected:
        return UpdateRejected(self.manifest.site, self.manifest.round, reason)

    def _open(self) -> None:
        self._file_size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, _LENGTH.size, 0)
        (length,) = _LENGTH.unpack(head) if len(head) == _LENGTH.size else (0,)
        if not 0 < length <= min(MAX_HEADER_BYTES, self._file_size - _LENGTH.size):
            raise self._reject("stored payload is not a safetensors file (header length)")
        text = os.pread(self._fd, length, _LENGTH.size)
        start = _LENGTH.size + length
        try:
            entries = parse_header(text, start, self._file_size - start)
        except ValueError as exc:
            raise self._reject(f"stored payload is not a safetensors file ({exc})") from None
        self._entries = {e.key: e for e in entries}
        check_specs(
            {e.key: e.spec for e in entries},
            payload_specs(self.manifest),
            self.site,
            self.round,
            what="stored payload",
        )
        self._hash = hashlib.sha256(head + text)
        self._hashed_to = self._data_start = start
        self._file_entries = entries
        self._in_order = True
        # the order of the model tensors in the file (an int8 tensor by its data, not its scale)
        self.order = sorted(self.manifest.tensors, key=lambda n: self._entries[n].begin)

    @property
    def tensor_bytes(self) -> tuple[int, int]:
        """(largest tensor, whole model) in bytes, decoded: what one pass over this update holds at once."""
        sizes = [spec.numel * DTYPES[spec.dtype].itemsize for spec in self.manifest.tensors.values()]
        return max(sizes), sum(sizes)

    @property
    def entries(self) -> list[PayloadEntry]:
        """The payload's tensors as stored (key, dtype, shape, absolute byte range), in file order."""
        return list(self._file_entries)

    def data_section(self) -> torch.Tensor:
        """The whole data section (every tensor's bytes, in file order) as one uint8 copy-on-write map.

        For a reader that goes through the file in order, e.g. a flat mean; its pages are the page
        cache's, dropped by the reader as it goes (as for a paged tensor). Only for an update
        opened with ``digest=False``: these bytes are not hashed.
        """
        if self.digest:
            raise RuntimeError(f"{self!r} hashes what it reads: read it tensor by tensor")
        size = self._file_size - self._data_start
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        start = self._data_start - self._data_start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, self._file_size - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise self._reject(f"stored payload cannot be mapped (changed since arrival: {exc})") from None
        return torch.frombuffer(mapped, dtype=torch.uint8)[self._data_start - start :]

    @property
    def paged(self) -> bool:
        """Whether every float tensor read is a fresh, unwritten map of the file (fp32: not decoded)."""
        return self.manifest.encoding == "fp32"

    def read_raw(self, key: str) -> torch.Tensor:
        """The raw payload tensor ``key`` (its bytes hashed when they follow what was hashed so far)."""
        entry = self._entries[key]
        buffer = self._map(entry)
        if not self.digest:
            pass
        elif entry.begin == self._hashed_to:
            view = memoryview(buffer.numpy())
            if self.hashing is None:
                self._hash.update(view)
            else:
                self.hashing.update(self._hash, view)
            self._hashed_to = entry.end
        elif entry.begin > self._hashed_to:
            self._in_order = False
        return (
            buffer.view(DTYPES[entry.dtype]).reshape(entry.shape)
            if entry.nbytes
            else torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        )

    def _map(self, entry: PayloadEntry) -> torch.Tensor:
        """The entry's bytes as a private (copy-on-write) map of the file, unmapped with the tensor; a
        small entry (under :data:`MAP_MIN_BYTES`) is read into a buffer of its own instead."""
        if not entry.nbytes:
            return torch.empty(0, dtype=torch.uint8)
        if entry.nbytes < MAP_MIN_BYTES:
            data = bytearray(entry.nbytes)
            if os.preadv(self._fd, [data], entry.begin) != entry.nbytes:
                raise self._reject(
                    f"stored payload cannot hold tensor {entry.key!r} (changed since arrival: too short)"
                )
            return torch.frombuffer(data, dtype=torch.uint8)
        start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, entry.end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise self._reject(
                f"stored payload cannot hold tensor {entry.key!r} (changed since arrival: {exc})"
            ) from None
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        return torch.frombuffer(mapped, dtype=torch.uint8)[entry.begin - start :]

    def tensor(self, name: str) -> torch.Tensor:
        """Decoded tensor ``name`` (dtype of its manifest spec)."""
        return decode_entry(name, self.manifest.tensors[name], self.manifest, self.read_raw)

    def verify(self) -> None:
        """Hash what was not read in order and compare with the arrival digest; UpdateRejected if changed.

        Opened with ``digest=False``: ask ``unchanged`` instead (after the reads, as before them).
        """
        if not self.digest:
            if self._unchanged is None:
                raise RuntimeError(f"{self!r} was opened with digest=False: its bytes were not hashed")
            change = self._unchanged()
            if change is not None:
                raise self._reject(f"stored payload changed since its check in round {self.round} ({change})")
            return
        if self.hashing is not None:
            self.hashing.wait(self._hash)
        if not self._in_order:  # read out of file order: hash the whole file again
            self._hash = hashlib.sha256()
            self._hashed_to = 0
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        while self._hashed_to < self._file_size:
            n = os.preadv(self._fd, [view[: self._file_size - self._hashed_to]], self._hashed_to)
            if n == 0:
                break
            self._hash.update(view[:n])
            self._hashed_to += n
        digest = self._hash.hexdigest()
        if digest != self.manifest.sha256:
            raise self._reject(
                f"stored payload sha256 {digest[:12]}... differs from the {str(self.manifest.sha256)[:12]}... "
                "checked at arrival (changed since)"
            )

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StoredUpdate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoredUpdate({self.path}, site={self.site!r}, round={self.round}, kind={self.kind!r})"


class _StoredTensors(Mapping[str, torch.Tensor]):
    """Read-only mapping over a :class:`StoredUpdate`; iterates in file order, each access reads."""

    def __init__(self, update: StoredUpdate) -> None:
        self._update = update

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._update.manifest.tensors:
            raise KeyError(name)
        return self._update.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._update.order)

    def __len__(self) -> int:
        return len(self._update.order)
