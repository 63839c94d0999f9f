"""A Qdrant server or cluster through qdrant-client (LOUPE_QDRANT_URL).

In tests qdrant-client's local mode (`QdrantClient(location=":memory:")` or `path=`) stands in for the server
protocol; it is brute-force Python and never the embedded store.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models

from loupe.storage.vectors.base import VectorHit, as_matrix, records_to_arrays, vector_of


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
        return cls(QdrantClient(url=url, api_key=api_key, timeout=int(timeout)))

    def ensure_collection(self, name: str, dim: int) -> None:
        if name in self._known:
            return
        if not self.client.collection_exists(name):
            self.client.create_collection(
                name,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
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

    def search(self, name: str, vector: np.ndarray, limit: int) -> list[VectorHit]:
        res = self.client.query_points(
            name, query=np.asarray(vector, dtype=np.float32).tolist(), limit=limit, with_payload=False
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

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self.client.close()
