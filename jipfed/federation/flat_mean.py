"""FedAvg over the data sections of stored models that share one byte layout, in file order.

The central's usual case: every site's update of a round and the round's start model were written
by the same encoder for the same model, so each tensor sits at the same offset of every file. The
weighted mean then needs no per-tensor work: the float32 tensors of a file are consecutive runs of
one flat array, summed segment by segment with
:func:`~jipfed.federation.aggregate.blocked_weighted_sum` (cache-blocked, on the threads of an
enclosing :func:`~jipfed.federation.sum_threads.sum_threads`; the same operations on every element
as :func:`~jipfed.federation.aggregate.mean_weights`, so the result is bit-identical), and each
finished segment goes straight to the output file's writer
(:meth:`~jipfed.federation.codec.SafetensorsWriter.put_data`: written and hashed in file order on
the hash threads). Integer tensors (BatchNorm's counters) follow the ``integer_mode`` rule of
:class:`~jipfed.federation.aggregate.WeightedMean`. Memory: a ring of segment buffers, reused once
the writer has written and hashed them (no model-sized output: the result is returned as a map of
the written file); the inputs' pages are dropped as they are consumed (they are paged maps of the
files).
"""

from __future__ import annotations

import mmap
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from jipfed.federation.aggregate import (
    LAZY_PASS_MODEL_FRACTION,
    MADV_DONTNEED,
    MAX_RUNNING_TENSORS,
    NonFiniteResult,
    blocked_weighted_sum,
    check_weight,
    fold_integers,
    output_tensor,
    page_hint,
)
from jipfed.federation.codec import SafetensorsWriter
from jipfed.federation.payload_stream import PayloadEntry, StoredUpdate
from jipfed.federation.sum_threads import (
    DONE,
    MIN_PART_ELEMENTS,
    Parts,
    hand_on_done,
    usable_cpus,
    wait_quietly,
)
from jipfed.federation.update import DTYPES
from jipfed.federation.validation import count_non_finite

#: Bytes of float32 data summed and handed to the writer as one piece.
SEGMENT_BYTES = 1 << 22
#: Bytes of each file one summing thread maps at once: a segment is summed in parts of this size.
PART_BYTES = SEGMENT_BYTES // (SEGMENT_BYTES // (MIN_PART_ELEMENTS * 4))
#: Segment buffers a flat mean reuses (more than the pieces summed at once: the writer holds some).
RING_SLOTS = 2 * MAX_RUNNING_TENSORS
#: float32 elements per page of memory.
PAGE_ELEMENTS = mmap.PAGESIZE // 4


@dataclass(frozen=True)
class Piece:
    """A byte range of the data section: a segment of a float32 run, or one integer tensor."""

    begin: int
    end: int
    floats: bool
    #: the integer tensor this piece is (None for a float32 segment)
    entry: PayloadEntry | None = None


def shared_layout(
    start: StoredUpdate, sources: Sequence[StoredUpdate], writer: SafetensorsWriter
) -> list[PayloadEntry] | None:
    """The start model's entries when the flat mean applies, else None.

    It applies when the start model and every source are fp32 (paged) files read without hashing
    (their stored identity is the checked one), every source holds exactly the start model's
    tensors at the same offsets, the writer lays the output out the same way, every float tensor
    is float32 at a 4-byte aligned offset (other float dtypes go tensor by tensor).
    """
    models = [start, *sources]
    if not sources or any(m.digest or not m.paged for m in models):
        return None
    entries = start.entries
    if any(m.entries != entries for m in sources):
        return None
    base = data_base(entries)
    if [e.key for e in entries] != writer.order or set(writer.specs) != set(start.manifest.tensors):
        return None
    for entry in entries:
        dtype = DTYPES.get(entry.dtype)
        if dtype is None or writer.data_range(entry.key) != (entry.begin - base, entry.end - base):
            return None
        if dtype.is_floating_point and (dtype != torch.float32 or (entry.begin - base) % 4):
            return None
    return entries


