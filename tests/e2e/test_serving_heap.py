"""The server takes its start-up heap out of the garbage collector's full passes (heap.py): a full pass over the
modules and models walked every object with the GIL held and stalled all requests in flight for 300 ms at 1M. A
model switch must still free the old model, whose reference cycles a frozen heap never collects."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from litestar.testing import TestClient

from loupe.app import create_app
from loupe.runtime import Runtime
from tests.e2e.conftest import perturbed_copy, wait_switch


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


def test_a_model_switch_frees_the_old_model_from_the_frozen_heap(
    make_settings, tiny_clip_dir: Path, tmp_path: Path
):
    settings = make_settings()
    other = perturbed_copy(tiny_clip_dir, tmp_path / "other-model")
    rt = Runtime.open(settings)
    try:
        with TestClient(create_app(settings, runtime=rt), timeout=60) as client:
            old_model, old_clip = weakref.ref(rt.clip.model), weakref.ref(rt.clip)
            assert client.post("/api/models", json={"name": str(other)}).status_code == 202
            assert wait_switch(client)["state"] == "done"
            assert rt.clip.model is not old_model()
            res = client.post("/api/search", json={"query": [{"text": "a red circle"}], "limit": 5})
            assert res.status_code == 200, res.text
            gc.collect()
            # Without the switch's resettle the old model (frozen at start, held by its own cycles) stays alive
            # until shutdown.
            assert old_clip() is None
            assert old_model() is None
            assert gc.get_freeze_count() > 50_000  # the heap is frozen again, with the new model in it
    finally:
        rt.close()
