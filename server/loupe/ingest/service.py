"""The write path: validate -> store the blob -> record as pending -> (worker) decode, embed, index, ready."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL.Image import Image as PILImage
from sqlmodel import Session

from loupe.config import IngestSettings
from loupe.errors import LoupeError, NotFound, TooLarge, Unavailable
from loupe.ingest.exif import dhash, read_exif
from loupe.ingest.prepare_pool import PreparePool, Ready, prepare_processes
from loupe.ingest.text import TextIndexer
from loupe.ingest.validate import (
    clean_name,
    decode_rgb,
    encode_thumbnail,
    inspect_upload,
    resample_planes,
    thumbnail_image,
)
from loupe.models.clip import ClipModel, resize_crop, resize_geometry
from loupe.models.vectors import normalize
from loupe.ocr.tesseract import OcrResult
from loupe.search.filters import payload_for
from loupe.storage.blobs.files import FileBlobStore
from loupe.storage.metadata.repo import MetadataRepo, NewImage
from loupe.storage.metadata.tables import Image, ImageText, utcnow
from loupe.storage.vectors.base import VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadOutcome:
    filename: str
    status: str  # accepted | duplicate | rejected
    id: int | None = None
    error: dict[str, str] | None = None


@dataclass
class BatchReport:
    claimed: int = 0
    ready: int = 0
    failed: int = 0
    retried: int = 0
    unavailable: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def decode_side(clip: ClipModel, settings: IngestSettings) -> int:
    """The shorter side a JPEG is decoded at (a reduced DCT scale): enough for the model's input and the
    thumbnail (bench/RESULTS.md: 1.8x the end-to-end rate of a decode at twice the model's size)."""
    return max(clip.info.image_size, settings.thumbnail_px * 3 // 4)


def model_input(rgb: PILImage, thumb: PILImage, size: int, crop: int) -> np.ndarray:
    """The model's input (uint8 HWC) of a decoded picture, resized to `size` and centre-cropped to `crop`: from its
    thumbnail where that covers the model's resize (0.88 instead of 1.59 ms a picture, 0.46/255 mean difference per
    input pixel on 1 MP JPEGs), else from the decode itself. A thumbnail that was resampled (the picture was
    larger) is resized by torch's bicubic kernel (within 2/255 of Pillow's on 0.4% of the pixels, 0.88 against
    1.56 ms: bench/RESULTS.md, "A/B: thumbnails and model inputs resampled by torch"); a picture no larger than its
    thumbnail gets exactly CLIPImageProcessorPil's pixels (resize_crop)."""
    if thumb.size == rgb.size or min(thumb.size) < size or thumb.mode != "RGB":
        return resize_crop(thumb if min(thumb.size) >= size else rgb, size, crop)
    resized, (left, top, right, bottom) = resize_geometry(*thumb.size, size, crop)
    planes = resample_planes(thumb, resized, "bicubic")
    return np.ascontiguousarray(planes[:, top:bottom, left:right].transpose(1, 2, 0))


@dataclass
class Prepared:
    """One picture made ready for the model: its decode (for OCR), encoded thumbnail, metadata and model input."""

    rgb: PILImage
    thumbnail: bytes
    meta: dict[str, Any]
    pixels: np.ndarray


def prepare_picture(data: bytes, settings: IngestSettings, side: int, size: int, crop: int) -> Prepared:
    """Decode (JPEGs at the reduced DCT scale whose shorter side is at least `side`), thumbnail, hash and resize
    one picture: all the per-picture work of ingest outside the model and the stores. Needs no model (the sizes
    are ClipModel.model_sizes), so a worker process can run it."""
    rgb = decode_rgb(data, max_pixels=settings.max_pixels, min_side=side)
    thumb = thumbnail_image(rgb, settings.thumbnail_px)
    encoded = encode_thumbnail(thumb, settings.thumbnail_quality, settings.thumbnail_format)
    # The thumbnail is the cheaper source of the hash, and of the model's input (model_input). Width and height
    # were recorded (EXIF-oriented) at upload; a draft decode is smaller anyway.
    meta = {**read_exif(data), "phash": dhash(thumb)}
    return Prepared(rgb, encoded, meta, model_input(rgb, thumb, size, crop))


def prepare_stored(
    blobs: FileBlobStore, sha256: str, settings: IngestSettings, side: int, size: int, crop: int
) -> Ready:
    """One stored picture made ready (prepare_picture), its thumbnail written unsynced: the batch's finishing step
    syncs it before a row records it. The same work in a decode thread, a model worker or a worker process
    (ingest/prepare_pool.py)."""
    ready = prepare_picture(blobs.read_original(sha256), settings, side, size, crop)
    path = blobs.put_thumbnail(sha256, ready.thumbnail, sync=False)
    return Ready(path, ready.meta, ready.pixels, ready.rgb)


def query_pixels(data: bytes, clip: ClipModel, settings: IngestSettings) -> np.ndarray:
    """An uploaded query picture prepared as ingest prepares a library picture (the same decode scale,
    thumbnail and resize), so that a copy of a library picture queries with the vector stored for it: the model's
    input, uint8 HWC."""
    rgb = decode_rgb(data, max_pixels=settings.max_pixels, min_side=decode_side(clip, settings))
    return model_input(rgb, thumbnail_image(rgb, settings.thumbnail_px), *clip.model_sizes)


class ModelLock:
    """A reentrant lock that knows whether another thread waits for it: a run of pipelined ingest batches holds
    it and ends after the batch in hand when a delete, an edit or a model switch is waiting."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    def __enter__(self) -> ModelLock:
        with self._count:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    @property
    def contended(self) -> bool:
        """Whether a thread is waiting to take the lock (or just took it and has not yet said so)."""
        return self._waiting > 0


@dataclass
class _Started:
    """A batch claimed, decoded and embedded, waiting to be indexed (with the model version it was embedded by)."""

    report: BatchReport
    collection: str
    model_version_id: int
    decoded: list[tuple[Image, np.ndarray]] = field(default_factory=list)
    meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    ocr: dict[int, Future[OcrResult]] = field(default_factory=dict)
    thumbnails: dict[int, Path] = field(default_factory=dict)
    vectors: np.ndarray | BaseException | None = None


class _Run:
    """What the lanes of one `process_batches` run share: the batch budget, when to stop starting batches, and
    whether an import's uploads are still coming (`feeding`, announced on `work`)."""

    def __init__(
        self,
        max_batches: int,
        stop: Callable[[], bool] | None,
        lock: ModelLock,
        feeding: threading.Event | None,
        work: threading.Event,
    ) -> None:
        self._left = max_batches
        self._count = threading.Lock()
        self._stop = stop
        self._lock = lock
        self.halt = threading.Event()  # set once any lane sees a reason to end (or fails)
        self._feeding = feeding
        self._work = work

    def fed(self) -> bool:
        """Whether uploads are still coming (read before a claim: once they have ended, an empty claim is the
        end)."""
        return self._feeding is not None and self._feeding.is_set()

    def await_uploads(self) -> bool:
        """After an empty claim while uploads are still coming: wait a moment for the next one and say to claim
        again (a lane that ended there left its core idle for the rest of the run: 0.93x the rate of uploading
        first and embedding after, on 2 cores), unless the run is ending."""
        if self.ending():
            return False
        if self._work.wait(0.05):
            self._work.clear()
        return True

    def take(self) -> bool:
        """Whether a lane may start another batch (and counts it)."""
        with self._count:
            if self.halt.is_set() or self._left <= 0:
                return False
            self._left -= 1
            return True

    def give_back(self) -> None:
        """A batch taken but not started after all (an empty claim looked at again)."""
        with self._count:
            self._left += 1

    def ending(self) -> bool:
        """After a batch is handed to the finishing thread: whether the run ends after the batches in hand."""
        if (self._stop is not None and self._stop()) or self._lock.contended:
            self.halt.set()
        return self.halt.is_set()


class IngestService:
    def __init__(
        self,
        *,
        settings: IngestSettings,
        repo: MetadataRepo,
        blobs: FileBlobStore,
        vectors: VectorStore,
        clip: ClipModel,
        collection: str,
        model_version_id: int,
        on_indexed: Callable[[], None] | None = None,
        text_indexer: TextIndexer | None = None,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.blobs = blobs
        self.vectors = vectors
        self.clip = clip
        self.collection = collection
        self.model_version_id = model_version_id
        self.on_indexed = on_indexed
        self.text_indexer = text_indexer
        self.work_available = threading.Event()
        self._decode_side = decode_side(clip, settings)
        processes = prepare_processes(settings, clip.info.device)
        self._prepare_pool = PreparePool(processes, blobs, settings) if processes else None
        # Held for each batch (and vector add): a model switch takes it to change models between batches.
        self.model_lock = ModelLock()
        self.shadow_collections: list[str] = []  # a model switch's new collection: edits and deletes reach it
        self._backlog: tuple[int, Callable[[], None]] | None = None  # when_backlog's
        # Pictures an import has said it is about to send (drain's `coming`): a backlog on its way counts as one.
        self._coming = 0

    def when_backlog(self, pictures: int, then: Callable[[], None] | None) -> None:
        """Call `then` once, when a `process_batches` run of lanes starts with at least `pictures` pictures pending,
        or an import running `drain` beside its uploads has said that many are coming (the compiled image lanes
        start there: models/compiled_image.py); None forgets an earlier `then`."""
        self._backlog = None if then is None else (pictures, then)

    def retarget(self, clip: ClipModel, collection: str, model_version_id: int) -> None:
        """Embed with another model version from the next batch on (call with model_lock held)."""
        self.clip, self.collection, self.model_version_id = clip, collection, model_version_id
        self._decode_side = decode_side(clip, self.settings)

    def payloads(self, ids: Sequence[int]) -> tuple[list[int], list[dict[str, Any]]]:
        """The Qdrant payloads (filterable fields) of the ready images among ids."""
        rows = self.repo.get_images(list(ids))
        ready = [int(i) for i in ids if i in rows and rows[i].state == "ready"]
        tags, albums, texts = (
            self.repo.tags_for(ready),
            self.repo.albums_for(ready),
            self.repo.has_text_for(ready),
        )
        return ready, [payload_for(rows[i], tags[i], albums[i], i in texts) for i in ready]

    # ------------------------------------------------------------ upload

    def upload(
        self,
        files: Sequence[tuple[str | None, bytes]],
        tags: Sequence[str] = (),
        albums: Sequence[str] = (),
        then: Callable[[Session, list[UploadOutcome]], None] | None = None,
        sha256s: Sequence[str] | None = None,
    ) -> list[UploadOutcome]:
        """Check, store and record each file; answers per file. A rejected file leaves nothing behind and does
        not stop the others. `sha256s`: the files' hex digests where the caller has them already (an import
        hashes each file to skip the stored ones), so that no file is hashed twice. The accepted files' rows go in
        as one transaction; `then(session, outcomes)` runs in it before it commits (a bulk job records its progress there), so an error there, or in the database,
        records none of the request's files and they can be sent again."""
        if len(files) > self.settings.max_files_per_request:
            raise TooLarge(
                f"{len(files)} files in one request, over the limit of {self.settings.max_files_per_request} "
                "(use POST /api/images/bulk, or LOUPE_INGEST__MAX_FILES_PER_REQUEST)",
                code="too_many_files",
            )
        outcomes: list[UploadOutcome] = []
        # (position, row, bytes) of the files that passed the check
        news: list[tuple[int, NewImage, bytes]] = []
        tags, albums = tuple(tags), tuple(albums)
        for k, (name, data) in enumerate(files):
            filename = clean_name(name)
            try:
                facts = inspect_upload(
                    data,
                    max_bytes=self.settings.max_file_mb * 1024 * 1024,
                    max_pixels=self.settings.max_pixels,
                )
            except LoupeError as exc:
                outcomes.append(
                    UploadOutcome(filename, "rejected", error={"code": exc.code, "message": exc.message})
                )
                continue
            new = NewImage(
                sha256=sha256s[k] if sha256s is not None else hashlib.sha256(data).hexdigest(),
                original_name=filename,
                format=facts.format,
                mime=facts.mime,
                size_bytes=len(data),
                width=facts.width,
                height=facts.height,
                frames=facts.frames,
                tags=tags,
                albums=albums,
            )
            news.append((len(outcomes), new, data))
            outcomes.append(UploadOutcome(filename, "duplicate"))  # until the insert says otherwise
        stored = self.repo.existing_hashes(n.sha256 for _, n, _ in news)
        todo: list[tuple[int, NewImage]] = []  # (position, row) of the files to insert
        for k, n, data in news:
            if n.sha256 in stored:
                outcomes[k] = UploadOutcome(n.original_name, "duplicate", id=stored[n.sha256])
                continue
            # The blob goes first, written durably: a row never points at a missing file. A crash before the rows
            # commit leaves only unreferenced blobs, which `loupe reindex --repair` removes.
            self.blobs.put_original(n.sha256, data)
            todo.append((k, n))

        def record(s: Session, result: list[tuple[int, bool]]) -> None:
            for (k, n), (image_id, created) in zip(todo, result, strict=True):
                outcomes[k] = UploadOutcome(
                    n.original_name, "accepted" if created else "duplicate", id=image_id
                )
            if then is not None:
                then(s, outcomes)

        if todo or then is not None:
            self.repo.insert_images([n for _, n in todo], then=record)
        if any(o.status == "accepted" for o in outcomes):
            self.work_available.set()
        return outcomes

    # ------------------------------------------------------------ the worker's step

    def process_batch(self, limit: int | None = None) -> BatchReport:
        """Claim a batch of pending images, decode, thumbnail, embed, upsert, mark ready (or failed)."""
        with self.model_lock:
            return self._finish_batch(self._start_batch(limit))

    def process_batches(
        self,
        max_batches: int = 64,
        stop: Callable[[], bool] | None = None,
        feeding: threading.Event | None = None,
    ) -> list[BatchReport]:
        """Consecutive batches until none is due (or `max_batches`), each one's finishing (OCR wait, upsert,
        commit, mirror update, thumbnail fsyncs) on a thread of its own while the next one decodes and embeds.

        On the CPU with model workers, each worker is a lane of its own: it claims a share of a batch, prepares
        and embeds it on its torch threads and hands it to the finishing thread, with no barrier between lanes
        (a batch split into shares waits for its slowest share; bench/RESULTS.md measured one share's forward
        pass taking up to 26% longer than the other's on the same pictures).

        The model lock is held throughout, as for one batch, but the run ends after the batch in hand as soon as
        another thread waits for the lock (a delete, an edit, a model switch), so none waits longer than for one
        batch; likewise when `stop()` says so. A batch that fails to finish ends the run with its exception, as
        `process_batch` would, after the batch started beside it is finished too. The last report has
        `claimed == 0` when the run ended because nothing was due. While `feeding` is set (an import's uploads
        still coming: `drain`), a lane that finds nothing due waits for them instead of ending."""
        lanes, threads = self._model_workers(self.settings.batch_size)
        with self.model_lock, ThreadPoolExecutor(1, thread_name_prefix="loupe-finish") as finisher:
            run = _Run(max_batches, stop, self.model_lock, feeding, self.work_available)
            if lanes == 1:
                return self._run_lane(run, finisher, None, None)
            share = -(-self.settings.batch_size // lanes)
            if self._backlog is not None and max(self.repo.pending_count(), self._coming) >= self._backlog[0]:
                then, self._backlog = self._backlog[1], None
                then()
            # Leaving the pool waits for every lane, so each finishes what it claimed before an error goes up.
            with ThreadPoolExecutor(lanes, thread_name_prefix="loupe-embed") as pool:
                futures = [pool.submit(self._run_lane, run, finisher, share, threads) for _ in range(lanes)]
        done = [fut.result() for fut in futures]
        reports = [r for lane in done for r in lane if r.claimed]
        if all(lane[-1].claimed == 0 for lane in done):  # nothing was due for any lane (or the store is down)
            reports.append(max((lane[-1] for lane in done), key=lambda r: r.unavailable))
        return reports

    def _run_lane(
        self, run: _Run, finisher: ThreadPoolExecutor, limit: int | None, threads: int | None
    ) -> list[BatchReport]:
        """One lane of `process_batches`: batches of `limit` (default: the batch size) prepared and embedded on
        `threads` torch threads in this thread (default: as `_start_batch` chooses), each finished on `finisher`
        while this lane starts its next. A lane that fails ends the others' runs after their batches in hand."""
        try:
            return self._lane_batches(run, finisher, limit, threads)
        except BaseException:
            run.halt.set()
            raise

    def _lane_batches(
        self, run: _Run, finisher: ThreadPoolExecutor, limit: int | None, threads: int | None
    ) -> list[BatchReport]:
        reports: list[BatchReport] = []
        finishing: Future[BatchReport] | None = None
        while run.take():
            fed = run.fed()
            try:
                started = self._start_batch(limit, threads)
            except BaseException:
                if finishing is not None:
                    finishing.result()
                raise
            overlapped = finishing is not None
            if finishing is not None:
                try:
                    reports.append(finishing.result())
                except BaseException:
                    # Its pictures are claimed: finish them rather than leave them to the lease.
                    self._finish_batch(started)
                    raise
                finishing = None
            if not started.decoded:
                if (
                    started.report.claimed == 0
                    and not started.report.unavailable
                    and (overlapped or (fed and run.await_uploads()))
                ):
                    run.give_back()
                    continue  # the batch that just finished may have put pictures back (a retry), or uploads come
                reports.append(self._finish_batch(started))  # nothing to overlap: bookkeeping only
                if started.report.claimed == 0 or started.report.unavailable:
                    break
                continue
            finishing = finisher.submit(self._finish_batch, started)
            if run.ending():
                break
        if finishing is not None:
            reports.append(finishing.result())
        if not reports:  # the run ended before this lane claimed anything: it says nothing was due
            reports.append(BatchReport())
        return reports

    def _start_batch(self, limit: int | None, lane_threads: int | None = None) -> _Started:
        """Claim, decode, thumbnail and embed a batch; pictures that fail are marked here. With `lane_threads`,
        this thread prepares the whole batch and embeds it on that many torch threads (a lane of
        `process_batches`)."""
        started = _Started(BatchReport(), collection=self.collection, model_version_id=self.model_version_id)
        report = started.report
        claimed = self.repo.claim_pending(limit or self.settings.batch_size, self.settings.lease_s)
        report.claimed = len(claimed)
        if not claimed:
            return started
        try:
            self.vectors.ensure_collection(self.collection, self.clip.dim, graph=False)
        except Unavailable:
            # The vector store is down: put the batch back without spending an attempt, and wait.
            self.repo.release([int(i.id) for i in claimed], retry_in_s=max(self.settings.retry_base_s, 1.0))  # type: ignore[arg-type]
            report.retried = len(claimed)
            report.claimed = 0
            report.unavailable = True
            return started
        t0 = time.perf_counter()
        # OCR (Tesseract subprocesses) starts as each picture is decoded and runs beside the CLIP forward pass.
        embedded: list[np.ndarray | BaseException] | None = None
        if lane_threads:
            prepared, vecs = self._prepare_and_embed(claimed, lane_threads, started)
            embedded = [vecs]
        elif (split := self._model_workers(len(claimed)))[0] > 1:
            # One model worker per share of the batch, each on its own torch threads: a worker's decoding overlaps
            # the others' forward passes, and single-threaded forward passes waste no time in thread barriers.
            workers, threads = split
            n = len(claimed)
            shares = [claimed[k * n // workers : (k + 1) * n // workers] for k in range(workers)]
            with ThreadPoolExecutor(workers, thread_name_prefix="loupe-embed") as pool:
                parts = list(pool.map(lambda share: self._prepare_and_embed(share, threads, started), shares))
            prepared = [outcome for outcomes, _ in parts for outcome in outcomes]
            embedded = [vecs for _, vecs in parts]
        elif self._prepare_pool is not None:
            prepared = self._prepare_elsewhere(self._prepare_pool, claimed, started)
        else:
            decode_threads = self.settings.decode_threads or min(8, os.cpu_count() or 1)
            with ThreadPoolExecutor(
                max(1, min(decode_threads, len(claimed))), thread_name_prefix="loupe-decode"
            ) as pool:
                prepared = list(pool.map(lambda image: self._prepare(image, started), claimed))
        for image, outcome in zip(claimed, prepared, strict=True):
            if isinstance(outcome, FileNotFoundError):
                self._fail(image, "blob_missing", "the stored original is missing", report, permanent=True)
            elif isinstance(outcome, LoupeError):
                self._fail(image, outcome.code, outcome.message, report, permanent=True)
            elif isinstance(
                outcome, Exception
            ):  # unexpected: retry with backoff, keep the traceback in the log
                log.error("decoding image %s failed", image.id, exc_info=outcome)
                self._fail(
                    image, "decode_error", f"unexpected {type(outcome).__name__}", report, permanent=False
                )
            else:
                pixels, started.meta[int(image.id)] = outcome  # type: ignore[arg-type]
                started.decoded.append((image, pixels))
        t1 = time.perf_counter()
        if started.decoded:
            try:
                if embedded is None:
                    started.vectors = self.clip.embed_uint8(
                        np.stack([pixels for _, pixels in started.decoded])
                    )
                else:  # each worker's vectors, in the order of its decoded pictures; its failure fails the batch
                    for part in embedded:
                        if isinstance(part, BaseException):
                            raise part
                    started.vectors = np.concatenate(embedded)  # type: ignore[arg-type]
            except Exception as exc:
                started.vectors = exc
        # With model workers, "decode" holds their forward passes too ("embed" only joins their vectors).
        report.seconds.update(decode=t1 - t0, embed=time.perf_counter() - t1)
        return started

    def _finish_batch(self, started: _Started) -> BatchReport:
        """Index what `_start_batch` embedded: OCR text, vectors, thumbnails on disk, rows ready, the mirror."""
        report, decoded, meta = started.report, started.decoded, started.meta
        if not decoded:
            return report
        try:
            t2 = time.perf_counter()
            if not isinstance(started.vectors, np.ndarray):
                raise started.vectors or RuntimeError("a batch with pictures but no vectors")
            ids = [int(img.id) for img, _ in decoded]  # type: ignore[arg-type]
            texts = self._index_text({i: started.ocr[i] for i in ids}) if self.text_indexer else []
            t3 = time.perf_counter()
            with_text = {t.image_id for t in texts if t.has_text}
            tags, albums = self.repo.tags_for(ids), self.repo.albums_for(ids)
            payloads = [
                payload_for(img.model_copy(update=meta.get(i, {})), tags[i], albums[i], i in with_text)
                for i, (img, _) in zip(ids, decoded, strict=True)
            ]
            self.vectors.upsert(started.collection, ids, started.vectors, payloads)
            t4 = time.perf_counter()
            # The thumbnails were written without waiting for the disk; they are durable before their rows say
            # ready (one fsync each, here, beside the next batch's decoding, instead of in the decode threads).
            self.blobs.sync([started.thumbnails[i] for i in ids])
            self.repo.mark_ready(ids, started.model_version_id, meta, texts)
            report.ready += len(ids)
            report.seconds.update(ocr_wait=t3 - t2, upsert=t4 - t3, commit=time.perf_counter() - t4)
        except Unavailable:
            log.warning("the vector store went away during a batch: %d images wait for it", len(decoded))
            self.repo.release(
                [img.id or 0 for img, _ in decoded], retry_in_s=max(self.settings.retry_base_s, 1.0)
            )
            report.retried += len(decoded)
            report.unavailable = True
        except Exception as exc:
            log.error("embedding/indexing a batch of %d failed", len(decoded), exc_info=exc)
            for img, _ in decoded:
                self._fail(
                    img,
                    "index_error",
                    f"embedding or indexing failed: {type(exc).__name__}",
                    report,
                    permanent=False,
                )
        if report.ready and self.on_indexed:
            self.on_indexed()
        return report

    def lane_batch(self) -> int:
        """Pictures in a single-threaded pass of one of `process_batches`' lanes (0: no such lanes: a GPU, one
        model on all threads, or lanes of several threads each)."""
        lanes, threads = self._model_workers(self.settings.batch_size)
        return -(-self.settings.batch_size // lanes) if lanes > 1 and threads == 1 else 0

    def _model_workers(self, pictures: int) -> tuple[int, int]:
        """How a batch of `pictures` is embedded: (model workers, torch threads each). One worker on a GPU."""
        if self.clip.info.device.startswith("cuda"):
            return 1, self.clip.threads
        cores = self.clip.threads
        workers = self.settings.model_workers or min(cores, max(1, pictures // 4))
        workers = max(1, min(workers, pictures))
        return workers, max(1, cores // workers)

    def _prepare_and_embed(
        self, share: list[Image], threads: int, started: _Started
    ) -> tuple[list[tuple[np.ndarray, dict[str, Any]] | Exception], np.ndarray | BaseException]:
        """A model worker: prepare its share of the batch, then embed the pictures that decoded, on `threads`
        torch threads. A failed forward pass is returned, not raised, so the batch's bookkeeping sees it."""
        outcomes = [self._prepare(image, started) for image in share]
        pixels = [o[0] for o in outcomes if not isinstance(o, Exception)]
        if not pixels:
            return outcomes, np.zeros((0, self.clip.dim), dtype=np.float32)
        try:
            return outcomes, self.clip.embed_uint8(np.stack(pixels), threads)
        except Exception as exc:
            return outcomes, exc

    def _index_text(self, pending: dict[int, Future[OcrResult]]) -> list[ImageText]:
        """Collect the OCR results (a failed read leaves the image searchable by CLIP, with no text) and index
        their chunks in the OCR channel."""
        assert self.text_indexer is not None
        items: list[tuple[int, OcrResult]] = []
        for image_id, fut in pending.items():
            try:
                items.append((image_id, fut.result()))
            except Exception as exc:  # Tesseract crashed or timed out on this picture
                log.warning("OCR of image %s failed: %s: %s", image_id, type(exc).__name__, exc)
                items.append((image_id, OcrResult(checked=False)))
        return self.text_indexer.index(items)

    def _prepare(self, image: Image, started: _Started) -> tuple[np.ndarray, dict[str, Any]] | Exception:
        """Read, decode, fingerprint, thumbnail and resize one claimed picture (in a decode thread or a model
        worker), starting its OCR: the model's input (uint8 HWC) and the metadata, or the exception that stopped
        it."""
        try:
            # JPEGs decode at a reduced DCT scale that still covers the model's input and the thumbnail.
            ready = prepare_stored(
                self.blobs, image.sha256, self.settings, self._decode_side, *self.clip.model_sizes
            )
            return self._take(image, ready, started)
        except Exception as exc:
            return exc

    def _prepare_elsewhere(
        self, pool: PreparePool, claimed: list[Image], started: _Started
    ) -> list[tuple[np.ndarray, dict[str, Any]] | Exception]:
        """`_prepare` for a batch, in the worker processes; the OCR of what they decoded starts here."""
        outcomes = pool.prepare(
            [image.sha256 for image in claimed],
            self._decode_side,
            *self.clip.model_sizes,
            want_rgb=self.text_indexer is not None,
        )
        return [
            self._take(image, outcome, started) if isinstance(outcome, Ready) else outcome
            for image, outcome in zip(claimed, outcomes, strict=True)
        ]

    def _take(self, image: Image, ready: Ready, started: _Started) -> tuple[np.ndarray, dict[str, Any]]:
        """A prepared picture into its batch: its thumbnail to be synced, its OCR started; its model input and
        metadata."""
        started.thumbnails[int(image.id)] = ready.thumbnail  # type: ignore[arg-type]
        if self.text_indexer and ready.rgb is not None:
            started.ocr[int(image.id)] = self.text_indexer.read_async(ready.rgb)  # type: ignore[arg-type]
        return ready.pixels, ready.meta

    def start_prepare_pool(self) -> None:
        """Start the worker processes that prepare pictures, where the settings have them, without waiting."""
        if self._prepare_pool is not None:
            self._prepare_pool.start()

    def close(self) -> None:
        """End the worker processes, if any were started (the runtime's close)."""
        if self._prepare_pool is not None:
            self._prepare_pool.close()

    def _fail(self, image: Image, code: str, message: str, report: BatchReport, *, permanent: bool) -> None:
        attempts = image.attempts  # already counts this attempt (claim increments it)
        if permanent or attempts >= self.settings.max_attempts:
            self.repo.mark_failed(int(image.id), code, message, retry_at=None)  # type: ignore[arg-type]
            report.failed += 1
        else:
            delay = self.settings.retry_base_s * (2 ** max(0, attempts - 1))
            self.repo.mark_failed(int(image.id), code, message, retry_at=utcnow() + timedelta(seconds=delay))  # type: ignore[arg-type]
            report.retried += 1

    def drain(
        self,
        timeout_s: float | None = 600.0,
        *,
        feeding: threading.Event | None = None,
        coming: int = 0,
        stop: threading.Event | None = None,
        on_reports: Callable[[list[BatchReport]], None] | None = None,
        max_batches: int = 64,
    ) -> int:
        """Process until nothing is due (tests, CLI import; None: no time limit). Returns how many became ready.

        Beside an import's uploads (`loupe import`): while `feeding` is set, nothing due means the next upload
        has not come yet, so it waits for one (`work_available`) instead of returning; `coming` is how many
        pictures the import is about to send (a backlog on its way, for `when_backlog`). `stop` ends it after the
        batches in hand; `on_reports` gets each run's reports (runs of at most `max_batches` batches)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        ready = 0
        self._coming = coming
        try:
            while deadline is None or time.monotonic() < deadline:
                # Read before the claim: once the uploads have ended, a claim that finds nothing is the end.
                fed = feeding is not None and feeding.is_set()
                reports = self.process_batches(max_batches, None if stop is None else stop.is_set, feeding)
                ready += sum(r.ready for r in reports)
                if on_reports is not None:
                    on_reports(reports)
                if stop is not None and stop.is_set():
                    break
                if reports[-1].claimed == 0:
                    if not fed:
                        break
                    # Uploads ended during the run: look once more at once (waiting for a wake-up that no upload
                    # would send cost an import 1 s at its end), else wait for the next one.
                    if feeding is not None and feeding.is_set():
                        self.work_available.wait(self.settings.poll_s)
                        self.work_available.clear()
        finally:
            self._coming = 0
        return ready

    # ------------------------------------------------------------ vectors without pictures

    def add_vectors(
        self,
        vectors: np.ndarray,
        *,
        width: int = 1,
        height: int = 1,
        meta: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Add images that are only vectors (tests, benchmarks): the same rows, payloads, points, change log and
        mirror updates as the worker writes, without a picture to decode. `meta[i]` may give `tags`, `albums`
        and image columns (taken_at, camera_make, camera_model, lens, gps_lat, gps_lon, rating, starred, width,
        height, format)."""
        with self.model_lock:
            return self._add_vectors(vectors, width, height, meta)

    def _add_vectors(
        self, vectors: np.ndarray, width: int, height: int, meta: Sequence[dict[str, Any]] | None
    ) -> list[int]:
        vecs = normalize(np.asarray(vectors, dtype=np.float32))
        if vecs.ndim != 2 or vecs.shape[1] != self.clip.dim:
            raise ValueError(f"expected (n, {self.clip.dim}) vectors, got {vecs.shape}")
        metas = list(meta) if meta is not None else [{} for _ in range(len(vecs))]
        ids = self.repo.insert_images_bulk(
            [
                NewImage(
                    sha256=hashlib.sha256(b"vector:" + v.tobytes()).hexdigest(),
                    original_name=f"vector-{k}",
                    format=str(metas[k].get("format", "VECTOR")),
                    mime="application/octet-stream",
                    size_bytes=0,
                    width=int(metas[k].get("width", width)),
                    height=int(metas[k].get("height", height)),
                    frames=1,
                    tags=tuple(metas[k].get("tags", ())),
                    albums=tuple(metas[k].get("albums", ())),
                )
                for k, v in enumerate(vecs)
            ]
        )
        columns = {
            i: {k: v for k, v in m.items() if k not in ("tags", "albums", "format", "width", "height")}
            for i, m in zip(ids, metas, strict=True)
        }
        for start in range(0, len(ids), 1024):
            chunk = ids[start : start + 1024]
            rows = self.repo.get_images(chunk)
            tag_map, album_map = self.repo.tags_for(chunk), self.repo.albums_for(chunk)
            payloads = [
                payload_for(rows[i].model_copy(update=columns[i]), tag_map[i], album_map[i], False)
                for i in chunk
            ]
            self.vectors.upsert(self.collection, chunk, vecs[start : start + 1024], payloads)
            self.repo.mark_ready(chunk, self.model_version_id, {i: columns[i] for i in chunk if columns[i]})
        if self.on_indexed:
            self.on_indexed()
        return ids

    # ------------------------------------------------------------ edit

    def edit(self, ids: Sequence[int], changes: Mapping[str, Any]) -> list[int]:
        """Apply user-field changes (tags/albums set, add or remove; description, rating, starred) and refresh
        the Qdrant payload of the images that are searchable. Returns the ids that exist."""
        # rating and description may be cleared with null; the star is on or off (null changes nothing).
        fields = {k: changes[k] for k in ("description", "rating", "starred") if k in changes}
        if fields.get("starred", False) is None:
            del fields["starred"]
        found = self.repo.edit(
            ids,
            fields,
            tags_add=changes.get("add_tags") or (),
            tags_remove=changes.get("remove_tags") or (),
            tags_set=changes.get("tags"),
            albums_add=changes.get("add_albums") or (),
            albums_remove=changes.get("remove_albums") or (),
            albums_set=changes.get("albums"),
        )
        self.refresh_payloads(found)
        return found

    def refresh_payloads(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 512):
            ready, payloads = self.payloads(list(ids[start : start + 512]))
            for i, payload in zip(ready, payloads, strict=True):
                for collection in (self.collection, *self.shadow_collections):
                    self.vectors.set_payload(collection, [i], payload)

    # ------------------------------------------------------------ delete

    def delete(self, image_id: int) -> None:
        """Gone from every store: the row (and a change-log entry) first, then the vector and the files."""
        with self.model_lock:  # the change log entry and the collection belong to one model version
            self._delete(image_id)

    def _delete(self, image_id: int) -> None:
        text = self.repo.get_texts([image_id]).get(image_id)
        image = self.repo.delete_image(image_id, self.model_version_id)
        if image is None:
            raise NotFound(f"image {image_id} does not exist")
        try:
            for collection in (self.collection, *self.shadow_collections):
                self.vectors.delete(collection, [image_id])
            if text is not None and self.text_indexer is not None:
                self.text_indexer.delete(image_id, text.chunks)
        except Unavailable:
            # The row is gone (search joins never return it); the stray vector is what `loupe reindex --repair`
            # removes once the store is back.
            log.warning(
                "image %s deleted while the vector store is down: its vector stays until reindex", image_id
            )
        if image.format != "VECTOR":
            self.blobs.delete(image.sha256)
        if self.on_indexed:
            self.on_indexed()


class IngestWorker:
    """A background thread that runs the ingest service's batches until stopped; wakes on new uploads."""

    def __init__(self, service: IngestService, poll_s: float, name: str = "loupe-ingest") -> None:
        self.service = service
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # A run ends when nothing is due or another thread wants the model lock; a stop request waits
                # for the run in hand, as it waited for the batch in hand.
                reports = self.service.process_batches(stop=self._stop.is_set)
            except Exception:
                log.exception("ingest worker step failed; retrying shortly")
                self._stop.wait(self.poll_s)
                continue
            for report in reports:
                if report.ready or report.failed:
                    log.info(
                        "ingest: %d ready, %d failed, %d to retry (%s)",
                        report.ready,
                        report.failed,
                        report.retried,
                        ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report.seconds.items()),
                    )
            if reports[-1].claimed == 0:
                self.service.work_available.wait(self.poll_s * (5 if reports[-1].unavailable else 1))
                self.service.work_available.clear()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: finish the batch in hand (its rows are committed or stay claimed and are resumed)."""
        self._stop.set()
        self.service.work_available.set()
        self._thread.join(timeout)