def fits_one_pass(files: int, model_bytes: int, threads: int | None = None) -> bool:
    """Whether the pages mapped at once (each summing thread's current part of every file) fit in
    :data:`~jipfed.federation.aggregate.LAZY_PASS_MODEL_FRACTION` of a model, as one pass of the
    tensor-by-tensor mean does (many sites or a small model go that way instead)."""
    threads = usable_cpus() if threads is None else threads
    return threads * files * PART_BYTES <= LAZY_PASS_MODEL_FRACTION * model_bytes


def pieces_of(
    entries: Sequence[PayloadEntry], segment_bytes: int = SEGMENT_BYTES, page: int = mmap.PAGESIZE
) -> list[Piece]:
    """The data section in file order: float32 runs cut into segments, integer tensors one by one.

    Segments end on the file's page boundaries (``entries`` carry absolute file offsets), the first
    of a run at the first one: no page is shared by two segments (one segment's dropped pages are
    never another's current ones), and a segment's parts start page-aligned too.
    """
    base = data_base(entries)
    pieces: list[Piece] = []
    run_begin: int | None = None
    run_end = 0

    def close_run() -> None:
        b = run_end if run_begin is None else run_begin
        while b < run_end:
            # to the first page boundary, then a segment of whole pages: all start page-aligned but the first
            step = segment_bytes if (base + b) % page == 0 else 1
            end = min(run_end, -(-(base + b + step) // page) * page - base)
            pieces.append(Piece(b, end, True))
            b = end

    for entry in entries:
        begin, end = entry.begin - base, entry.end - base
        if DTYPES[entry.dtype].is_floating_point:
            if run_begin is None:
                run_begin = begin
            run_end = end
            continue
        close_run()
        run_begin = None
        if end > begin:
            pieces.append(Piece(begin, end, False, entry))
    close_run()
    return pieces


class SegmentRing:
    """Reusable buffers for the pieces of one flat mean: a buffer goes back into use once the
    writer has written and hashed what was handed to it (no fresh model-sized output to fill)."""

    def __init__(self, slots: int, nbytes: int = SEGMENT_BYTES) -> None:
        self._nbytes = nbytes
        self._spare = slots
        self._free: list[torch.Tensor] = []
        self._handed: deque[tuple[torch.Tensor, tuple[Future[None], ...]]] = deque()

    def take(self, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buffer, its first nbytes)``; a piece larger than the ring's buffers gets its own."""
        if nbytes > self._nbytes:
            own = output_tensor(torch.Size([nbytes]), torch.uint8)
            return own, own
        oldest_done = self._handed and all(f.done() for f in self._handed[0][1])
        if not self._free and self._handed and (oldest_done or not self._spare):
            buffer, pending = self._handed.popleft()  # fresh memory only while all are in use
            for future in pending:
                future.result()
            self._free.append(buffer)
        if self._free:
            buffer = self._free.pop()
        else:
            self._spare = max(0, self._spare - 1)
            buffer = output_tensor(torch.Size([self._nbytes]), torch.uint8)
        return buffer, buffer[:nbytes]

    def handed_on(self, buffer: torch.Tensor, pending: tuple[Future[None], ...]) -> None:
        """``buffer`` (from :meth:`take`) is in use until ``pending`` are done."""
        if buffer.numel() == self._nbytes:  # a ring buffer (a larger piece's own is dropped)
            self._handed.append((buffer, pending))


def flat_mean(
    entries: Sequence[PayloadEntry],
    start: StoredUpdate,
    sources: Sequence[StoredUpdate],
    writer: SafetensorsWriter,
    *,
    integer_mode: str,
) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of ``sources`` (``delta`` ones relative to ``start``), written to
    ``writer`` in file order.

    Returns the result's tensors by name: views of a read-only map of the writer's file, so they
    hold the result once :meth:`~jipfed.federation.codec.SafetensorsWriter.finish` returned (the
    pieces are summed in a few reused buffers, never in a model-sized one).

    Raises:
        ValueError: a weight is not a positive number, or a result tensor holds NaN/Inf (named).
    """
    weights = [check_weight(float(s.manifest.n_samples)) for s in sources]
    deltas = [s.manifest.kind == "delta" for s in sources]
    total = sum(weights)
    base_weight = sum(w for w, d in zip(weights, deltas, strict=True) if d)
    g = start.data_section()
    xs = [s.data_section() for s in sources]
    ring = SegmentRing(RING_SLOTS)
    running: deque[tuple[Piece, torch.Tensor, torch.Tensor, Parts]] = deque()

    def f32(x: torch.Tensor, piece: Piece) -> torch.Tensor:
        return x[piece.begin : piece.end].view(torch.float32)

    def integers(piece: Piece, out: torch.Tensor) -> None:
        entry = piece.entry
        assert entry is not None
        dtype = DTYPES[entry.dtype]

        def value(x: torch.Tensor, delta: bool) -> torch.Tensor:
            v = x[piece.begin : piece.end].view(dtype).reshape(entry.shape)
            return g[piece.begin : piece.end].view(dtype).reshape(entry.shape) + v if delta else v

        values = [value(x, d) for x, d in zip(xs, deltas, strict=True)]
        result = fold_integers(values[0].clone(), values[1:], integer_mode)
        out.view(dtype).copy_(result.reshape(-1))

    def hand_on() -> None:
        piece, buffer, out, parts = running.popleft()
        try:
            parts.wait()
        except NonFiniteResult:
            name = _non_finite_name(entries, out, piece)
            raise ValueError(f"tensor {name!r} holds NaN/Inf; refusing to encode it") from None
        if piece.floats:
            page_hint(g[piece.begin : piece.end], MADV_DONTNEED, to_end=piece.end == len(g))
        ring.handed_on(buffer, writer.put_data(piece.begin, memoryview(out.numpy())))

    try:
        for piece in pieces_of(entries):
            buffer, out = ring.take(piece.end - piece.begin)
            if piece.floats:
                parts = blocked_weighted_sum(
                    out.view(torch.float32),
                    [f32(x, piece) for x in xs],
                    weights,
                    paged=[True] * len(xs),
                    acc_dtype=torch.float32,
                    base=f32(g, piece) if base_weight else None,
                    base_weight=base_weight,
                    divide_by=total,
                    align=PAGE_ELEMENTS,  # parts of a page-aligned segment share no page either
                    base_paged=True,
                    check_finite=True,  # in cache, instead of another pass over the result
                    populate=False,  # faults map page-aligned parts' folios for less than madvise does
                )
                running.append((piece, buffer, out, parts))
            else:
                integers(piece, out)
                running.append((piece, buffer, out, DONE))
            hand_on_done(running, hand_on, MAX_RUNNING_TENSORS)
        while running:
            hand_on()
    except BaseException:
        wait_quietly(parts for *_, parts in running)
        raise
    return written_tensors(writer, entries)


def written_tensors(writer: SafetensorsWriter, entries: Sequence[PayloadEntry]) -> dict[str, torch.Tensor]:
    """The writer file's tensors by name, as views of a read-only map of it (untouched: no memory
    until read; what a background write has not written yet reads as zeros)."""
    if writer.size <= writer.data_start:
        return {e.key: torch.empty(e.shape, dtype=DTYPES[e.dtype]) for e in entries}
    with open(writer.path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), writer.size, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # read-only by contract: nothing writes to the result
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mapped, dtype=torch.uint8)[writer.data_start :]
    base = data_base(entries)
    return {
        e.key: data[e.begin - base : e.end - base].view(DTYPES[e.dtype]).reshape(e.shape) for e in entries
    }


def data_base(entries: Sequence[PayloadEntry]) -> int:
    """File offset of the data section the entries describe."""
    return entries[0].begin if entries else 0


def _non_finite_name(entries: Sequence[PayloadEntry], out: torch.Tensor, piece: Piece) -> str:
    """The first tensor within ``piece`` (summed into ``out``) that holds NaN/Inf."""
    base = data_base(entries)
    for e in entries:
        begin, end = max(e.begin - base, piece.begin), min(e.end - base, piece.end)
        if begin < end and count_non_finite(out[begin - piece.begin : end - piece.begin].view(torch.float32)):
            return e.key
    return entries[0].key
