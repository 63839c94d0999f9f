"""Qdrant Edge (qdrant-edge-py): Qdrant's engine in-process. One shard directory per collection.

WAL-backed: an update returns once it is in the write-ahead log, so a killed process loses nothing it acknowledged.

Memory: new points land in an appendable segment whose id tracker, payload and payload indexes live on the heap
(about 1.3 KB per point measured at 100k, 512-d, with Loupe's payload). Qdrant's optimizer rewrites such a segment
into an immutable one whose every part is memory-mapped (`Memory.Cold`): 10 MB of heap for 1M points, measured.
Edge runs the optimizer only when asked and holds the GIL while it runs (a 60k-point pass stops every Python thread
for ~8 s on 2 cores), so a store compacts when it opens a shard, before serving, once enough points have gathered
(`compact_min`). A collection searched through the FAISS mirror gets no HNSW graph of its own (`graph=False`):
building one would cost minutes at 1M and nothing would read it.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_edge import (
    BoolIndexParams,
    CountRequest,
    Distance,
    EdgeConfig,
    EdgeOptimizersConfig,
    EdgeShard,
    EdgeVectorParams,
    FieldCondition,
    Filter,
    FloatIndexParams,
    GeoBoundingBox,
    GeoIndexParams,
    GeoPoint,
    GeoRadius,
    HnswIndexConfig,
    IntegerIndexParams,
    KeywordIndexParams,
    MatchAny,
    MatchValue,
    Memory,
    Point,
    Query,
    QueryRequest,
    RangeFloat,
    ScrollRequest,
    UpdateOperation,
)

from loupe.storage.vectors.base import QFilter, VectorHit, as_matrix, records_to_arrays, vector_of

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def edge_config(dim: int, graph: bool) -> EdgeConfig:
    """Vectors, payload, id tracker and HNSW graph memory-mapped; m=0 builds no graph."""
    return EdgeConfig(
        vectors=EdgeVectorParams(size=dim, distance=Distance.Cosine, on_disk=True),
        payload_memory=Memory.Cold,
        id_tracker_memory=Memory.Cold,
        hnsw_config=HnswIndexConfig(
            m=16 if graph else 0, ef_construct=100, full_scan_threshold=10_000, memory=Memory.Cold
        ),
        # Loupe decides when to compact (compact_min); the optimizer then seals whatever is loose, however small.
        optimizers=EdgeOptimizersConfig(indexing_threshold=1),
    )


class EdgeVectorStore:
    kind = "qdrant-edge"

    def __init__(self, root: Path, compact_min: int = 20_000) -> None:
        self.root = root
        self.compact_min = compact_min
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

    def ensure_collection(self, name: str, dim: int, *, graph: bool = True) -> None:
        with self._lock:
            if name in self._shards:
                return
            path = self._path(name)
            # Shards written before these settings take them on when the optimizer next rewrites a segment.
            config = edge_config(dim, graph)
            if path.exists() and any(path.iterdir()):
                shard = EdgeShard.load(str(path), config)
                self._compact(name, shard)
            else:
                shard = EdgeShard.create(str(path), config)
            self._shards[name] = shard
            self._dims[name] = dim

    @staticmethod
    def _loose(shard: EdgeShard) -> int:
        """Points in appendable segments (the optimizer counts every sealed point as indexed, graph or not)."""
        info = shard.info()
        return int(info.points_count) - int(info.indexed_vectors_count)

    def _compact(self, name: str, shard: EdgeShard) -> None:
        loose = self._loose(shard)
        if self.compact_min <= 0 or loose < self.compact_min:
            return
        log.warning(
            "compacting %d points of the embedded vector store %r into memory-mapped segments "
            "(once; about 10 s per 100k points on 2 cores, nothing else runs meanwhile)",
            loose,
            name,
        )
        t0 = time.perf_counter()
        shard.optimize()
        shard.flush()
        log.info("compacted %r in %.1f s", name, time.perf_counter() - t0)

    def uncompacted_count(self, name: str) -> int | None:
        """Points still in appendable segments, held on the heap until the next compaction."""
        return self._loose(self._shard(name))

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

    def search(
        self, name: str, vector: np.ndarray, limit: int, filter: QFilter | None = None
    ) -> list[VectorHit]:
        res = self._shard(name).query(
            QueryRequest(
                limit=limit,
                query=Query.Nearest(np.asarray(vector, dtype=np.float32).tolist()),
                with_payload=False,
                with_vector=False,
                filter=edge_filter(filter) if filter else None,
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

    def set_payload(self, name: str, ids: Sequence[int], payload: Mapping[str, Any]) -> None:
        if len(ids):
            self._shard(name).update(UpdateOperation.overwrite_payload([int(i) for i in ids], dict(payload)))

    def create_payload_indexes(self, name: str, specs: Sequence[tuple[str, str]]) -> None:
        shard = self._shard(name)
        existing = set(shard.info().payload_schema)
        for key, kind in specs:
            if key not in existing:
                shard.update(UpdateOperation.create_field_index(key, _SCHEMA[kind]))

    def filtered_ids(self, name: str, filter: QFilter) -> set[int]:
        shard = self._shard(name)
        out: set[int] = set()
        offset: Any = None
        while True:
            records, offset = shard.scroll(
                ScrollRequest(
                    offset=offset,
                    limit=1024,
                    filter=edge_filter(filter),
                    with_payload=False,
                    with_vector=False,
                )
            )
            out.update(int(r.id) for r in records)
            if offset is None:
                return out

    def filtered_count(self, name: str, filter: QFilter) -> int:
        return int(self._shard(name).count(CountRequest(exact=True, filter=edge_filter(filter))))

    def flush(self) -> None:
        for shard in list(self._shards.values()):
            shard.flush()

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()


# Payload indexes memory-mapped too (417 MB of heap at 1M when held in RAM).
_SCHEMA: dict[str, Any] = {
    "keyword": KeywordIndexParams(memory=Memory.Cold),
    "integer": IntegerIndexParams(lookup=True, range=True, memory=Memory.Cold),
    "float": FloatIndexParams(memory=Memory.Cold),
    "bool": BoolIndexParams(memory=Memory.Cold),
    "geo": GeoIndexParams(memory=Memory.Cold),
}


def _edge_condition(c: tuple[Any, ...]) -> Any:
    kind = c[0]
    if kind == "any":
        return FieldCondition(key=c[1], match=MatchAny(any=list(c[2])))
    if kind == "eq":
        return FieldCondition(key=c[1], match=MatchValue(value=c[2]))
    if kind == "range":
        return FieldCondition(key=c[1], range=RangeFloat(gte=c[2], lte=c[3]))
    if kind == "radius":
        return FieldCondition(
            key=c[1], geo_radius=GeoRadius(center=GeoPoint(lon=c[3], lat=c[2]), radius=c[4])
        )
    if kind == "box":
        _, key, min_lat, min_lon, max_lat, max_lon = c
        return FieldCondition(
            key=key,
            geo_bounding_box=GeoBoundingBox(
                top_left=GeoPoint(lon=min_lon, lat=max_lat), bottom_right=GeoPoint(lon=max_lon, lat=min_lat)
            ),
        )
    if kind == "filter":
        return edge_filter(c[1])
    raise ValueError(f"unknown condition {kind!r}")


def edge_filter(tree: QFilter) -> Filter:
    def conv(key: str) -> list[Any] | None:
        items = tree.get(key)
        return [_edge_condition(c) for c in items] if items else None

    return Filter(must=conv("must"), should=conv("should"), must_not=conv("must_not"))
