"""Model versions: re-embed the library with another CLIP checkpoint, then switch to it atomically.

A switch creates a new (inactive) model version, embeds every ready image's original with the new model into the
version's own Qdrant collection and FAISS mirror while searches keep being answered by the old version, catches up
with what was added or deleted meanwhile, and then, holding the ingest lock so no batch straddles the change,
activates the version in the database and points the runtime at it (one attribute swap: each search uses one
version). The old collection and mirror are removed afterwards; the old version's row stays as history.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loupe import heap
from loupe.errors import BadRequest, ConfigError, Conflict, LoupeError
from loupe.index.faiss_mirror import FaissMirror
from loupe.ingest.validate import decode_rgb
from loupe.models import image_runtime, onnx_text, torch_thread
from loupe.models.clip import ClipModel, open_clip_for_settings
from loupe.search.filters import PAYLOAD_INDEXES

if TYPE_CHECKING:
    from loupe.runtime import Runtime

log = logging.getLogger(__name__)

BATCH = 32


def embed_originals(
    rt: Runtime, clip: ClipModel, ids: Sequence[int], batch: int = BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Embed the stored originals of these images with `clip` (those whose row or file is gone are skipped)."""
    images = rt.repo.get_images(list(ids))
    out_ids: list[int] = []
    out_vecs: list[np.ndarray] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if pending:
            out_vecs.append(clip.embed_uint8(np.stack([a for _, a in pending])))
            out_ids.extend(i for i, _ in pending)
            pending.clear()

    for image_id in ids:
        image = images.get(int(image_id))
        if image is None:
            continue
        try:
            data = rt.blobs.read_original(image.sha256)
        except FileNotFoundError:
            log.warning("image %s: original missing, not re-embedded (loupe reindex --repair)", image_id)
            continue
        rgb = decode_rgb(data, max_pixels=rt.settings.ingest.max_pixels, min_side=clip.info.image_size)
        pending.append((int(image_id), clip.resize_crop(rgb)))
        if len(pending) >= batch:
            flush()
    flush()
    vecs = np.concatenate(out_vecs) if out_vecs else np.zeros((0, clip.dim), np.float32)
    return np.asarray(out_ids, dtype=np.int64), vecs


