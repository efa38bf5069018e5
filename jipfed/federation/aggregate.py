"""Aggregation maths over named tensors: a cache-blocked weighted mean and coordinate-wise robust reducers.

Strategies call these functions; they hold no strategy state.

Cache blocking
    Every float tensor is walked in chunks of :data:`CHUNK_ELEMENTS` elements per torch intra-op
    thread. For one chunk, all sites of the current pass are combined into a small buffer that stays
    in the CPU cache (``torch.mul(x0, w0, out=a); a.add_(x1, alpha=w1); ...``) and written once.
    A weighted mean over sites that are all available at once (in memory, or lazily opened files)
    therefore reads every input once and writes the result once: (sites + 1) model-sized memory
    passes, the minimum. Adding sites one at a time instead reads and writes the accumulator per
    site: (3 x sites + 1) passes. Intra-op threads are torch's (``torch.set_num_threads``); inside
    :func:`~jipfed.federation.sum_threads.sum_threads` (what ``aggregate_step`` uses) each float
    tensor is instead queued, in parts, on one thread per CPU while the pass goes on with the next
    tensors, and handed to ``on_tensor`` in order once complete (same operations per element).

Memory
    :class:`WeightedMean` takes sites in passes (``add`` = a pass of one site, ``add_group`` = a pass
    of several, ``result(last)`` = a final pass that also divides and writes the result). Anonymous
    memory is one model (the accumulator, or directly the result for a single pass) plus chunk-sized
    buffers, for any number of sites. :func:`mean_weights` streams an iterator one update at a time
    (the caller's decoded updates are never kept) and takes a sequence in one pass, or in passes of
    ``sites_per_pass`` sites. A :class:`~jipfed.federation.codec.LazyUpdate` is read in one pass
    over its memory-mapped file: the file's pages are page-cache pages, not new memory, but they
    count in the process's RSS while the pass runs, so a single pass over n lazy sites shows up to
    n models of file-backed RSS. ``sites_per_pass=k`` bounds that to k models (each further pass
    costs two accumulator passes). A :class:`~jipfed.federation.payload_stream.StoredUpdate` (what
    the central's ``aggregate_step`` reads) is *paged*: each tensor access maps that tensor's bytes
    afresh, so the pass asks the kernel for a chunk's pages just before it sums the chunk
    (``MADV_POPULATE_READ``: page-cache pages, no copy) and drops them right after
    (``MADV_DONTNEED``). One site then holds about a chunk while a pass runs, and a stream of them
    goes in passes of :func:`sites_per_lazy_pass` sites (a quarter of a model of chunks: all sites
    of a usual federation in one pass). Measured in ``tests/federation/test_aggregate.py``.

    Coordinate-wise median and trimmed mean need all sites' values of a coordinate at once, so they
    cannot stream over sites. :func:`coordinatewise_median` and :func:`coordinatewise_trimmed_mean`
    go tensor by tensor (``update.tensors[name]``: a lazy update maps only that tensor) and chunk
    by chunk: the sites' values of one chunk are sorted in cache by a sorting network (n <=
    :data:`NETWORK_MAX_SITES`; ``torch.sort`` above). Peak memory: the output model plus the sites'
    current tensor (O(n_sites x largest tensor), file-backed for lazy updates) plus (n + 1) chunks.

Accumulation dtype
    Float tensors accumulate in ``accumulate_dtype``; None means float32 for float32 / float16 /
    bfloat16 inputs and float64 for float64 inputs. float32 accumulation of N sites errs by at
    most about N x 6e-8 of the weights' magnitude, i.e. N float32 roundings; pass ``torch.float64``
    (twice the accumulator memory) when that matters, e.g. for server optimisers fed tiny
    pseudo-gradients of "weights" updates, where the error is relative to the weights, not the delta.
    Blocking does not change the arithmetic: a single pass and a site-by-site stream perform the
    same operations on every element in the same order.

Integer buffers
    Integer and bool tensors (BatchNorm's ``num_batches_tracked``) are never averaged as floats.
    The weighted mean takes their element-wise maximum over the sites' values (a step counter stays
    "the most trained site's count"; ``integer_mode="first"`` keeps the first site's value
    instead); the robust reducers take the lower median of the sites' values, so one site cannot
    push them anywhere.

Updates of kind ``"delta"`` are taken relative to the round's global weights (site model =
global + delta). Weighted means are formed in weights space; the ``global`` term of delta updates
is added once at the end (``acc += W_delta * global``), never per site.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import math
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import torch

from jipfed.federation import sum_threads as parallel
from jipfed.federation.sum_threads import DONE, Parts, hand_on_done, start_parts, wait_quietly
from jipfed.federation.update import UpdateSource

logger = logging.getLogger(__name__)

INTEGER_MODES = ("max", "first")
#: Elements per chunk and intra-op thread (2 MiB of float32): measured fastest from 2^18 to 2^21 on
#: a 2-core EPYC (1 MiB L2 per core, 32 MiB L3); smaller chunks pay per-operation overhead.
CHUNK_ELEMENTS = 1 << 19
#: Up to this many sites the robust reducers sort with a Batcher odd-even merge network (element-wise
#: min / max in cache); above, ``torch.sort``. Measured per sorted value on 64 K-element chunks: 1.7 vs
#: 15 ns (8 sites), 5.3 vs 77 ns (64), 9.7 vs 82 ns (128).
NETWORK_MAX_SITES = 128
#: Tensors of the sites of one pass over updates read per tensor may hold this fraction of a model.
LAZY_PASS_MODEL_FRACTION = 0.25
#: Chunk per thread of the robust reducers: (sites + 1) rows of it stay in cache while sorted.
SORT_CHUNK_ELEMENTS = 1 << 16
#: Tensors of one pass being summed at once inside ``sum_threads`` before the oldest is waited for.
MAX_RUNNING_TENSORS = 8
#: A paged source's tensors of at least this many bytes are file mappings whose pages a pass drops;
#: smaller ones may be buffers of their own (a map costs more than copying a few pages), never touched.
PAGED_MIN_BYTES = 1 << 18
#: Called with each result tensor (name, tensor) as soon as it is final, e.g. to write it out.
TensorSink = Callable[[str, torch.Tensor], None]


def accumulation_dtype(dtype: torch.dtype, accumulate_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype float tensors of ``dtype`` accumulate in (see module docstring)."""
    if accumulate_dtype is not None:
        return torch.promote_types(dtype, accumulate_dtype)
    return torch.promote_types(dtype, torch.float32)


