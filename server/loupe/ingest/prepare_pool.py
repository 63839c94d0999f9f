"""Worker processes that prepare stored pictures for the model: read the original, decode it, write its thumbnail
and make its metadata and model input (prepare_picture), each in a process of its own.

Where one model embeds whole batches fast (a GPU), the CPU side bounds ingest, and threads of one process cannot
go past its GIL: the Python between the C calls of a picture's preparation (Pillow's encoders, numpy and torch glue,
EXIF and the perceptual hash) holds it, so threads stop scaling at a few cores whatever the machine has
(bench/RESULTS.md, "A/B: pictures prepared in worker processes"). A pool of spawned processes (never forked from a
server's threads) runs that work beside the model with a GIL each; the parent keeps the claims, the model and the
bookkeeping. The thumbnails are written by the workers unsynced, as the threads write them, and made durable by the
batch's finishing step before any row records them."""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL.Image import Image as PILImage

from loupe.config import IngestSettings
from loupe.errors import LoupeError
from loupe.storage.blobs.files import FileBlobStore

log = logging.getLogger(__name__)

# Pictures a worker takes at once: fewer round trips through the pool's queues, and still several tasks a
# worker in a batch of 256.
CHUNK = 4


@dataclass
class Ready:
    """A picture a worker prepared: its thumbnail's path (written, not yet synced), metadata, model input (uint8
    HWC) and, where OCR reads it, the decode."""

    thumbnail: Path
    meta: dict[str, Any]
    pixels: np.ndarray
    rgb: PILImage | None


class PreparedElsewhereError(Exception):
    """A worker's unexpected exception, by type name and message (its class may not rebuild in this process)."""


_blobs: FileBlobStore | None = None
_settings: IngestSettings | None = None


def _start_worker(blobs: FileBlobStore, settings: IngestSettings) -> None:
    global _blobs, _settings
    _blobs, _settings = blobs, settings
    import torch  # resample_planes' kernels: one thread each, as many workers as cores

    torch.set_num_threads(1)


def _prepare_stored(sha256: str, side: int, size: int, crop: int, want_rgb: bool) -> tuple[Any, ...]:
    """A worker's task: one stored picture prepared, or its failure as plain values (LoupeError's keyword
    arguments do not survive pickling)."""
    from loupe.ingest.service import prepare_stored  # the service imports this module

    assert _blobs is not None and _settings is not None
    try:
        ready = prepare_stored(_blobs, sha256, _settings, side, size, crop)
    except FileNotFoundError as exc:
        return ("missing", str(exc))
    except LoupeError as exc:
        return ("refused", exc.code, exc.message)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("ok", ready if want_rgb else replace(ready, rgb=None))  # the decode goes back only for OCR


class PreparePool:
    """`processes` spawned workers preparing the pictures stored in `blobs`, started at the first batch."""

    def __init__(self, processes: int, blobs: FileBlobStore, settings: IngestSettings) -> None:
        self.processes = processes
        self._blobs, self._settings = blobs, settings
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> ProcessPoolExecutor:
        """Start the workers without waiting for them (a spawned worker takes seconds to import what it runs): an
        import or a server calls it first, so that they are ready by the first batch. Idempotent."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self._blobs, self._settings),
            )
            for _ in range(self.processes):  # the pool spawns a worker per task waiting, up to its size
                self._pool.submit(os.getpid)
            log.info("ingest: pictures prepared in %d worker processes", self.processes)
        return self._pool

    def prepare(
        self, sha256s: list[str], side: int, size: int, crop: int, *, want_rgb: bool
    ) -> list[Ready | Exception]:
        """Each picture's preparation, in order: a Ready, or the exception that stopped it (FileNotFoundError for
        a missing original, LoupeError for one that cannot be decoded)."""
        task = partial(_prepare_stored, side=side, size=size, crop=crop, want_rgb=want_rgb)
        try:
            outcomes = self.start().map(task, sha256s, chunksize=CHUNK)
            return [_outcome(o) for o in outcomes]
        except BrokenProcessPool as exc:
            # A worker died (killed, out of memory): the batch's pictures go back for a retry, and the next batch
            # starts a new pool.
            log.error("ingest: a worker process preparing pictures died (%s); starting new ones", exc)
            self.close()
            return [PreparedElsewhereError(f"a worker process died: {exc}") for _ in sha256s]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _outcome(result: tuple[Any, ...]) -> Ready | Exception:
    kind = result[0]
    if kind == "ok":
        return result[1]  # type: ignore[no-any-return]
    if kind == "missing":
        return FileNotFoundError(result[1])
    if kind == "refused":
        return LoupeError(result[2], code=result[1])
    return PreparedElsewhereError(f"{result[1]}: {result[2]}")


def prepare_processes(settings: IngestSettings, device: str) -> int:
    """Worker processes for `settings.prepare_processes` (-1: on a GPU, one per CPU core but two, at most 16: the
    main process feeds the model, keeps the books and takes the uploads, 2.5 ms of CPU a picture with a free model
    on the CPU (bench/RESULTS.md); none on the CPU, where the model's lanes take the cores and prepare their own
    shares)."""
    if settings.prepare_processes >= 0:
        return settings.prepare_processes
    if device.startswith("cuda"):
        return max(1, min(16, (os.cpu_count() or 1) - 2))
    return 0