@dataclass
class SwitchStatus:
    state: str = "idle"  # idle | loading | embedding | switching | done | failed
    target: str | None = None
    version: int | None = None
    total: int = 0
    done: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state in ("loading", "embedding", "switching")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelSwitcher:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.status = SwitchStatus()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def cancel(self, timeout: float = 60.0) -> None:
        """Abandon a running switch (at shutdown): its new collection and mirror are removed."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def start(self, name: str) -> SwitchStatus:
        """Begin a switch in the background; its progress is `status` (and the health endpoint)."""
        self._claim(name)
        self._thread = threading.Thread(
            target=self._run_logged, args=(name,), name="loupe-model-switch", daemon=True
        )
        self._thread.start()
        return self.status

    def run(self, name: str, progress: Callable[[SwitchStatus], None] | None = None) -> SwitchStatus:
        """Switch synchronously (the CLI); raises what made it fail."""
        self._claim(name)
        try:
            self._run(name, progress)
        except BaseException as exc:
            self._failed(exc)
            raise
        return self.status

    def wait(self, timeout: float | None = None) -> SwitchStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    # ------------------------------------------------------------ internals

    def _claim(self, name: str) -> None:
        with self._lock:
            if self.status.running:
                raise Conflict(
                    f"a switch to {self.status.target!r} is already running", code="switch_running"
                )
            self.status = SwitchStatus(state="loading", target=name, started_at=time.time())
            self._cancel.clear()

    def _failed(self, exc: BaseException) -> None:
        self.status.state = "failed"
        self.status.error = exc.message if isinstance(exc, LoupeError) else f"{type(exc).__name__}: {exc}"
        self.status.finished_at = time.time()

    def _run_logged(self, name: str) -> None:
        try:
            self._run(name, None)
        except BaseException as exc:
            log.exception("switching to %s failed; the library stays on its current model", name)
            self._failed(exc)

    def _run(self, name: str, progress: Callable[[SwitchStatus], None] | None) -> None:
        rt, st = self.rt, self.status
        settings = rt.settings
        try:  # on the torch thread, as every multi-threaded torch pass (models/torch_thread.py)
            clip = torch_thread.call(
                open_clip_for_settings,
                name,
                is_default=False,
                data_dir=settings.data_dir,
                device=settings.model.device,
                demo_fallback=False,
            )
        except ConfigError as exc:
            raise BadRequest(
                f"the model {name!r} cannot be loaded: {exc.message}", code="model_unloadable"
            ) from exc
        if clip.info.fingerprint == rt.clip.info.fingerprint:
            raise BadRequest(f"{name!r} is the library's current model", code="model_active")
        clip.text_runtime = onnx_text.attach_for_settings(clip, settings)
        clip.image_runtime = image_runtime.attach_for_settings(clip, settings)
        version = rt.repo.create_model_version("clip", clip.info.name, clip.info.fingerprint, clip.dim, False)
        st.version = int(version.id)  # type: ignore[arg-type]
        from loupe.runtime import collection_name

        collection = collection_name(version)
        rt.vectors.ensure_collection(collection, clip.dim, graph=False)
        rt.vectors.create_payload_indexes(collection, PAYLOAD_INDEXES)
        mirror = FaissMirror(
            (settings.index.directory or settings.data_dir / "mirror") / collection,
            collection=collection,
            model_version_id=st.version,
            dim=clip.dim,
            settings=settings.index,
        )
        old_collection, old_mirror = rt.collection, rt.mirror
        embedded: set[int] = set()
        rt.ingest.shadow_collections.append(collection)  # edits reach the new payloads too
        try:
            st.state = "embedding"
            while self._catch_up(clip, collection, mirror, embedded, progress) > BATCH:
                pass  # passes shrink to what arrived during the previous one
            st.state = "switching"
            with rt.ingest.model_lock:  # no ingest batch in flight: the rest is small and the swap is atomic
                self._catch_up(clip, collection, mirror, embedded, progress)
                mirror.last_seq = rt.repo.last_seq()
                mirror.maybe_go_approximate()
                mirror.save()
                rt.repo.activate_model(st.version)
                rt.swap_model(clip, rt.repo.active_model("clip") or version, mirror)
        except BaseException:
            rt.vectors.drop_collection(collection)
            shutil.rmtree(mirror.directory, ignore_errors=True)
            raise
        finally:
            rt.ingest.shadow_collections.remove(collection)
        try:
            rt.vectors.drop_collection(old_collection)
            shutil.rmtree(old_mirror.directory, ignore_errors=True)
        except LoupeError as exc:  # the switch happened; a leftover collection is only disk space
            log.warning("the old collection %s was not removed: %s", old_collection, exc.message)
        # The old model's objects were frozen with the server's start-up heap, where their reference cycles are
        # never collected: collected now (heap.py). A search still running on the old version at this point (the
        # old collection's removal came in between, so hardly any) would keep it until the next switch or shutdown.
        # The old mirror is let go first, so that it is not frozen again with the rest.
        del old_mirror
        heap.resettle()
        st.state, st.finished_at = "done", time.time()
        if progress:
            progress(st)
        log.info("the library now uses %s (model version %d)", name, st.version)

    def _catch_up(
        self,
        clip: ClipModel,
        collection: str,
        mirror: FaissMirror,
        embedded: set[int],
        progress: Callable[[SwitchStatus], None] | None,
    ) -> int:
        """Embed the ready images not yet in the new version; drop those no longer ready. Returns the work done."""
        rt, st = self.rt, self.status
        ready = {int(i) for i in rt.repo.all_ready_ids()}
        gone = sorted(embedded - ready)
        if gone:
            rt.vectors.delete(collection, gone)
            mirror.delete(gone)
            embedded.difference_update(gone)
        todo = sorted(ready - embedded)
        st.total = len(ready)
        for start in range(0, len(todo), BATCH * 8):
            if self._cancel.is_set():
                raise Conflict(
                    "the model switch was cancelled (the server is stopping)", code="switch_cancelled"
                )
            chunk = todo[start : start + BATCH * 8]
            ids, vecs = embed_originals(rt, clip, chunk)
            live, payloads = rt.ingest.payloads(ids.tolist())
            keep = np.isin(ids, np.asarray(live, dtype=np.int64))
            ids, vecs = ids[keep], vecs[keep]
            rt.vectors.upsert(collection, ids.tolist(), vecs, payloads)
            mirror.upsert(ids, vecs)
            embedded.update(chunk)  # attempted: an image whose original is missing is not retried here
            st.done = len(embedded & ready)
            if progress:
                progress(st)
        return len(todo) + len(gone)
