"""Micro-batching of concurrent encodes: callers that arrive while a forward pass runs are encoded together in the
next one. No timer: a lone query is encoded at once; under load, batches form by themselves (the caller whose
turn it is runs the batch for everyone waiting, so no extra thread is needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class _Request:
    items: list[str]
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


class MicroBatcher:
    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_batch: int = 64) -> None:
        self.encode = encode
        self.max_batch = max_batch
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        self._busy = False
        self.batches = 0
        self.items = 0

    def __call__(self, items: Sequence[str]) -> np.ndarray:
        req = _Request(list(items))
        with self._cv:
            self._queue.append(req)
            while not req.done:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                batch = self._take()
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._busy = False
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        size = 0
        while self._queue and (not batch or size + len(self._queue[0].items) <= self.max_batch):
            r = self._queue.pop(0)
            batch.append(r)
            size += len(r.items)
        return batch

    def _run(self, batch: list[_Request]) -> None:
        # The same text from several callers (a popular query before the cache holds it) is encoded once: a
        # smaller pass, and every caller gets the same vector.
        flat = list(dict.fromkeys(t for r in batch for t in r.items))
        row = {t: k for k, t in enumerate(flat)}
        try:
            out = self.encode(flat)
        except BaseException as exc:  # every waiter gets the error, not only the one running the batch
            for r in batch:
                r.error, r.done = exc, True
            return
        self.batches += 1
        self.items += len(flat)
        for r in batch:
            r.result, r.done = out[[row[t] for t in r.items]], True
