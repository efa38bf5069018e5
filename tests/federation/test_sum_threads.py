"""Summing on several threads (jipfed.federation.sum_threads) gives the bytes of the one-thread sum."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from jipfed.federation import aggregate, sum_threads
from jipfed.federation.aggregate import coordinatewise_median, coordinatewise_trimmed_mean, mean_weights
from jipfed.federation.codec import encode_update
from jipfed.federation.payload_stream import HashPipeline, StoredUpdate
from jipfed.federation.sum_threads import start_parts

from .helpers import update
from .test_aggregate import small_chunks  # noqa: F401  (the fixture small_parts uses)


@pytest.fixture
def small_parts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of at least 600 elements, chunks of 250: small tensors are cut in several parts of several chunks."""
    request.getfixturevalue("small_chunks")  # one torch thread (restored after)
    monkeypatch.setattr(aggregate, "CHUNK_ELEMENTS", 250)
    monkeypatch.setattr(aggregate, "SORT_CHUNK_ELEMENTS", 250)
    monkeypatch.setattr(sum_threads, "MIN_PART_ELEMENTS", 600)
    monkeypatch.setattr(sum_threads, "INLINE_ELEMENTS", 50)


def _model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(7, 501, generator=gen),  # 3507 elements: 5 parts of 2-3 chunks
        "small": torch.randn(40, generator=gen),  # summed at once by the caller
        "half": torch.randn(2500, generator=gen).half(),  # float32 scratch per part
        "double": torch.randn(1300, generator=gen, dtype=torch.float64),
        "steps": torch.tensor([seed, 10 - seed]),
    }


def _sites() -> tuple[dict[str, torch.Tensor], list]:
    g = _model(0)
    ups = [
        update(_model(i), site=f"s{i}", kind="delta" if i % 2 else "weights", n_samples=i + 2)
        for i in range(1, 6)
    ]
    return g, ups


@pytest.mark.parametrize("sites_per_pass", [None, 2])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_one_thread_bytes_in_order(
    small_parts: None, sites_per_pass: int | None, threads: int
) -> None:
    g, ups = _sites()
    expected = mean_weights(g, ups, sites_per_pass=sites_per_pass)
    handed: list[str] = []
    with sum_threads.sum_threads(threads) as n:
        assert n == threads and torch.get_num_threads() == 1
        got = mean_weights(
            g, ups, sites_per_pass=sites_per_pass, on_tensor=lambda name, _: handed.append(name)
        )
    assert handed == list(ups[0].tensors)  # each once, in the order the tensors were read
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_threads_give_the_one_thread_median_and_trimmed_mean(small_parts: None) -> None:
    g, ups = _sites()
    reducers = {
        "median": lambda: coordinatewise_median(g, ups),
        "trimmed": lambda: coordinatewise_trimmed_mean(g, ups, beta=0.2),
    }
    for what, reduce in reducers.items():
        expected = reduce()
        with sum_threads.sum_threads(3):
            got = reduce()
        for name, want in expected.items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), (what, name)


def test_threads_over_stored_files_page_in_and_drop_each_part(small_parts: None, tmp_path: Path) -> None:
    """Paged (memory-mapped) inputs, parts populated and dropped on several threads: same bytes."""
    g, ups = _sites()
    expected = mean_weights(g, ups)
    with ExitStack() as stack:
        hashing = stack.enter_context(HashPipeline(2, limit_bytes=1000))
        stored = []
        for u in ups:
            encoded = encode_update(u)
            path = tmp_path / f"{u.site}.safetensors"
            path.write_bytes(encoded.payload)
            stored.append(stack.enter_context(StoredUpdate(path, encoded.manifest, hashing)))
        assert all(s.paged for s in stored)
        with sum_threads.sum_threads(2):
            got = mean_weights(g, stored)
        for s in stored:
            s.verify()  # every byte was hashed on the way, in file order
    for name, want in expected.items():
        assert torch.equal(got[name], want), name


def test_a_failing_part_is_raised_after_every_part_finished() -> None:
    ran: list[tuple[int, int]] = []
    lock = threading.Lock()

    def run(begin: int, end: int) -> None:
        with lock:
            ran.append((begin, end))
        if begin == 0:
            raise OSError("a file-mapped input is shorter than its tensor")

    with sum_threads.sum_threads(2):
        parts = start_parts(4 * sum_threads.MIN_PART_ELEMENTS, run)
        with pytest.raises(OSError, match="shorter"):
            parts.wait()
        assert parts.done()
    assert sorted(ran)[0][0] == 0 and sorted(ran)[-1][1] == 4 * sum_threads.MIN_PART_ELEMENTS
    bounds = sorted(ran)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # parts tile the range


def test_outside_or_with_one_thread_the_caller_sums_at_once() -> None:
    calls: list[tuple[int, int, str]] = []

    def run(begin: int, end: int) -> None:
        calls.append((begin, end, threading.current_thread().name))

    threads = torch.get_num_threads()
    start_parts(1 << 20, run).wait()
    with sum_threads.sum_threads(1):
        assert start_parts(1 << 20, run).done()
    assert calls == [(0, 1 << 20, threading.current_thread().name)] * 2
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="threads"), sum_threads.sum_threads(0):
        pass


def test_torch_threads_are_restored_after_an_error() -> None:
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), sum_threads.sum_threads(2):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == threads