def _check_accumulate_dtype(accumulate_dtype: torch.dtype | None) -> None:
    if accumulate_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(
            f"accumulate_dtype must be None, torch.float32 or torch.float64, got {accumulate_dtype!r}"
        )


def chunk_elements(per_thread: int | None = None) -> int:
    """Chunk length for the current torch intra-op thread count (default :data:`CHUNK_ELEMENTS` each)."""
    return (CHUNK_ELEMENTS if per_thread is None else per_thread) * max(1, torch.get_num_threads())


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1)


class Contribution(NamedTuple):
    """One site's share of a weighted mean: ``weight * tensors`` (``weight * (base + tensors)`` with a base)."""

    tensors: Mapping[str, torch.Tensor]
    weight: float
    base: Mapping[str, torch.Tensor] | None = None
    #: the tensors are fresh file mappings only this pass reads: their pages are dropped once summed
    paged: bool = False


def check_weight(weight: object) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0.0 < weight < float("inf")):
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    return float(weight)


class WeightedMean:
    """Weighted mean of named tensors, accumulated in cache-blocked passes over groups of sites.

    Args:
        accumulate_dtype: float accumulation dtype; None = float32 or wider (module docstring).
        integer_mode: ``"max"`` (element-wise maximum) or ``"first"`` for integer / bool tensors.

    ``add(tensors, weight)`` accumulates one site, ``add_group(contributions)`` several in one pass,
    ``result(last=())`` adds ``last`` in the final pass that divides and writes the result: with
    every site in ``last`` the mean is a single pass. Every contribution must bring the same names
    with the same shapes and dtypes. A contribution with ``base=g`` holds deltas relative to ``g``
    (the same mapping object for every such contribution): the site's model is ``g + tensors``.
    ``result()`` returns tensors in the input dtypes; it may be called once. A pass that fails
    part-way (e.g. a shape mismatch in a later tensor) leaves the accumulator unusable.
    """

    def __init__(self, *, accumulate_dtype: torch.dtype | None = None, integer_mode: str = "max") -> None:
        _check_accumulate_dtype(accumulate_dtype)
        if integer_mode not in INTEGER_MODES:
            raise ValueError(f"integer_mode must be one of {INTEGER_MODES}, got {integer_mode!r}")
        self._accumulate_dtype = accumulate_dtype
        self._integer_mode = integer_mode
        self._acc: dict[str, torch.Tensor] = {}
        self._specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._total = 0.0
        self._base: Mapping[str, torch.Tensor] | None = None
        self._base_weight = 0.0
        self._count = 0
        self._done = False
        self._broken = False

    @property
    def count(self) -> int:
        """Number of contributions accumulated so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    def add(
        self,
        tensors: Mapping[str, torch.Tensor],
        weight: float,
        *,
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Accumulate ``weight * tensors`` (``weight * (base + tensors)`` when ``base`` is given)."""
        self.add_group([Contribution(tensors, weight, base)])

    def add_group(self, contributions: Sequence[Contribution]) -> None:
        """Accumulate several contributions in one pass (each input read once, the accumulator once)."""
        if not contributions:
            raise ValueError("add_group() needs at least one contribution")
        self._pass(contributions, finish=False)

    def result(
        self, last: Sequence[Contribution] = (), on_tensor: TensorSink | None = None
    ) -> dict[str, torch.Tensor]:
        """The weighted mean by name, in the input dtypes, after adding ``last`` in the same pass.

        ``on_tensor(name, tensor)`` is called for each result tensor as soon as it is final.
        """
        return self._pass(last, finish=True, on_tensor=on_tensor)

    # ---- one pass ---------------------------------------------------------------------------------

    def _pass(
        self, group: Sequence[Contribution], *, finish: bool, on_tensor: TensorSink | None = None
    ) -> dict[str, torch.Tensor]:
        """Accumulate ``group``; with ``finish``, also divide and return the result (else ``{}``)."""
        if self._done:
            raise RuntimeError("result() was already called; start a new WeightedMean")
        if self._broken:
            raise RuntimeError("an earlier pass failed part-way; start a new WeightedMean")
        if not group and self._count == 0:
            raise ValueError("nothing to average: add() was never called")
        weights = [check_weight(c.weight) for c in group]
        bases = {id(c.base): c.base for c in group if c.base is not None}
        if self._base is not None:
            bases.setdefault(id(self._base), self._base)
        if len(bases) > 1:
            raise ValueError("all delta contributions must share one base mapping")
        first = self._count == 0
        names = list(group[0].tensors) if first else list(self._specs)
        total = self._total + sum(weights)
        base_weight = self._base_weight + sum(
            w for w, c in zip(weights, group, strict=True) if c.base is not None
        )
        base = next(iter(bases.values()), None)
        out: dict[str, torch.Tensor] = {}
        touched = False
        # tensors being summed (on the threads of an enclosing ``sum_threads``), handed on in order
        running: deque[tuple[str, torch.Tensor, Parts]] = deque()

        def hand_on() -> None:
            name, dest, parts = running.popleft()
            parts.wait()
            if finish:
                out[name] = dest
                if on_tensor is not None:
                    on_tensor(name, dest)

        try:
            for name, tensors in _lockstep([c.tensors for c in group], names):
                spec = self._check_specs(name, tensors)
                touched = True
                if spec[1].is_floating_point:
                    paged = [c.paged for c in group]
                    running.append(
                        (
                            name,
                            *self._float_tensor(
                                name, spec, tensors, weights, paged, finish, base, base_weight, total
                            ),
                        )
                    )
                else:
                    running.append((name, self._integer_tensor(name, tensors, [c.base for c in group]), DONE))
                hand_on_done(running, hand_on, MAX_RUNNING_TENSORS)
            while running:
                hand_on()
        except BaseException:
            wait_quietly(parts for _, _, parts in running)  # nothing may still write to the accumulator
            self._broken = touched  # a failure before the first tensor leaves nothing half-added
            raise
        self._total, self._base_weight, self._base = total, base_weight, base
        self._count += len(group)
        if finish:
            self._done = True
            self._acc.clear()
        return out

    def _check_specs(self, name: str, tensors: list[torch.Tensor]) -> tuple[torch.Size, torch.dtype]:
        # the first pass takes the specs from its first contribution; later passes may have no tensors
        spec = self._specs.get(name) or (tensors[0].shape, tensors[0].dtype)
        for tensor in tensors:
            if (tensor.shape, tensor.dtype) != spec:
                raise ValueError(
                    f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{tuple(spec[0])} {spec[1]}"
                )
        self._specs[name] = spec
        return spec

    def _float_tensor(
        self,
        name: str,
        spec: tuple[torch.Size, torch.dtype],
        tensors: list[torch.Tensor],
        weights: list[float],
        paged: list[bool],
        finish: bool,
        base: Mapping[str, torch.Tensor] | None,
        base_weight: float,
        total: float,
    ) -> tuple[torch.Tensor, Parts]:
        """The tensor ``name`` of this pass and its parts being summed (see :func:`blocked_weighted_sum`)."""
        shape, dtype = spec
        acc_dtype = accumulation_dtype(dtype, self._accumulate_dtype)
        acc = self._acc.pop(name, None)
        if not finish:
            dest = acc if acc is not None else output_tensor(shape, acc_dtype)
            self._acc[name] = dest
        elif acc is not None and acc.dtype == dtype:
            dest = acc  # divide in place
        else:
            dest = output_tensor(shape, dtype)
        parts = blocked_weighted_sum(
            dest,
            tensors,
            weights,
            paged=paged,
            acc=acc,
            acc_dtype=acc_dtype,
            base=base[name] if finish and base is not None and base_weight else None,
            base_weight=base_weight,
            divide_by=total if finish else None,
        )
        return dest, parts

    def _integer_tensor(
        self,
        name: str,
        tensors: list[torch.Tensor],
        bases: list[Mapping[str, torch.Tensor] | None],
    ) -> torch.Tensor:
        values = [x if b is None else b[name] + x for x, b in zip(tensors, bases, strict=True)]
        acc = self._acc.get(name)
        if acc is None:  # first pass: it has at least one contribution
            acc = self._acc[name] = values[0].clone()
            values = values[1:]
        return fold_integers(acc, values, self._integer_mode)


