"""A Qdrant server or cluster through qdrant-client (LOUPE_QDRANT_URL).

In tests qdrant-client's local mode (`QdrantClient(location=":memory:")` or `path=`) stands in for the server
protocol; it is brute-force Python and never the embedded store.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from loupe.errors import Unavailable
from loupe.storage.vectors.base import QFilter, VectorHit, as_matrix, records_to_arrays, vector_of


def _unavailable_when_unreachable(cls: type) -> type:
    """Every public method: a server that cannot be reached (or answers 5xx) becomes Unavailable (503), so the
    read path can fall back to the mirror and the write path can queue and retry."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ResponseHandlingException as exc:
                raise Unavailable(
                    "the Qdrant server cannot be reached", code="vector_store_unavailable"
                ) from exc
            except UnexpectedResponse as exc:
                if (exc.status_code or 0) >= 500:
                    raise Unavailable(
                        f"the Qdrant server answered {exc.status_code}", code="vector_store_unavailable"
                    ) from exc
                raise

        return inner

    for name, member in list(vars(cls).items()):
        if callable(member) and not name.startswith("_") and name != "connect":
            setattr(cls, name, wrap(member))
    return cls


@_unavailable_when_unreachable
class QdrantServerVectorStore:
    kind = "qdrant-server"

    def __init__(
        self, client: QdrantClient, *, replication_factor: int | None = None, shards: int | None = None
    ) -> None:
        self.client = client
        self._known: set[str] = set()
        self._replication = replication_factor
        self._shards = shards

    @classmethod
    def connect(cls, url: str, api_key: str | None = None, timeout: float = 10.0) -> QdrantServerVectorStore:
        # No version probe at start: a server that is down must not stop Loupe from starting (it serves from the
        # mirror and catches up); errors surface per call as Unavailable.
        return cls(QdrantClient(url=url, api_key=api_key, timeout=int(timeout), check_compatibility=False))

    def ensure_collection(self, name: str, dim: int, *, graph: bool = True) -> None:
        if name in self._known:
            return
        if not self.client.collection_exists(name):
            self.client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                hnsw_config=None if graph else models.HnswConfigDiff(m=0),
                replication_factor=self._replication,
                shard_number=self._shards,
            )
        self._known.add(name)

    def has_collection(self, name: str) -> bool:
        return name in self._known or bool(self.client.collection_exists(name))

    def drop_collection(self, name: str) -> None:
        self.client.delete_collection(name)
        self._known.discard(name)

    def upsert(
        self,
        name: str,
        ids: Sequence[int],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if len(ids) == 0:
            return
        mat = as_matrix(vectors, vectors.shape[1])
        points = [
            models.PointStruct(
                id=int(i), vector=mat[k].tolist(), payload=dict(payloads[k]) if payloads else None
            )
            for k, i in enumerate(ids)
        ]
        self.client.upsert(name, points=points, wait=True)

    def delete(self, name: str, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            return
        self.client.delete(name, points_selector=models.PointIdsList(points=[int(i) for i in ids]), wait=True)

    def search(
        self, name: str, vector: np.ndarray, limit: int, filter: QFilter | None = None
    ) -> list[VectorHit]:
        res = self.client.query_points(
            name,
            query=np.asarray(vector, dtype=np.float32).tolist(),
            limit=limit,
            with_payload=False,
            query_filter=client_filter(filter) if filter else None,
        )
        return [VectorHit(int(p.id), float(p.score)) for p in res.points]

    def retrieve(self, name: str, ids: Sequence[int]) -> dict[int, np.ndarray]:
        if len(ids) == 0:
            return {}
        records = self.client.retrieve(name, ids=[int(i) for i in ids], with_payload=False, with_vectors=True)
        return {int(r.id): np.asarray(vector_of(r.vector), dtype=np.float32) for r in records}

    def iter_all(self, name: str, batch: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offset: Any = None
        while True:
            records, offset = self.client.scroll(
                name, offset=offset, limit=batch, with_payload=False, with_vectors=True
            )
            if records:
                yield records_to_arrays(records)
            if offset is None:
                return

    def count(self, name: str) -> int:
        return int(self.client.count(name, exact=True).count)

    def set_payload(self, name: str, ids: Sequence[int], payload: Mapping[str, Any]) -> None:
        if len(ids):
            self.client.overwrite_payload(
                name, payload=dict(payload), points=[int(i) for i in ids], wait=True
            )

    def uncompacted_count(self, name: str) -> int | None:
        return None  # the Qdrant server's own optimizer manages its segments

    def create_payload_indexes(self, name: str, specs: Sequence[tuple[str, str]]) -> None:
        if getattr(self.client, "_client", None).__class__.__name__ == "QdrantLocal":
            return  # local mode has no payload indexes (and says so in a warning); a server builds them
        existing = set((self.client.get_collection(name).payload_schema or {}).keys())
        for key, kind in specs:
            if key not in existing:
                self.client.create_payload_index(name, field_name=key, field_schema=_SCHEMA[kind], wait=True)

    def filtered_ids(self, name: str, filter: QFilter) -> set[int]:
        out: set[int] = set()
        offset: Any = None
        while True:
            records, offset = self.client.scroll(
                name,
                scroll_filter=client_filter(filter),
                offset=offset,
                limit=1024,
                with_payload=False,
                with_vectors=False,
            )
            out.update(int(r.id) for r in records)
            if offset is None:
                return out

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.client.close()


_SCHEMA = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
    "geo": models.PayloadSchemaType.GEO,
}


def _client_condition(c: tuple[Any, ...]) -> Any:
    kind = c[0]
    if kind == "any":
        return models.FieldCondition(key=c[1], match=models.MatchAny(any=list(c[2])))
    if kind == "eq":
        return models.FieldCondition(key=c[1], match=models.MatchValue(value=c[2]))
    if kind == "range":
        return models.FieldCondition(key=c[1], range=models.Range(gte=c[2], lte=c[3]))
    if kind == "radius":
        return models.FieldCondition(
            key=c[1], geo_radius=models.GeoRadius(center=models.GeoPoint(lat=c[2], lon=c[3]), radius=c[4])
        )
    if kind == "box":
        _, key, min_lat, min_lon, max_lat, max_lon = c
        return models.FieldCondition(
            key=key,
            geo_bounding_box=models.GeoBoundingBox(
                top_left=models.GeoPoint(lat=max_lat, lon=min_lon),
                bottom_right=models.GeoPoint(lat=min_lat, lon=max_lon),
            ),
        )
    if kind == "filter":
        return client_filter(c[1])
    raise ValueError(f"unknown condition {kind!r}")


def client_filter(tree: QFilter) -> models.Filter:
    def conv(key: str) -> list[Any] | None:
        items = tree.get(key)
        return [_client_condition(c) for c in items] if items else None

    return models.Filter(must=conv("must"), should=conv("should"), must_not=conv("must_not"))
