"""Micro-batching: concurrent callers share forward passes, each gets its own rows back, errors reach everyone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loupe.models.batching import MicroBatcher


def fake_encoder(calls: list[int], delay: float = 0.03):
    def encode(items: list[str]) -> np.ndarray:
        calls.append(len(items))
        time.sleep(delay)  # a forward pass: later callers queue up behind it
        return np.array([[float(len(s)), float(s.count("x"))] for s in items], dtype=np.float32)

    return encode


def test_concurrent_callers_are_batched_and_get_their_own_rows():
    calls: list[int] = []
    batcher = MicroBatcher(fake_encoder(calls), max_batch=64)
    queries = [["x" * i, "y" * (i + 1)] for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(batcher, queries))
    for q, got in zip(queries, results, strict=True):
        assert got.tolist() == [[len(q[0]), q[0].count("x")], [len(q[1]), 0]]
    assert sum(calls) == 48
    assert len(calls) < 24, calls  # fewer forward passes than callers
    assert max(calls) > 2


def test_a_lone_caller_is_encoded_at_once():
    calls: list[int] = []
    batcher = MicroBatcher(fake_encoder(calls, delay=0.0))
    t0 = time.perf_counter()
    assert batcher(["abc"]).shape == (1, 2)
    assert time.perf_counter() - t0 < 0.05 and calls == [1]


def test_max_batch_bounds_a_pass():
    calls: list[int] = []
    batcher = MicroBatcher(fake_encoder(calls), max_batch=4)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(batcher, [[f"a{i}", f"b{i}"] for i in range(16)]))
    assert max(calls) <= 4 and sum(calls) == 32


def test_an_error_reaches_every_caller_in_the_batch_and_the_batcher_recovers():
    gate = threading.Event()
    state = {"fail": True}

    def encode(items: list[str]) -> np.ndarray:
        gate.wait(1)
        if state["fail"]:
            raise RuntimeError("model exploded")
        return np.zeros((len(items), 2), np.float32)

    batcher = MicroBatcher(encode)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher, ["q"]) for _ in range(8)]
        gate.set()
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, RuntimeError) for e in errors)
    state["fail"] = False
    assert batcher(["q", "r"]).shape == (2, 2)


@pytest.mark.parametrize("n", [1, 3])
def test_single_thread_results_match_direct_encoding(n):
    calls: list[int] = []
    enc = fake_encoder(calls, delay=0)
    items = ["x" * i for i in range(n)]
    assert np.array_equal(MicroBatcher(enc)(items), enc(items))


def test_the_same_text_from_concurrent_callers_is_encoded_once_per_pass():
    calls: list[int] = []
    batcher = MicroBatcher(fake_encoder(calls, delay=0.2), max_batch=64)
    first = threading.Thread(target=batcher, args=(["warm"],))  # holds the first pass while the others queue
    first.start()
    time.sleep(0.01)
    queries = [["a red circle"], ["a red circle", "xx"], ["xx", "a red circle"], ["a red circle"]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(batcher, queries))
    first.join()
    assert calls == [1, 2]  # the queued callers' 6 texts are 2 distinct ones, in one pass
    for q, got in zip(queries, results, strict=True):
        assert got.tolist() == [[float(len(s)), float(s.count("x"))] for s in q]
    assert batcher.items == 3  # what was encoded


class _Passes:
    """An encoder whose passes can be held open, counting how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.sizes: list[int] = []
        self.hold = threading.Event()
        self.held = threading.Event()  # set once the first pass is running and held
        self.first = True
        self.delay = 0.0

    def __call__(self, items: list[str]) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(items))
            first, self.first = self.first, False
        if first:
            self.held.set()
            assert self.hold.wait(5)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        return np.array([[float(len(s))] for s in items], dtype=np.float32)


def _wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_second_pass_starts_beside_a_running_one_only_for_a_full_batch():
    enc = _Passes()
    batcher = MicroBatcher(enc, parallel=lambda: (2, 4))
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher, ["a"])
        assert enc.held.wait(5)
        waiting = [pool.submit(batcher, [f"b{i}"]) for i in range(3)]
        time.sleep(0.2)
        assert enc.sizes == [1] and not any(f.done() for f in waiting)  # 3 waiting: less than a full batch
        # The fourth: a full batch starts beside the first pass.
        waiting.append(pool.submit(batcher, ["c123"]))
        for f in waiting:
            assert f.result(5).shape == (1, 1)
        assert not first.done() and enc.most == 2 and enc.sizes == [1, 4] and batcher.side_by_side == 1
        assert waiting[-1].result().tolist() == [[4.0]]
        enc.hold.set()
        assert first.result(5).tolist() == [[1.0]]


def test_passes_side_by_side_never_exceed_the_limit():
    enc = _Passes()
    enc.first, enc.delay = False, 0.03
    batcher = MicroBatcher(enc, max_batch=2, parallel=lambda: (2, 1))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(batcher, [[f"q{i}"] for i in range(32)]))
    assert [r.tolist() for r in results] == [[[float(len(f"q{i}"))]] for i in range(32)]
    assert enc.most == 2 and sum(enc.sizes) == 32


def test_one_pass_at_a_time_by_default():
    enc = _Passes()
    batcher = MicroBatcher(enc)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher, ["a"])
        assert enc.held.wait(5)
        rest = [pool.submit(batcher, [f"b{i}"]) for i in range(6)]
        _wait_until(lambda: batcher._waiting == 6)
        time.sleep(0.1)
        assert enc.sizes == [1] and batcher.side_by_side == 0
        enc.hold.set()
        assert [f.result(5).tolist() for f in rest] == [[[2.0]]] * 6
        assert first.result(5).tolist() == [[1.0]]
    assert enc.most == 1 and enc.sizes == [1, 6]


def test_unhashable_items_without_dedupe_keep_every_callers_rows():
    """Query pictures (arrays) are batched without deduplication: each caller gets its own rows, in order, even
    where two callers send equal pictures."""
    enc = _Passes()
    sizes: list[int] = []

    def encode(items: list[np.ndarray]) -> np.ndarray:
        sizes.append(len(items))
        enc([""])  # the first pass is held open while the others queue
        return np.stack([a.ravel()[:1].astype(np.float32) for a in items])

    batcher: MicroBatcher[np.ndarray] = MicroBatcher(encode, dedupe=False)
    pictures = [[np.full((2, 2), v)] for v in (1, 2, 2, 3)] + [[np.full((2, 2), 4), np.full((2, 2), 2)]]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher, [np.zeros((2, 2))])
        assert enc.held.wait(5)
        rest = [pool.submit(batcher, p) for p in pictures]
        _wait_until(lambda: batcher._waiting == 6)
        enc.hold.set()
        assert first.result(5).tolist() == [[0.0]]
        assert [f.result(5).ravel().tolist() for f in rest] == [[1], [2], [2], [3], [4, 2]]
    assert sizes == [1, 6] and batcher.items == 7