class NonFiniteResult(ValueError):
    """A weighted sum came out NaN/Inf (finite inputs that overflow float32)."""


def fold_integers(acc: torch.Tensor, values: Iterable[torch.Tensor], mode: str) -> torch.Tensor:
    """Integer buffers: ``acc`` becomes (in place) the element-wise maximum with ``values`` (mode
    ``"max"``) or stays the first site's value (``"first"``); returns ``acc``."""
    if mode == "max":
        for value in values:
            torch.maximum(acc, value, out=acc)
    return acc


def blocked_weighted_sum(
    dest: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    paged: Sequence[bool] = (),
    acc: torch.Tensor | None = None,
    acc_dtype: torch.dtype,
    base: torch.Tensor | None = None,
    base_weight: float = 0.0,
    divide_by: float | None = None,
    align: int = 16,
    base_paged: bool = False,
    check_finite: bool = False,
    populate: bool = True,
) -> Parts:
    """``dest = (acc + sum_i weights[i] * inputs[i] [+ base_weight * base]) [/ divide_by]``, chunk by chunk.

    All tensors have ``dest``'s shape. Each chunk is formed in a cache-sized buffer in ``acc_dtype``
    (``dest``'s chunk itself when ``dest`` has that dtype) and written once; ``acc`` may be ``dest``
    (accumulate in place) or None (the first input starts the sum). A tensor of at most one chunk and
    fewer than :data:`~jipfed.federation.sum_threads.MIN_PART_ELEMENTS` elements is taken whole (no
    views: per-operation overhead dominates small tensors); inside
    :func:`~jipfed.federation.sum_threads.sum_threads`, the tensor is queued on its threads (a large
    one in parts; each element is still computed by the same operations) and the returned
    :class:`~jipfed.federation.sum_threads.Parts` says when ``dest`` is complete (``wait()``);
    outside, it is complete on return. The inputs must stay unchanged until then. ``paged[i]``: input
    ``i``, if of at least :data:`PAGED_MIN_BYTES`, is a file mapping nobody else uses; each chunk's
    pages are populated before and dropped after it is summed (see the module docstring);
    ``base_paged``: the same for ``base``; ``populate=False`` leaves the populating to page faults
    (cheaper on kernels whose fault-around maps a page-cache folio at once, for chunks that start
    on page boundaries; the pages are still dropped). ``check_finite``: each chunk is checked while in cache
    (:class:`NonFiniteResult` from ``wait()`` when it holds NaN/Inf). A large
    tensor's parts start at multiples of ``align`` elements (at least 16: no shared cache line).
    """
    if acc is None and not inputs:
        raise ValueError("blocked_weighted_sum needs an accumulator or at least one input")
    numel = dest.numel()
    step = chunk_elements()
    in_place = acc is not None and acc.data_ptr() == dest.data_ptr()
    flat = numel > min(step, parallel.MIN_PART_ELEMENTS)  # more than one chunk, or cut into parts
    if flat:
        dest, inputs = _flat(dest), [_flat(x) for x in inputs]
        acc = None if acc is None else _flat(acc)
        base = None if base is None else _flat(base)
    mapped = [
        x
        for x, p in [*zip(inputs, paged, strict=False), (base, base_paged)]
        if p and x is not None and x.numel() * x.element_size() >= PAGED_MIN_BYTES
    ]

    def chunks(begin: int, end: int) -> None:
        scratch = None
        if dest.dtype != acc_dtype:
            scratch = torch.empty((min(step, end - begin),) if flat else dest.shape, dtype=acc_dtype)
        for start in range(begin, end, step):
            span = slice(start, min(start + step, end)) if flat else None
            for x in mapped if populate else ():
                page_hint(_part(x, span), MADV_POPULATE_READ)
            d = _part(dest, span)
            a = (
                d
                if scratch is None
                else _part(scratch, None if span is None else slice(0, span.stop - start))
            )
            rest = zip(inputs, weights, strict=True)
            if acc is None:
                x, w = next(rest)
                if x.dtype == a.dtype:
                    torch.mul(_part(x, span), w, out=a)
                else:
                    a.copy_(_part(x, span)).mul_(w)
            elif not in_place:
                a.copy_(_part(acc, span))
            for x, w in rest:
                a.add_(_part(x, span), alpha=w)
            if base is not None:
                a.add_(_part(base, span), alpha=base_weight)
            if divide_by is not None:
                a.div_(divide_by)
            if a is not d:
                d.copy_(a)
            if check_finite and not math.isfinite(float(a.sum())) and not torch.isfinite(a).all():
                raise NonFiniteResult("the result holds NaN/Inf")
            for x in mapped:
                page_hint(_part(x, span), MADV_DONTNEED, to_end=span is None or span.stop == numel)

    return start_parts(numel, chunks, align)


