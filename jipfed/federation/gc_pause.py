"""Pausing Python's cyclic garbage collector during a short burst of allocations.

A process that imported torch holds millions of tracked objects; a full collection walks all of
them (about 0.1 s on a 2-core machine), and the thousands of small objects an aggregation step
creates (manifests, tensor views) trigger one at a random point. The step frees what it allocates
by reference counting, so nothing is lost by collecting after it instead.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Within: no automatic cyclic collection (restored on exit, also on error). Nests; thread-unsafe
    only in that another thread's collections are paused too while inside."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
