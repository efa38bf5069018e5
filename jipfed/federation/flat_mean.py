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
:class:`~jipfed.federation.aggregate.WeightedMean`. Memory: the output model plus a few segments;
the inputs' pages are dropped as they are consumed (the inputs are paged maps of the files).
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Sequence
from contextlib import suppress
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
from jipfed.federation.sum_threads import DONE, MIN_PART_ELEMENTS, Parts, usable_cpus
from jipfed.federation.update import DTYPES
from jipfed.federation.validation import count_non_finite

#: Bytes of float32 data summed and handed to the writer as one piece.
SEGMENT_BYTES = 1 << 22
#: Bytes of each file one summing thread maps at once: a segment is summed in parts of this size.
PART_BYTES = SEGMENT_BYTES // (SEGMENT_BYTES // (MIN_PART_ELEMENTS * 4))
#: float32 elements per page of memory.
PAGE_ELEMENTS = mmap.PAGESIZE // 4


@dataclass(frozen=True)
class Piece:
    """A byte range of the data section: a segment of a float32 run, or one integer tensor."""

    begin: int
    end: int
    floats: bool


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
    base = entries[0].begin if entries else 0
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
    base = entries[0].begin if entries else 0
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
            pieces.append(Piece(begin, end, False))
    close_run()
    return pieces


def flat_mean(
    entries: Sequence[PayloadEntry],
    start: StoredUpdate,
    sources: Sequence[StoredUpdate],
    writer: SafetensorsWriter,
    *,
    integer_mode: str,
) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of ``sources`` (``delta`` ones relative to ``start``), written to
    ``writer`` in file order; returns the result's tensors by name (views of one buffer).

    Raises:
        ValueError: a weight is not a positive number, or a result tensor holds NaN/Inf (named).
    """
    weights = [check_weight(float(s.manifest.n_samples)) for s in sources]
    deltas = [s.manifest.kind == "delta" for s in sources]
    total = sum(weights)
    base_weight = sum(w for w, d in zip(weights, deltas, strict=True) if d)
    g = start.data_section()
    xs = [s.data_section() for s in sources]
    out = output_tensor(torch.Size([len(g)]), torch.uint8)
    running: deque[tuple[Piece, Parts]] = deque()

    def f32(x: torch.Tensor, piece: Piece) -> torch.Tensor:
        return x[piece.begin : piece.end].view(torch.float32)

    def integers(piece: Piece) -> None:
        entry = next(e for e in entries if e.begin - entries[0].begin == piece.begin)
        dtype = DTYPES[entry.dtype]

        def value(x: torch.Tensor, delta: bool) -> torch.Tensor:
            v = x[piece.begin : piece.end].view(dtype).reshape(entry.shape)
            return g[piece.begin : piece.end].view(dtype).reshape(entry.shape) + v if delta else v

        values = [value(x, d) for x, d in zip(xs, deltas, strict=True)]
        result = fold_integers(values[0].clone(), values[1:], integer_mode)
        out[piece.begin : piece.end].view(dtype).copy_(result.reshape(-1))

    def hand_on() -> None:
        piece, parts = running.popleft()
        try:
            parts.wait()
        except NonFiniteResult:
            name = _non_finite_name(entries, out, piece)
            raise ValueError(f"tensor {name!r} holds NaN/Inf; refusing to encode it") from None
        data = out[piece.begin : piece.end]
        if piece.floats:
            page_hint(g[piece.begin : piece.end], MADV_DONTNEED, to_end=piece.end == len(g))
        writer.put_data(piece.begin, memoryview(data.numpy()))

    try:
        for piece in pieces_of(entries):
            if piece.floats:
                parts = blocked_weighted_sum(
                    f32(out, piece),
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
                )
                running.append((piece, parts))
            else:
                integers(piece)
                running.append((piece, DONE))
            while running and (running[0][1].done() or len(running) > MAX_RUNNING_TENSORS):
                hand_on()
        while running:
            hand_on()
    except BaseException:
        for _, parts in running:  # nothing may still write to ``out`` once this returns
            with suppress(BaseException):
                parts.wait()
        raise
    base = entries[0].begin if entries else 0
    return {e.key: out[e.begin - base : e.end - base].view(DTYPES[e.dtype]).reshape(e.shape) for e in entries}


def _non_finite_name(entries: Sequence[PayloadEntry], out: torch.Tensor, piece: Piece) -> str:
    """The first tensor within ``piece`` that holds NaN/Inf."""
    base = entries[0].begin
    for e in entries:
        begin, end = max(e.begin - base, piece.begin), min(e.end - base, piece.end)
        if begin < end and count_non_finite(out[begin:end].view(torch.float32)):
            return e.key
    return entries[0].key
