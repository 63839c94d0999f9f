"""The VectorStore Protocol: what Loupe needs of Qdrant, embedded (Edge) or a server (qdrant-client).

Both implementations are held to one contract test suite (tests/integration/test_vector_store_contract.py).
Vectors are float32 and L2-normalized by the caller (loupe.models.vectors.normalize); scores are cosine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class VectorHit:
    id: int
    score: float


# A filter in the neutral form loupe.search.filters.to_qdrant produces; each store converts it.
QFilter = dict[str, list[Any]]


class VectorStore(Protocol):
    kind: str

    def ensure_collection(self, name: str, dim: int, *, graph: bool = True) -> None:
        """Create or open a collection. graph=False: Qdrant builds no HNSW graph for it (the FAISS mirror is
        what searches it)."""
        ...

    def has_collection(self, name: str) -> bool: ...

    def drop_collection(self, name: str) -> None: ...

    def upsert(
        self,
        name: str,
        ids: Sequence[int],
        vectors: np.ndarray,
        payloads: Sequence[Mapping[str, Any]] | None = None,
    ) -> None: ...

    def delete(self, name: str, ids: Sequence[int]) -> None: ...

    def search(
        self, name: str, vector: np.ndarray, limit: int, filter: QFilter | None = None
    ) -> list[VectorHit]: ...

    def set_payload(self, name: str, ids: Sequence[int], payload: Mapping[str, Any]) -> None:
        """Replace the payload of these points."""
        ...

    def create_payload_indexes(self, name: str, specs: Sequence[tuple[str, str]]) -> None: ...

    def uncompacted_count(self, name: str) -> int | None:
        """Points an embedded store holds on the heap until it next compacts; None where a server manages its own
        segments."""
        ...

    def filtered_ids(self, name: str, filter: QFilter) -> set[int]:
        """Every point id the filter selects (tests compare it with the SQL compilation)."""
        ...

    def retrieve(self, name: str, ids: Sequence[int]) -> dict[int, np.ndarray]: ...

    def iter_all(self, name: str, batch: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, vectors float32 n x d) in batches, every point of the collection."""
        ...

    def count(self, name: str) -> int: ...

    def close(self) -> None: ...


def vector_of(raw: Any) -> list[float]:
    """The default (unnamed) dense vector of a record, whichever way the client returns it."""
    if isinstance(raw, dict):
        raw = raw.get("", next(iter(raw.values())))
    return raw  # type: ignore[no-any-return]


def records_to_arrays(records: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, vectors float32) of retrieved or scrolled records (Qdrant Edge and qdrant-client alike)."""
    ids = np.fromiter((int(r.id) for r in records), dtype=np.int64, count=len(records))
    return ids, np.asarray([vector_of(r.vector) for r in records], dtype=np.float32)


def as_matrix(vectors: Sequence[Sequence[float]] | np.ndarray, dim: int) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {arr.shape}")
    return arr
