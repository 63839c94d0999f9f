"""Builds every store and service from Settings: used by the app's lifespan, the CLI and the tests alike."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine

from loupe.auth import KeyService
from loupe.config import Settings
from loupe.errors import ConfigError, DataDirLocked, Unavailable
from loupe.index.faiss_mirror import FaissMirror, SyncReport
from loupe.ingest.bulk import BulkService, BulkWorker
from loupe.ingest.service import IngestService, IngestWorker
from loupe.ingest.switch import ModelSwitcher
from loupe.ingest.text import TextIndexer
from loupe.models import compiled_image, image_runtime, onnx_text, torch_thread
from loupe.models.clip import DEMO_MODEL_NAME, ClipModel, demo_model_dir, load_clip, open_clip_for_settings
from loupe.models.finetune import FinetuneRunner
from loupe.models.runtime_choice import ChoiceMemory
from loupe.models.text_encoder import SentenceEncoder
from loupe.search.filters import PAYLOAD_INDEXES
from loupe.search.service import SearchService
from loupe.signing import load_or_create_secret
from loupe.storage.blobs.files import FileBlobStore
from loupe.storage.metadata.engine import create_db_engine, is_sqlite, upgrade
from loupe.storage.metadata.repo import MetadataRepo
from loupe.storage.metadata.tables import ModelVersion
from loupe.storage.vectors.base import VectorStore

log = logging.getLogger(__name__)


class DataDirLock:
    """Embedded stores belong to one process: an exclusive flock on <data_dir>/loupe.lock."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "loupe.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            f.close()
            raise DataDirLocked(
                f"the data directory {self.path.parent} is in use by another Loupe process "
                "(a running server?): stop it first, or use that server's API"
            ) from exc
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_model_buffers_on_heap() -> None:
    """Let torch's activation buffers (up to tens of MB a forward pass) come from the heap and stay there.

    By default glibc maps every allocation over 128 KB afresh and unmaps it on free, and trims the heap's top
    whenever 128 KB of it is free, so each forward pass pays page faults and zeroing for all its activations:
    the ViT-B/32 image tower on 2 threads ran 21.2 images/s so, 24.9 with these thresholds (bench/RESULTS.md).
    glibc raises its thresholds by itself after the first large free, up to 32 MB; fixing them at start makes the
    speed the same in every process. Nothing on other C libraries."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def release_freed_heap() -> None:
    """Return freed heap pages to the kernel (glibc's malloc_trim; nothing elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc (musl has no malloc_trim)
        ctypes.CDLL(None).malloc_trim(0)


def open_vector_store(settings: Settings) -> VectorStore:
    if settings.qdrant_url:
        from loupe.storage.vectors.server import QdrantServerVectorStore

        if settings.qdrant_url.startswith(":memory:") or settings.qdrant_url.startswith("local:"):
            # qdrant-client's local mode: the server protocol's stand-in for tests, never for real use.
            from qdrant_client import QdrantClient

            path = settings.qdrant_url.removeprefix("local:")
            client = QdrantClient(location=":memory:") if path == ":memory:" else QdrantClient(path=path)
            return QdrantServerVectorStore(client)
        return QdrantServerVectorStore.connect(settings.qdrant_url, settings.qdrant_api_key)
    from loupe.storage.vectors.edge import EdgeVectorStore

    return EdgeVectorStore(settings.data_dir / "qdrant", compact_min=settings.qdrant_edge_compact)


def collection_name(version: ModelVersion) -> str:
    return f"{version.channel}_v{version.id}_{version.dim}"


def open_text_indexer(settings: Settings, repo: MetadataRepo, vectors: VectorStore) -> TextIndexer | None:
    """The OCR channel: Tesseract plus the sentence encoder, whose version is pinned like CLIP's."""
    if not settings.ocr.enabled:
        return None
    import shutil

    if shutil.which("tesseract") is None:
        raise ConfigError(
            "Tesseract is not installed (apt-get install tesseract-ocr), or set LOUPE_OCR__ENABLED=false"
        )
    device = settings.model.device if settings.model.device != "auto" else "cpu"
    encoder = torch_thread.call(
        SentenceEncoder, settings.ocr.encoder, device=device
    )  # models/torch_thread.py
    active = repo.active_model("ocr")
    if active is None:
        active = repo.activate_first_model("ocr", encoder.name, encoder.fingerprint, encoder.dim, False)
    elif active.fingerprint != encoder.fingerprint:
        raise ConfigError(
            f"LOUPE_OCR__ENCODER gives a different encoder ({encoder.name}) from this library's ({active.name}); "
            "unset it, or re-embed the OCR channel with `loupe model use`"
        )
    collection = collection_name(active)
    try:
        vectors.ensure_collection(collection, active.dim)
    except Unavailable:
        log.warning("the OCR collection cannot be checked now: the vector store is unavailable")
    return TextIndexer(settings.ocr, encoder, vectors, collection)


def resolve_model(settings: Settings, repo: MetadataRepo) -> tuple[ClipModel, ModelVersion]:
    """Load the library's model. The active version in the database wins over LOUPE_CLIP_MODEL; a different
    explicit value is refused rather than silently mixing two embedding spaces."""
    device = settings.model.device
    active = repo.active_model("clip")
    if active is None:
        clip = open_clip_for_settings(
            settings.clip_model,
            is_default=settings.clip_model_is_default,
            data_dir=settings.data_dir,
            device=device,
            demo_fallback=settings.model.demo_fallback,
        )
        version = repo.activate_first_model(
            "clip", clip.info.name, clip.info.fingerprint, clip.info.dim, clip.info.is_demo
        )
        return clip, version
    configured_differs = not settings.clip_model_is_default and settings.clip_model != active.name
    if configured_differs:
        raise ConfigError(
            f"LOUPE_CLIP_MODEL={settings.clip_model!r} differs from this library's model {active.name!r}. "
            "Unset it to keep the library's model, or switch models with `loupe model use NAME` "
            "(re-embeds into a new collection)."
        )
    if active.is_demo:
        if settings.clip_model_is_default:
            clip = open_clip_for_settings(
                settings.clip_model,
                is_default=True,
                data_dir=settings.data_dir,
                device=device,
                demo_fallback=True,
            )
            if not clip.info.is_demo:
                log.warning(
                    "%s is now available, but this library was built with the demo model; "
                    "it stays on the demo model until `loupe model use %s`",
                    settings.clip_model,
                    settings.clip_model,
                )
                clip = load_clip(str(demo_model_dir(settings.data_dir)), device=device, is_demo=True)
        else:
            clip = load_clip(str(demo_model_dir(settings.data_dir)), device=device, is_demo=True)
    else:
        try:
            clip = open_clip_for_settings(
                active.name, is_default=False, data_dir=settings.data_dir, device=device, demo_fallback=False
            )
        except ConfigError as exc:
            raise ConfigError(
                f"this library's model {active.name!r} cannot be loaded: {exc.message}"
            ) from exc
    if clip.info.fingerprint != active.fingerprint or clip.info.dim != active.dim:
        raise ConfigError(
            f"the weights of {active.name!r} changed since this library was embedded with them "
            f"(fingerprint {clip.info.fingerprint} != {active.fingerprint}); re-embed with `loupe model use`"
        )
    return clip, active


def search_service(
    settings: Settings,
    repo: MetadataRepo,
    vectors: VectorStore,
    secret: bytes,
    text_indexer: TextIndexer | None,
    clip: ClipModel,
    mirror: FaissMirror,
    collection: str,
    version_id: int,
    sole_writer: bool,
) -> SearchService:
    return SearchService(
        settings=settings.search,
        repo=repo,
        clip=clip,
        mirror=mirror,
        vectors=vectors,
        collection=collection,
        secret=secret,
        text_cache_size=settings.model.text_cache_size,
        text_indexer=text_indexer,
        model_version_id=version_id,
        sole_writer=sole_writer,
    )


class Runtime:
    """Every store and service of one Loupe process. A plain class (not a dataclass): Litestar injects it as is."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        repo: MetadataRepo,
        blobs: FileBlobStore,
        vectors: VectorStore,
        clip: ClipModel,
        model_version: ModelVersion,
        collection: str,
        mirror: FaissMirror,
        ingest: IngestService,
        search: SearchService,
        bulk: BulkService,
        keys: KeyService,
        secret: bytes,
        lock: DataDirLock | None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.repo = repo
        self.blobs = blobs
        self.vectors = vectors
        self.clip = clip
        self.model_version = model_version
        self.collection = collection
        self.mirror = mirror
        self.ingest = ingest
        self.search = search
        self.bulk = bulk
        self.keys = keys
        self.secret = secret
        self.lock = lock
        self.workers: list[IngestWorker | BulkWorker] = []
        self.closed = False
        self.switcher = ModelSwitcher(self)
        self.lanes_built: threading.Thread | None = None
        self.finetuner = FinetuneRunner(self)

    @classmethod
    def open(
        cls, settings: Settings, *, start_workers: bool = False, take_lock: bool | None = None
    ) -> Runtime:
        """Open every store. The data-directory lock is taken when an embedded store (SQLite, Qdrant Edge) lives
        there; with Postgres and a Qdrant server, many API nodes may share the directory."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if take_lock is None:
            take_lock = settings.qdrant_url is None or settings.effective_database_url.startswith("sqlite")
        lock = DataDirLock(settings.data_dir) if take_lock else None
        if lock:
            lock.acquire()
        try:
            return cls._build(settings, lock, start_workers)
        except BaseException:
            if lock:
                lock.release()
            raise

    @classmethod
    def _build(cls, settings: Settings, lock: DataDirLock | None, start_workers: bool) -> Runtime:
        keep_model_buffers_on_heap()
        if settings.model.torch_threads:
            torch_thread.set_default_threads(settings.model.torch_threads)
        engine = create_db_engine(settings.effective_database_url)
        try:
            upgrade(engine)
        except Exception as exc:
            raise ConfigError(
                f"cannot open or migrate the database at LOUPE_DATABASE_URL "
                f"({settings.public_dict()['database_url']}): {type(exc).__name__}: {exc}"
            ) from exc
        repo = MetadataRepo(engine)
        if is_sqlite(engine):
            released = repo.release_claims()
            if released:
                log.info("resuming %d images interrupted while processing", released)
        blobs = FileBlobStore(settings.data_dir / "blobs", settings.ingest.thumbnail_format)
        vectors = open_vector_store(settings)
        # Loading and the start-up checks run torch on all threads: on the torch thread, so that no other thread
        # of the process keeps an OpenMP team (models/torch_thread.py).
        clip, version = torch_thread.call(resolve_model, settings, repo)
        clip.text_runtime = onnx_text.attach_for_settings(clip, settings)
        clip.image_runtime = image_runtime.attach_for_settings(clip, settings)
        onnx_text.prune_exports(settings.data_dir / "models" / "onnx")  # after the exports in use were marked
        collection = collection_name(version)
        vectors_up = True
        try:
            vectors.ensure_collection(collection, version.dim, graph=False)
            vectors.create_payload_indexes(collection, PAYLOAD_INDEXES)
        except Unavailable:
            # A Qdrant server that is down does not stop Loupe: searches run from the mirror's files, uploads
            # are queued, and everything catches up when it returns.
            vectors_up = False
            log.warning("the Qdrant server at LOUPE_QDRANT_URL is unreachable: serving from the FAISS mirror")
        mirror = FaissMirror(
            (settings.index.directory or settings.data_dir / "mirror") / collection,
            collection=collection,
            model_version_id=int(version.id),  # type: ignore[arg-type]
            dim=version.dim,
            settings=settings.index,
        )
        if vectors_up:
            report = mirror.open(repo, vectors)
        else:
            loaded = mirror.load()
            report = SyncReport(mirror.live_count if loaded else 0, False, mirror.last_seq, 0.0)
        log.info(
            "FAISS mirror %s: %d vectors (%s), %s",
            collection,
            mirror.live_count,
            mirror.index_type,
            "rebuilt from the vector store" if report.rebuilt else f"replayed {report.applied} changes",
        )
        text_indexer = open_text_indexer(settings, repo, vectors)
        secret = load_or_create_secret(settings.data_dir)
        ingest = IngestService(
            settings=settings.ingest,
            repo=repo,
            blobs=blobs,
            vectors=vectors,
            clip=clip,
            collection=collection,
            model_version_id=int(version.id),  # type: ignore[arg-type]
            text_indexer=text_indexer,
        )
        search = search_service(
            settings,
            repo,
            vectors,
            secret,
            text_indexer,
            clip,
            mirror,
            collection,
            int(version.id),  # type: ignore[arg-type]
            sole_writer=lock is not None and settings.database_url is None,
        )
        bulk = BulkService(settings.ingest, repo, ingest, settings.data_dir / "staging")
        keys = KeyService(repo, secret, settings.auth)
        if settings.auth_required and keys.active_count() == 0:
            _, token = keys.create("admin", ["read", "write", "admin"])
            log.warning("=" * 78)
            log.warning(
                "Keys are required on %s. An admin key was created; it is shown ONCE:", settings.server.host
            )
            log.warning("    %s", token)
            log.warning("Sign in with it in the browser, or send it as 'Authorization: Bearer <key>'.")
            log.warning("=" * 78)
        rt = cls(
            settings=settings,
            engine=engine,
            repo=repo,
            blobs=blobs,
            vectors=vectors,
            clip=clip,
            model_version=version,
            collection=collection,
            mirror=mirror,
            ingest=ingest,
            search=search,
            bulk=bulk,
            keys=keys,
            secret=secret,
            lock=lock,
        )
        # Wired after construction: both need the runtime itself (the mirror it syncs, the URLs it signs).
        ingest.on_indexed = rt.sync_mirror
        search.url_for = rt.url
        rt.arm_image_lanes()

        # Loading shards, the mirror and the models frees far more than it keeps; glibc holds freed heap in its
        # arenas unless asked (Qdrant Edge at 100k: 312 MB anonymous after load, 127 MB after this).
        release_freed_heap()
        if start_workers:
            rt.start_workers()
        return rt

    def url(self, path: str) -> str:
        """An image or thumbnail URL for a response: signed and expiring when keys are required."""
        return self.keys.sign_url(path) if self.settings.auth_required else path

    def swap_model(self, clip: ClipModel, version: ModelVersion, mirror: FaissMirror) -> None:
        """Point searches and ingest at another model version. Searches take `self.search` once per request,
        so each is answered wholly by one version; ingest batches hold the ingest lock, taken by the caller."""
        collection = collection_name(version)
        search = self.search_service_for(clip, mirror, collection, int(version.id), self.settings)  # type: ignore[arg-type]
        self.ingest.retarget(clip, collection, int(version.id))  # type: ignore[arg-type]
        self.clip, self.model_version, self.collection, self.mirror = clip, version, collection, mirror
        self.search = search
        self.arm_image_lanes()

    def arm_image_lanes(self) -> None:
        """Where the bf16 image copy serves ingest's single-threaded lanes, have their compiled build made
        (models/compiled_image.py) on a thread of its own: at once with LOUPE_MODEL__IMAGE_COMPILE=on; with auto,
        once ingest finds COMPILE_BACKLOG pictures pending (an import large enough to repay the build)."""
        mode = self.settings.model.image_compile
        self.ingest.when_backlog(0, None)  # armed for the model before a switch
        if self.clip.image_runtime != "bf16" or mode == "off" or not self.ingest.lane_batch():
            return
        if mode == "on":
            self.compile_image_lanes()
        else:
            self.ingest.when_backlog(compiled_image.COMPILE_BACKLOG, self.compile_image_lanes)

    def compile_image_lanes(self) -> None:
        """Build the compiled image lanes now, on a thread of its own (`self.lanes_built`, for whoever must wait
        for it), as LOUPE_MODEL__IMAGE_COMPILE says."""
        memory = ChoiceMemory(self.settings.data_dir / "models")
        mode, batch = self.settings.model.image_compile, self.ingest.lane_batch()
        # The timing holds ingest's model lock: a run of batches ends after the batch in hand and waits meanwhile.
        quiet = self.ingest.model_lock
        self.lanes_built = compiled_image.build_in_background(self.clip, mode, batch, memory, quiet)

    def search_service_for(
        self, clip: ClipModel, mirror: FaissMirror, collection: str, version_id: int, settings: Settings
    ) -> SearchService:
        """A SearchService over this library's stores (another model version, or other settings: loupe eval)."""
        search = search_service(
            settings,
            self.repo,
            self.vectors,
            self.secret,
            self.search.text_indexer,
            clip,
            mirror,
            collection,
            version_id,
            sole_writer=self.search.sole_writer,
        )
        search.url_for = self.url
        return search

    def sync_mirror(self) -> None:
        try:
            self.mirror.sync(self.repo, self.vectors)
        except Unavailable:
            log.warning("mirror catch-up postponed: the vector store is unavailable")

    def start_workers(self) -> None:
        if self.settings.ingest.workers:
            self.ingest.start_prepare_pool()
        for n in range(self.settings.ingest.workers):
            worker = IngestWorker(self.ingest, self.settings.ingest.poll_s, name=f"loupe-ingest-{n}")
            worker.start()
            self.workers.append(worker)
        if self.settings.ingest.workers:
            bulk_worker = BulkWorker(self.bulk, self.settings.ingest.poll_s)
            bulk_worker.start()
            self.workers.append(bulk_worker)
        if self.repo.counts_by_state().get("pending"):
            self.ingest.work_available.set()

    def health(self) -> dict[str, Any]:
        info = self.clip.info
        out: dict[str, Any] = {
            "status": "ok",
            "counts": self.repo.counts_by_state(),
            "model": {
                "name": info.name,
                "source": info.source,
                "version": self.model_version.id,
                "fingerprint": info.fingerprint,
                "dim": info.dim,
                "device": info.device,
                "demo": info.is_demo,
                "image_runtime": self.clip.image_runtime,
                "image_lanes": self.clip.image_lanes,
                "text_runtime": self.clip.text_runtime,
                "text_batches": self.clip.text_batches or None,
                # How the `auto` runtimes were chosen: timed at this start or remembered (models/runtime_choice.py).
                "runtime_choices": dict(self.clip.runtime_choices),
                # Text encodes since start: how many forward passes served how many new query texts (their ratio is
                # the micro-batches' mean size under load), and how many passes started beside a running one.
                "text_encodes": {
                    "passes": self.search.text_cache.encode.batches,
                    "queries": self.search.text_cache.encode.items,
                    "side_by_side": self.search.text_cache.encode.side_by_side,
                },
                # Shared query prefixes whose states are kept (models/text_prefix.py): how many, their memory, the
                # passes that ran on one and the tokens those passes did not compute. None where none are kept.
                "text_prefixes": self.clip.prefix_stats(),
                # Uploaded query pictures since start, and the image-tower passes that served them.
                "image_query_encodes": {
                    "passes": self.search.picture_encode.batches,
                    "pictures": self.search.picture_encode.items,
                },
                "versions": [
                    {"id": v.id, "name": v.name, "active": v.active, "created_at": v.created_at.isoformat()}
                    for v in self.repo.model_versions("clip")
                ],
                "switch": self.switcher.status.as_dict(),
                "finetune": {k: v for k, v in self.finetuner.status.as_dict().items() if k != "report"},
            },
            "ocr": {
                "enabled": self.ingest.text_indexer is not None,
                "languages": self.settings.ocr.languages,
                "encoder": self.ingest.text_indexer.encoder.name if self.ingest.text_indexer else None,
            },
            "stores": {
                "metadata": self.engine.dialect.name,
                "vectors": self.vectors.kind,
                "vectors_status": self._vector_store_status(),
                "vectors_uncompacted": self._uncompacted(),
                "collection": self.collection,
                "mirror": self.mirror.stats(),
                "blobs": "files",
            },
            "caches": self.search.cache_stats(),
            "warnings": [],
        }
        if info.is_demo:
            out["status"] = "degraded"
            out["warnings"].append(
                {
                    "code": "demo_model",
                    "message": "Running on the offline demo model (tiny CLIP trained on coloured shapes): "
                    "search quality on real pictures is poor. Set LOUPE_CLIP_MODEL to a real CLIP checkpoint.",
                }
            )
        return out

    def _uncompacted(self) -> int | None:
        """Points Qdrant Edge holds on the heap until the next start compacts them (LOUPE_QDRANT_EDGE_COMPACT)."""
        try:
            return self.vectors.uncompacted_count(self.collection)
        except Exception:  # unavailable, or no collection yet: the status field says which
            return None

    def _vector_store_status(self) -> str:
        try:
            self.vectors.count(self.collection)
            return "ok"
        except Unavailable:
            return "unavailable"
        except Exception:  # a collection not created yet on a server that just came back
            return "unknown"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.switcher.cancel()  # an unfinished switch is abandoned; the library stays on its model
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        try:
            self.sync_mirror()
            self.mirror.save()
        except Exception:
            log.exception("saving the FAISS mirror at shutdown failed (it will catch up at the next start)")
        self.ingest.close()
        if self.ingest.text_indexer is not None:
            self.ingest.text_indexer.close()
        self.vectors.close()
        self.engine.dispose()
        if self.lock:
            self.lock.release()


__all__ = ["DEMO_MODEL_NAME", "Runtime"]