def _part(x: torch.Tensor, span: slice | None) -> torch.Tensor:
    return x if span is None else x[span]


#: Output tensors of at least this many bytes get their own mapping in transparent huge pages.
HUGE_PAGE_BYTES = 1 << 21


def output_tensor(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for a result; a large one is its own mapping asking for huge pages.

    Its first write then faults 2 MiB pages, not 4 KiB ones (about half the cost of filling fresh
    memory), and the mapping goes back to the kernel when the tensor is dropped.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapped.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapped, dtype=dtype).reshape(shape)


MADV_DONTNEED = mmap.MADV_DONTNEED
#: Linux >= 5.14: fault the range's pages in at once (read-only; a private mapping stays copy-on-write).
MADV_POPULATE_READ = 22
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def page_hint(x: torch.Tensor, advice: int, *, to_end: bool = True) -> None:
    """``madvise`` the pages of a file-mapped tensor's bytes.

    ``MADV_POPULATE_READ`` covers every page the bytes touch (nothing when the kernel lacks it);
    ``MADV_DONTNEED`` only pages that end inside them, up to the last page with ``to_end`` (the
    tensor is done). Only for a private mapping nothing wrote to: dropped pages are read again
    from the file when touched.

    Raises:
        OSError: the mapping reaches past the end of its file (the file was truncated while read).
    """
    begin, end = x.data_ptr(), x.data_ptr() + x.numel() * x.element_size()
    first = begin - begin % mmap.PAGESIZE
    last = end + (-end % mmap.PAGESIZE if advice != MADV_DONTNEED or to_end else -(end % mmap.PAGESIZE))
    if last <= first or _LIBC.madvise(first, last - first, advice) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EFAULT:
        raise OSError(
            code, "a file-mapped input is shorter than its tensor: the file was truncated while read"
        )
    if code != errno.EINVAL:  # EINVAL: this kernel has no MADV_POPULATE_READ; pages fault in on access
        raise OSError(code, f"madvise({advice}) failed: {os.strerror(code)}")


