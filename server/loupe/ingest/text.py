"""The OCR channel's write side: read the words (Tesseract, in threads beside the CLIP pass), embed them in
chunks with the sentence encoder, and keep one Qdrant point per chunk.

Chunk point ids are image_id * CHUNK_SLOTS + k, so an image's points are found and deleted without a payload
query, and a hit maps back to its image by integer division.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from loupe.config import OcrSettings
from loupe.models.text_encoder import SentenceEncoder
from loupe.ocr.tesseract import OcrResult, read_text
from loupe.storage.metadata.tables import ImageText
from loupe.storage.vectors.base import VectorStore

log = logging.getLogger(__name__)

CHUNK_SLOTS = 4096


def chunk_point_ids(image_id: int, count: int) -> list[int]:
    return [image_id * CHUNK_SLOTS + k for k in range(min(count, CHUNK_SLOTS))]


class TextIndexer:
    def __init__(
        self, settings: OcrSettings, encoder: SentenceEncoder, vectors: VectorStore, collection: str
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.vectors = vectors
        self.collection = collection
        self.pool = ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="loupe-ocr")

    def read_async(self, img: Image.Image) -> Future[OcrResult]:
        """Tesseract runs as a subprocess: threads overlap it with the CLIP forward pass."""
        return self.pool.submit(
            read_text,
            img,
            languages=self.settings.languages,
            min_conf=self.settings.min_confidence,
            presence_threshold=self.settings.presence_threshold,
            timeout_s=self.settings.timeout_s,
        )

    def index(self, items: list[tuple[int, OcrResult]]) -> list[ImageText]:
        """Embed every chunk of every image in one pass, upsert the points, and return the rows to store."""
        rows: list[ImageText] = []
        texts: list[str] = []
        ids: list[int] = []
        payloads: list[dict[str, Any]] = []
        for image_id, result in items:
            chunks = result.chunks()[:CHUNK_SLOTS]
            for k, (chunk, _lines) in enumerate(chunks):
                texts.append(chunk)
                ids.append(image_id * CHUNK_SLOTS + k)
                payloads.append({"image_id": image_id, "chunk": k})
            data = result.to_json()
            data["chunks"] = [lines for _, lines in chunks]
            rows.append(
                ImageText(
                    image_id=image_id,
                    content=result.text,
                    has_text=bool(result.words),
                    checked=result.checked,
                    data=data,
                    chunks=len(chunks),
                    languages=self.settings.languages,
                    ocr_ms=round(result.ms, 1),
                )
            )
        if texts:
            vecs = self.encoder.embed(texts)
            self.vectors.upsert(self.collection, ids, vecs, payloads)
        return rows

    def delete(self, image_id: int, chunks: int) -> None:
        if chunks:
            self.vectors.delete(self.collection, chunk_point_ids(image_id, chunks))

    def search(self, query: np.ndarray, limit: int) -> list[tuple[int, float, int]]:
        """Best chunk per image: (image_id, cosine, chunk index), best first."""
        best: dict[int, tuple[float, int]] = {}
        for hit in self.vectors.search(self.collection, query, limit * 4):
            image_id, k = divmod(hit.id, CHUNK_SLOTS)
            if image_id not in best or hit.score > best[image_id][0]:
                best[image_id] = (hit.score, k)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:limit]
        return [(i, s, k) for i, (s, k) in ranked]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
