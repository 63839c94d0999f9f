"""Qdrant Edge (qdrant-edge-py): Qdrant's engine in-process. One shard directory per collection.

WAL-backed: an update returns once it is in the write-ahead log, so a killed process loses nothing it acknowledged.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_edge import (
    Distance,
    EdgeConfig,
    EdgeShard,
    EdgeVectorParams,
    Point,
    Query,
    QueryRequest,
    ScrollRequest,
    UpdateOperation,
)

from loupe.storage.vectors.base import VectorHit, as_matrix, records_to_arrays, vector_of

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class EdgeVectorStore:
    kind = "qdrant-edge"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, EdgeShard] = {}
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"bad collection name {name!r}")
        return self.root / name

    def _shard(self, name: str) -> EdgeShard:
        shard = self._shards.get(name)
        if shard is None:
            with self._lock:
                shard = self._shards.get(name)
                if shard is None:
                    path = self._path(name)
                    if not path.exists():
                        raise KeyError(f"collection {name!r} does not exist")
                    shard = EdgeShard.load(str(path))
                    self._shards[name] = shard
        return shard

    def ensure_collection(self, name: str, dim: int) -> None:
        with self._lock:
            if name in self._shards:
                return
            path = self._path(name)
            config = EdgeConfig(vectors=EdgeVectorParams(size=dim, distance=Distance.Cosine))
            if path.exists() and any(path.iterdir()):
                shard = EdgeShard.load(str(path))
            else:
                shard = EdgeShard.create(str(path), config)
            self._shards[name] = shard
            self._dims[name] = dim

    def has_collection(self, name: str) -> bool:
        return name in self._shards or (self._path(name).exists() and any(self._path(name).iterdir()))

    def drop_collection(self, name: str) -> None:
        with self._lock:
            shard = self._shards.pop(name, None)
            if shard is not None:
                shard.close()
            shutil.rmtree(self._path(name), ignore_errors=True)

    def upsert(
        self,
        name: str,
        ids: Sequence[int],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if len(ids) == 0:
            return
        shard = self._shard(name)
        mat = as_matrix(vectors, vectors.shape[1])
        points = [
            Point(int(i), mat[k].tolist(), dict(payloads[k]) if payloads else None) for k, i in enumerate(ids)
        ]
        shard.update(UpdateOperation.upsert_points(points))

    def delete(self, name: str, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            return
        self._shard(name).update(UpdateOperation.delete_points([int(i) for i in ids]))

    def search(self, name: str, vector: np.ndarray, limit: int) -> list[VectorHit]:
        res = self._shard(name).query(
            QueryRequest(
                limit=limit,
                query=Query.Nearest(np.asarray(vector, dtype=np.float32).tolist()),
                with_payload=False,
                with_vector=False,
            )
        )
        return [VectorHit(int(p.id), float(p.score)) for p in res]

    def retrieve(self, name: str, ids: Sequence[int]) -> dict[int, np.ndarray]:
        if len(ids) == 0:
            return {}
        records = self._shard(name).retrieve([int(i) for i in ids], with_payload=False, with_vector=True)
        return {int(r.id): np.asarray(vector_of(r.vector), dtype=np.float32) for r in records}

    def iter_all(self, name: str, batch: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        shard = self._shard(name)
        offset: Any = None
        while True:
            records, offset = shard.scroll(
                ScrollRequest(offset=offset, limit=batch, with_payload=False, with_vector=True)
            )
            if records:
                yield records_to_arrays(records)
            if offset is None:
                return

    def count(self, name: str) -> int:
        return int(self._shard(name).info().points_count)

    def flush(self) -> None:
        for shard in list(self._shards.values()):
            shard.flush()

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
