"""`loupe reindex --check | --repair`: compare the database (the source of truth) with Qdrant, the FAISS mirror
and the stored files, report every difference, and fix them on request.

Repairs: a ready image without its vector goes back to `pending` (the worker re-embeds it); vectors, OCR chunks
and files that no image owns are deleted; a missing thumbnail is made again from the original; an image whose
original is gone is marked `failed` (code `blob_missing`); a mirror that disagrees is rebuilt from Qdrant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlmodel import col

from loupe.ingest.text import CHUNK_SLOTS
from loupe.ingest.validate import decode_rgb, make_thumbnail
from loupe.storage.metadata.tables import Image, ImageState, utcnow


@dataclass
class ReindexReport:
    checked_images: int = 0
    missing_vectors: list[int] = field(default_factory=list)
    orphan_vectors: list[int] = field(default_factory=list)
    orphan_text_chunks: list[int] = field(default_factory=list)
    missing_originals: list[int] = field(default_factory=list)
    missing_thumbnails: list[int] = field(default_factory=list)
    orphan_files: list[str] = field(default_factory=list)
    mirror_mismatch: bool = False
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (
            self.missing_vectors
            or self.orphan_vectors
            or self.orphan_text_chunks
            or self.missing_originals
            or self.missing_thumbnails
            or self.orphan_files
            or self.mirror_mismatch
        )

    def to_dict(self) -> dict[str, Any]:
        def short(xs: list[Any]) -> dict[str, Any]:
            return {"count": len(xs), "sample": xs[:20]}

        return {
            "clean": self.clean,
            "repaired": self.repaired,
            "checked_images": self.checked_images,
            "missing_vectors": short(self.missing_vectors),
            "orphan_vectors": short(self.orphan_vectors),
            "orphan_text_chunks": short(self.orphan_text_chunks),
            "missing_originals": short(self.missing_originals),
            "missing_thumbnails": short(self.missing_thumbnails),
            "orphan_files": short(self.orphan_files),
            "mirror_mismatch": self.mirror_mismatch,
        }


def check(rt: Any, *, repair: bool = False) -> ReindexReport:  # rt: loupe.runtime.Runtime
    report = ReindexReport()
    with rt.repo.session() as s:
        rows = s.execute(
            select(
                col(Image.id), col(Image.sha256), col(Image.state), col(Image.format), col(Image.error_code)
            )
        ).all()
    images = {int(i): (sha, state, fmt) for i, sha, state, fmt, _ in rows}
    known_missing = {
        int(i) for i, _, state, _, code in rows if state == ImageState.failed and code == "blob_missing"
    }
    report.checked_images = len(images)
    ready = {i for i, (_, st, _) in images.items() if st == ImageState.ready}

    stored: set[int] = set()
    for ids, _ in rt.vectors.iter_all(rt.collection, batch=4096):
        stored.update(int(i) for i in ids)
    report.missing_vectors = sorted(ready - stored)
    # A failed image is not searchable: a vector of it is as orphaned as one of a deleted image.
    failed = {i for i, (_, st, _) in images.items() if st == ImageState.failed}
    report.orphan_vectors = sorted(stored - (set(images) - failed))

    indexer = rt.ingest.text_indexer
    if indexer is not None:
        for ids, _ in rt.vectors.iter_all(indexer.collection, batch=4096):
            report.orphan_text_chunks += [int(i) for i in ids if int(i) // CHUNK_SLOTS not in images]

    shas = {sha: i for i, (sha, _, fmt) in images.items() if fmt != "VECTOR"}
    for sha, i in shas.items():
        if not rt.blobs.has_original(sha):
            if i not in known_missing:
                report.missing_originals.append(i)
        elif i in ready and not rt.blobs.thumbnail_path(sha).exists():
            report.missing_thumbnails.append(i)
    report.orphan_files = sorted(sha for sha in rt.blobs.iter_originals() if sha not in shas)

    mirror_ids = (
        set(
            rt.mirror.search_subset(
                np.zeros(rt.clip.dim, np.float32), len(ready) + 1, np.fromiter(ready, np.int64)
            )[0].tolist()
        )
        if ready
        else set()
    )
    report.mirror_mismatch = rt.mirror.live_count != len(stored) or mirror_ids != (ready & stored)

    if repair and not report.clean:
        _repair(rt, report, images)
        report.repaired = True
    return report


def _repair(rt: Any, report: ReindexReport, images: dict[int, tuple[str, str, str]]) -> None:
    now = utcnow()
    with rt.repo.session() as s:
        if report.missing_vectors:
            s.execute(
                update(Image)
                .where(col(Image.id).in_(report.missing_vectors))
                .values(
                    state=ImageState.pending,
                    attempts=0,
                    next_attempt_at=None,
                    claimed_at=None,
                    updated_at=now,
                )
            )
        if report.missing_originals:
            s.execute(
                update(Image)
                .where(col(Image.id).in_(report.missing_originals))
                .values(
                    state=ImageState.failed,
                    error_code="blob_missing",
                    error_message="the stored original is missing",
                    updated_at=now,
                )
            )
        s.commit()
    dead = sorted(set(report.orphan_vectors) | set(report.missing_originals))
    if dead:
        rt.vectors.delete(rt.collection, dead)
    if report.orphan_text_chunks and rt.ingest.text_indexer is not None:
        rt.vectors.delete(rt.ingest.text_indexer.collection, report.orphan_text_chunks)
    for sha in report.orphan_files:
        rt.blobs.delete(sha)
    settings = rt.settings.ingest
    for i in report.missing_thumbnails:
        sha = images[i][0]
        rgb = decode_rgb(
            rt.blobs.read_original(sha), max_pixels=settings.max_pixels, min_side=settings.thumbnail_px
        )
        rt.blobs.put_thumbnail(
            sha,
            make_thumbnail(rgb, settings.thumbnail_px, settings.thumbnail_quality, settings.thumbnail_format),
        )
    rt.mirror.rebuild(rt.repo, rt.vectors)
    if report.missing_vectors:
        rt.ingest.work_available.set()
