"""Micro-batching of concurrent encodes: callers that arrive while a forward pass runs are encoded together in the
next one. No timer: a lone query is encoded at once; under load, batches form by themselves (the caller whose
turn it is runs the batch for everyone waiting, so no extra thread is needed).

Passes side by side: where single-threaded passes can run at once (one per core), `parallel()` says how many and
how many items must be waiting before another pass starts beside a running one. Waiting for a full batch keeps
batches large, and when that many searches wait on the model, none of them has HTTP or search work left for the
core the new pass takes. On 2 cores this serves 1.25-1.3x the uncached text searches of one pass at a time
(bench/RESULTS.md, "A/B: text passes side by side").

Items are query texts (deduplicated within a pass) or query pictures (`dedupe=False`: arrays are not hashable, and
the same picture from two callers at once is rare)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class _Request:
    items: list[Any]
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


def _one_at_a_time() -> tuple[int, int]:
    return 1, 1


class MicroBatcher(Generic[T]):
    """`parallel()`: (passes that may run at once, items waiting that start another beside a running one); read
    at each decision, so it follows the model's settings. `dedupe`: equal items in one pass are encoded once
    (items must be hashable)."""

    def __init__(
        self,
        encode: Callable[[list[T]], np.ndarray],
        max_batch: int = 64,
        parallel: Callable[[], tuple[int, int]] = _one_at_a_time,
        dedupe: bool = True,
    ) -> None:
        self.encode = encode
        self.max_batch = max_batch
        self.parallel = parallel
        self.dedupe = dedupe
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        self._running = 0
        self._waiting = 0  # items in the queue
        self.side_by_side = 0  # passes started while another ran
        self.batches = 0
        self.items = 0

    def __call__(self, items: Sequence[T]) -> np.ndarray:
        req = _Request(list(items))
        with self._cv:
            self._queue.append(req)
            self._waiting += len(req.items)
            while not req.done:
                if not self._may_start():
                    self._cv.wait()
                    continue
                self.side_by_side += self._running > 0
                self._running += 1
                batch = self._take()
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._running -= 1
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _may_start(self) -> bool:
        if not self._running:
            return True
        passes, full = self.parallel()
        return self._running < passes and self._waiting >= max(1, full)

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].items) <= self.max_batch):
            r = self._queue.pop(0)
            batch.append(r)
            size += len(r.items)
        self._waiting -= size
        return batch

    def _run(self, batch: list[_Request]) -> None:
        flat: list[T] = [t for r in batch for t in r.items]
        if self.dedupe:
            # The same text from several callers (a popular query before the cache holds it) is encoded once: a
            # smaller pass, and every caller gets the same vector.
            flat = list(dict.fromkeys(flat))
            row = {t: k for k, t in enumerate(flat)}
            rows = [[row[t] for t in r.items] for r in batch]
        else:
            rows, start = [], 0
            for r in batch:
                rows.append(list(range(start, start + len(r.items))))
                start += len(r.items)
        try:
            out = self.encode(flat)
        except BaseException as exc:  # every waiter gets the error, not only the one running the batch
            for r in batch:
                r.error, r.done = exc, True
            return
        self.batches += 1
        self.items += len(flat)
        for r, at in zip(batch, rows, strict=True):
            r.result, r.done = out[at], True
