"""Summing tensors on several threads at once (torch's kernels release the GIL).

Inside :func:`sum_threads`, :func:`start_parts` cuts a range of elements into parts of at least
:data:`MIN_PART_ELEMENTS` and queues them on a small pool; it returns at once, and the caller goes
on with the next tensor while the pool works (it waits for a tensor only when it needs it:
:meth:`Parts.wait`). Every thread runs whole torch operations on its own part: no thread spin-waits
for another (unlike torch's OpenMP intra-op threads, which spin between operations and lose badly
on a loaded machine), and there is no hand-over per operation or per tensor that a descheduled
thread would hold up. torch's intra-op threads are set to 1 meanwhile, so the parts do not each
start an OpenMP team. Outside :func:`sum_threads`, :func:`start_parts` runs the whole range at
once in the calling thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

import torch

#: Parts have at least this many elements (1 MiB of float32): smaller ones cost more to hand over.
MIN_PART_ELEMENTS = 1 << 18
#: A range below this many elements is summed at once in the calling thread.
INLINE_ELEMENTS = 1 << 14

_POOL: ContextVar[ThreadPoolExecutor | None] = ContextVar("jipfed_sum_pool", default=None)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def sum_threads(threads: int | None = None) -> Iterator[int]:
    """Within: :func:`start_parts` queues parts on ``threads`` threads (default :func:`usable_cpus`).

    Yields the thread count. Sets torch's intra-op threads to 1 while inside (restored after); with
    one thread it changes nothing. Waits for the queued parts when it exits.
    """
    n = usable_cpus() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    if n == 1:
        yield 1
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="jipfed-sum") as pool:
            token = _POOL.set(pool)
            try:
                yield n
            finally:
                _POOL.reset(token)
    finally:
        torch.set_num_threads(previous)


class Parts:
    """The parts of one range being summed; :meth:`wait` returns when all are done."""

    def __init__(self, futures: list[Future[None]]) -> None:
        self._futures = futures

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Until every part is done; then raises the first part's error, if any."""
        errors = [f.exception() for f in self._futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first


#: What :func:`start_parts` returns outside :func:`sum_threads`: the work is done.
DONE = Parts([])


def start_parts(numel: int, run: Callable[[int, int], None], align: int = 16) -> Parts:
    """``run(begin, end)`` over parts of ``[0, numel)`` (inner bounds multiples of ``align``: no two
    threads write one cache line).

    Inside :func:`sum_threads` the parts are queued on its threads (a small range runs at once here);
    outside, ``run(0, numel)`` runs here. Errors of queued parts are raised by :meth:`Parts.wait`.
    """
    pool = _POOL.get()
    if pool is None or numel < INLINE_ELEMENTS:
        run(0, numel)
        return DONE
    parts = max(1, numel // MIN_PART_ELEMENTS)
    bounds = [numel * k // parts // align * align for k in range(parts)] + [numel]
    return Parts([pool.submit(run, b, e) for b, e in zip(bounds[:-1], bounds[1:], strict=True) if e > b])


def hand_on_done(running: Sequence[tuple[Any, ...]], hand_on: Callable[[], None], limit: int) -> None:
    """Call ``hand_on()`` (which pops ``running``'s oldest entry, ``(..., parts)``) while that
    entry's parts are done or more than ``limit`` entries run: results go on in order, and at most
    ``limit`` ranges are summed at once."""
    while running and (running[0][-1].done() or len(running) > limit):
        hand_on()


def wait_quietly(parts: Iterable[Parts]) -> None:
    """Until every one of ``parts`` is done, ignoring their errors (after a failure: nothing may still
    write to the caller's buffers once it returns)."""
    for p in parts:
        with suppress(BaseException):
            p.wait()