def _lockstep(
    sources: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(name, every source's tensor) in ``names`` order; each source is read in one ``items()`` pass.

    A source whose names come in another order is read by key. Raises ValueError when a source's
    names differ from ``names`` (the names of the first contribution).
    """
    expected = set(names)
    for tensors in sources:
        own = list(tensors)
        if len(own) != len(names):
            raise ValueError(f"contribution has {len(own)} tensors, the first had {len(names)}")
        if own != list(names):
            extra = sorted(set(own) - expected)
            if extra:
                raise ValueError(f"tensor {extra[0]!r} was not in the first contribution")
    with ExitStack() as stack:
        iterators: list[Iterator[tuple[str, torch.Tensor]]] = []
        for tensors in sources:
            if list(tensors) == list(names):
                items = iter(tensors.items())
                if hasattr(items, "close"):
                    stack.callback(items.close)
                iterators.append(items)
            else:
                iterators.append(_by_key(tensors, names))
        for name in names:
            yield name, [next(it)[1] for it in iterators]


def _by_key(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, tensors[name]


def sites_per_lazy_pass(update: UpdateSource) -> int:
    """Sites per pass for a stream of updates like ``update``: 1 for updates held in memory.

    An update read one tensor per access (it has ``tensor_bytes``, e.g.
    :class:`~jipfed.federation.payload_stream.StoredUpdate`) costs only its current tensor while a
    pass runs, a paged one only the current chunk of it, so a pass takes as many as hold
    :data:`LAZY_PASS_MODEL_FRACTION` of a model in those at once.
    """
    sizes = getattr(update, "tensor_bytes", None)
    if sizes is None:
        return 1
    largest, model = sizes
    if getattr(update, "paged", False):
        specs = update.manifest.tensors.values()
        itemsize = max((s.torch_dtype.itemsize for s in specs if s.torch_dtype.is_floating_point), default=1)
        largest = min(largest, chunk_elements() * itemsize)
    return max(1, int(LAZY_PASS_MODEL_FRACTION * model) // max(largest, 1))


def mean_weights(
    global_weights: Mapping[str, torch.Tensor],
    updates: Iterable[UpdateSource],
    *,
    accumulate_dtype: torch.dtype | None = None,
    integer_mode: str = "max",
    sites_per_pass: int | None = None,
    on_tensor: TensorSink | None = None,
) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the sites' models (weight = ``manifest.n_samples``).

    Each update may be kind ``"weights"`` or ``"delta"`` (relative to ``global_weights``). A
    :class:`~collections.abc.Sequence` of updates is aggregated in one cache-blocked pass
    (``sites_per_pass=None``) or in passes of ``sites_per_pass`` sites; any other iterable is
    consumed once, in passes of ``sites_per_pass`` updates, keeping no more than that (default: 1
    update held in memory, or :func:`sites_per_lazy_pass` updates read per tensor).
    The result has the global model's tensor order. ``on_tensor(name, tensor)`` is called for each
    result tensor as soon as it is final (in the order the updates' tensors are read).
    """
    if sites_per_pass is not None and (
        isinstance(sites_per_pass, bool) or not isinstance(sites_per_pass, int) or sites_per_pass < 1
    ):
        raise ValueError(f"sites_per_pass must be None or an integer >= 1, got {sites_per_pass!r}")
    acc = WeightedMean(accumulate_dtype=accumulate_dtype, integer_mode=integer_mode)

    def contribution(update: UpdateSource) -> Contribution:
        manifest = update.manifest
        logger.debug("adding site %s (%d samples, %s)", manifest.site, manifest.n_samples, manifest.kind)
        base = global_weights if manifest.kind == "delta" else None
        return Contribution(update.tensors, float(manifest.n_samples), base, getattr(update, "paged", False))

    if isinstance(updates, Sequence):
        k = len(updates) if sites_per_pass is None else sites_per_pass
        groups = [[contribution(u) for u in updates[i : i + k]] for i in range(0, len(updates), k)] or [[]]
        for group in groups[:-1]:
            acc.add_group(group)
        result = acc.result(groups[-1], on_tensor)
    else:
        pending: list[Contribution] = []
        for update in updates:
            pending.append(contribution(update))
            if len(pending) >= (sites_per_pass or sites_per_lazy_pass(update)):
                acc.add_group(pending)
                pending = []
        result = acc.result(pending, on_tensor)
    if result.keys() != global_weights.keys():
        missing = sorted(set(global_weights) - set(result))[:5]
        extra = sorted(set(result) - set(global_weights))[:5]
        raise ValueError(f"updates do not match the global model: missing {missing}, extra {extra}")
    return {name: result[name] for name in global_weights}


# ---- coordinate-wise robust reducers -----------------------------------------------------------

#: Sorted values of one chunk, lowest first: ``rows[i]`` is the i-th smallest of every coordinate.
Reducer = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@functools.lru_cache(maxsize=16)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort for ``n`` inputs.

    Applying ``(min, max)`` to positions ``(i, j)`` in order sorts any ``n`` values ascending (for
    ``n`` not a power of two, comparators reaching past ``n`` are dropped: they would meet +inf).
    """
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def sort_rows(rows: list[torch.Tensor], spare: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sort equal-length 1-D ``rows`` element-wise across rows with a sorting network.

    In place: the rows' buffers and ``spare`` (a buffer like a row) are overwritten and permuted,
    not copied. Returns the sorted rows (lowest first) and the buffer left over.
    """
    rows = list(rows)
    for i, j in sorting_network(len(rows)):
        torch.minimum(rows[i], rows[j], out=spare)
        torch.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows, spare


def coordinatewise(
    global_weights: Mapping[str, torch.Tensor],
    updates: Sequence[UpdateSource],
    reduce: Reducer,
    *,
    accumulate_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Apply ``reduce`` to the sorted sites' deltas of every coordinate, tensor by tensor, chunk by chunk.

    For each float tensor, the sites' deltas (``weights - global`` or the delta itself) of one chunk
    are sorted across sites and reduced; the result is ``global + reduce(sorted)``. Integer tensors:
    lower median of the sites' values. Site weights (``n_samples``) are deliberately ignored: a site
    cannot buy influence by claiming more samples. Memory: see the module docstring.
    """
    _check_accumulate_dtype(accumulate_dtype)
    n = len(updates)
    if n == 0:
        raise ValueError("nothing to aggregate: no updates")
    kinds = [u.manifest.kind for u in updates]
    out: dict[str, torch.Tensor] = {}
    # in the order the first site's tensors come (a stored update's file order: read sequentially)
    order = list(updates[0].tensors)
    if sorted(order) != sorted(global_weights):
        order = list(global_weights)
    for name in order:
        g = global_weights[name]
        tensors = [_site_tensor(u, name, g) for u in updates]
        if g.is_floating_point():
            dtype = accumulation_dtype(g.dtype, accumulate_dtype)
            out[name] = _reduce_tensor(g, tensors, kinds, reduce, dtype)
        else:
            values = torch.stack(
                [x if k == "weights" else g + x for x, k in zip(tensors, kinds, strict=True)]
            )
            out[name] = torch.sort(values, dim=0).values[(n - 1) // 2].clone()
        del tensors
    return {name: out[name] for name in global_weights}


def _reduce_tensor(
    g: torch.Tensor, tensors: list[torch.Tensor], kinds: list[str], reduce: Reducer, dtype: torch.dtype
) -> torch.Tensor:
    n = len(tensors)
    gf = _flat(g)
    xs = [_flat(x) for x in tensors]
    numel = gf.numel()
    step = min(chunk_elements(SORT_CHUNK_ELEMENTS), max(numel, 1))
    out = output_tensor(g.shape, g.dtype)
    of = _flat(out)

    def chunks(begin: int, end: int) -> None:
        buffer = torch.empty((n + 1, min(step, end - begin)), dtype=dtype)
        for start in range(begin, end, step):
            stop = min(start + step, end)
            rows = [buffer[i, : stop - start] for i in range(n + 1)]
            g_chunk = gf[start:stop]
            for row, x, kind in zip(rows[:n], xs, kinds, strict=True):
                if kind == "weights":
                    torch.sub(x[start:stop], g_chunk, out=row)
                else:
                    row.copy_(x[start:stop])
            if n <= NETWORK_MAX_SITES:
                ordered, _ = sort_rows(rows[:n], rows[n])
            else:
                ordered = list(torch.sort(buffer[:n, : stop - start], dim=0).values)
            of[start:stop].copy_(reduce(ordered).add_(g_chunk))

    start_parts(numel, chunks).wait()  # in parts on the threads of an enclosing ``sum_threads``
    return out


def _site_tensor(update: UpdateSource, name: str, g: torch.Tensor) -> torch.Tensor:
    try:
        tensor = update.tensors[name]
    except KeyError:
        raise ValueError(f"site {update.manifest.site!r} has no tensor {name!r}") from None
    if tensor.shape != g.shape or tensor.dtype != g.dtype:
        raise ValueError(
            f"site {update.manifest.site!r} tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
            f"global is {tuple(g.shape)} {g.dtype}"
        )
    return tensor


def median_of_sorted(ordered: Sequence[torch.Tensor]) -> torch.Tensor:
    """Median of sorted rows (mean of the two middle rows for an even count); a new tensor."""
    n = len(ordered)
    if n % 2:
        return ordered[n // 2].clone()
    return torch.add(ordered[n // 2 - 1], ordered[n // 2]).mul_(0.5)


def trimmed_mean_of_sorted(ordered: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Mean of sorted rows after dropping ``floor(beta * n)`` rows at each end; a new tensor."""
    n = len(ordered)
    k = trim_count(n, beta)
    acc = ordered[k].clone()
    for row in ordered[k + 1 : n - k]:
        acc.add_(row)
    return acc.div_(n - 2 * k)


def trim_count(n: int, beta: float) -> int:
    """``floor(beta * n)``: values dropped at each end; ValueError unless ``0 <= beta < 0.5``."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be a number in [0, 0.5), got {beta!r}")
    return int(beta * n)


def coordinatewise_median(
    global_weights: Mapping[str, torch.Tensor],
    updates: Sequence[UpdateSource],
    *,
    accumulate_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median of the sites' models (Yin et al., 2018); see :func:`coordinatewise`."""
    return coordinatewise(global_weights, updates, median_of_sorted, accumulate_dtype=accumulate_dtype)


def coordinatewise_trimmed_mean(
    global_weights: Mapping[str, torch.Tensor],
    updates: Sequence[UpdateSource],
    *,
    beta: float,
    accumulate_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Coordinate-wise beta-trimmed mean of the sites' models (Yin et al., 2018)."""
    trim_count(len(updates), beta)
    return coordinatewise(
        global_weights, updates, lambda s: trimmed_mean_of_sorted(s, beta), accumulate_dtype=accumulate_dtype
    )
