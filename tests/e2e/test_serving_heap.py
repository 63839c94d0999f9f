"""The server takes its start-up heap out of the garbage collector's full passes (app.settle_heap): a full pass over
the modules and models walked every object with the GIL held and stalled all requests in flight for 300 ms at 1M."""

from __future__ import annotations

import gc
import weakref

from litestar.testing import TestClient

from loupe.app import create_app
from loupe.runtime import Runtime


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_start_up_objects_are_frozen_while_serving_and_garbage_is_still_collected(make_settings) -> None:
    settings = make_settings()
    rt = Runtime.open(settings)
    try:
        assert gc.get_freeze_count() == 0
        with TestClient(create_app(settings, runtime=rt), timeout=60) as client:
            frozen = gc.get_freeze_count()
            # The imports and the model: hundreds of thousands of objects with torch and transformers loaded.
            assert frozen > 50_000, frozen
            assert client.get("/api/health").status_code == 200
            res = client.post("/api/search", json={"query": [{"text": "a red circle"}], "limit": 5})
            assert res.status_code == 200, res.text
            # A reference cycle made while serving is still found and freed by a collection.
            a, b = _Node(), _Node()
            a.other, b.other = b, a
            gone = weakref.ref(a)
            del a, b
            gc.collect()
            assert gone() is None
            # Only what start-up left is frozen: searching adds nothing (frozen objects freed by their reference
            # counts leave it).
            assert gc.get_freeze_count() <= frozen
        # Stopped: the objects go back to the collector (tests, and anything else, that open apps one after
        # another in one process do not accumulate them).
        assert gc.get_freeze_count() == 0
    finally:
        rt.close()
