"""One contract, two VectorStores: Qdrant Edge (embedded) and qdrant-client against the server protocol
(its local mode stands in for a Qdrant server here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from loupe.storage.vectors.edge import EdgeVectorStore
from loupe.storage.vectors.server import QdrantServerVectorStore


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = (
        EdgeVectorStore(tmp_path / "edge")
        if request.param == "edge"
        else QdrantServerVectorStore(QdrantClient(location=":memory:"))
    )
    yield s
    s.close()


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("graph", [True, False])
def test_search_ranks_by_cosine_exactly_like_brute_force(store, graph):
    rng = np.random.default_rng(0)
    vecs = unit(rng, 300, 16)
    ids = list(range(1000, 1300))
    store.ensure_collection("c", 16, graph=graph)
    store.upsert("c", ids, vecs, [{"image_id": i} for i in ids])
    q = unit(rng, 1, 16)[0]
    hits = store.search("c", q, 10)
    expected = np.argsort(-(vecs @ q))[:10]
    assert [h.id for h in hits] == [ids[i] for i in expected]
    assert hits[0].score == pytest.approx(float(vecs[expected[0]] @ q), abs=1e-5)


def test_upsert_replaces_retrieve_returns_vectors_and_delete_removes(store):
    store.ensure_collection("c", 4)
    eye = np.eye(4, dtype=np.float32)
    store.upsert("c", [1, 2, 3], eye[:3])
    store.upsert("c", [2], eye[3:4])  # same id again: replaced, not duplicated
    assert store.count("c") == 3
    got = store.retrieve("c", [2, 99])
    assert set(got) == {2} and np.allclose(got[2], eye[3])
    store.delete("c", [1])
    assert store.count("c") == 2
    assert 1 not in {h.id for h in store.search("c", eye[0], 10)}


def test_iter_all_pages_through_every_point(store):
    rng = np.random.default_rng(1)
    store.ensure_collection("c", 8)
    ids = list(range(1, 2501))
    store.upsert("c", ids, unit(rng, len(ids), 8))
    seen = []
    for batch_ids, batch_vecs in store.iter_all("c", batch=700):
        assert batch_vecs.shape == (len(batch_ids), 8)
        seen.extend(batch_ids.tolist())
    assert sorted(seen) == ids


def test_collections_are_separate_and_can_be_dropped(store):
    store.ensure_collection("a", 4)
    store.ensure_collection("b", 4)
    store.upsert("a", [1], np.eye(4, dtype=np.float32)[:1])
    assert store.count("b") == 0 and store.has_collection("a")
    store.drop_collection("a")
    assert not store.has_collection("a")


def test_edge_store_survives_a_reopen(tmp_path: Path):
    s = EdgeVectorStore(tmp_path / "edge")
    s.ensure_collection("c", 4)
    s.upsert("c", [7, 8], np.eye(4, dtype=np.float32)[:2])
    s.close()
    s2 = EdgeVectorStore(tmp_path / "edge")
    s2.ensure_collection("c", 4)
    assert s2.count("c") == 2 and set(s2.retrieve("c", [7, 8])) == {7, 8}
    s2.close()


def test_edge_keeps_vectors_on_disk_also_for_collections_made_before(tmp_path: Path):
    """Qdrant Edge's vectors are memory-mapped, not read into RAM at load (the FAISS mirror answers searches). A
    collection created without the setting gets it written into its config when Loupe opens it, so its future
    segments follow; its points stay readable."""
    import json

    from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams

    rng = np.random.default_rng(5)
    store = EdgeVectorStore(tmp_path / "edge")
    store.ensure_collection("new", 8)
    store.close()
    config = json.loads((tmp_path / "edge" / "new" / "edge_config.json").read_text())
    assert config["vectors"][""]["on_disk"] is True

    old = tmp_path / "edge" / "old"
    old.mkdir()
    EdgeShard.create(str(old), EdgeConfig(vectors=EdgeVectorParams(size=8, distance=Distance.Cosine))).close()
    assert json.loads((old / "edge_config.json").read_text())["vectors"][""].get("on_disk") in (None, False)
    store = EdgeVectorStore(tmp_path / "edge")
    try:
        store.ensure_collection("old", 8)
        vecs = unit(rng, 5, 8)
        store.upsert("old", [1, 2, 3, 4, 5], vecs)
        assert json.loads((old / "edge_config.json").read_text())["vectors"][""]["on_disk"] is True
        assert np.allclose(store.retrieve("old", [3])[3], vecs[2], atol=1e-6)
    finally:
        store.close()


def _segment_configs(shard_dir: Path) -> list[dict]:
    import json

    return [
        json.loads((seg / "segment.json").read_text())["config"] for seg in (shard_dir / "segments").iterdir()
    ]


# graph=False: the mirrored clip collection; True: the OCR one, which Qdrant searches.
@pytest.mark.parametrize("graph", [False, True])
def test_edge_compacts_loose_points_into_memory_mapped_segments_at_open(tmp_path: Path, graph: bool):
    """Points in Edge's appendable segment are held on the heap; opening a shard with compact_min or more of them
    rewrites them into an immutable, memory-mapped segment. Nothing is lost or changed on the way: vectors,
    deletions, payload filters and exact ranking are the same after, and a shard made by an older Loupe (default
    memory placement, payload indexes in RAM) is compacted too."""
    import json

    from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams

    rng = np.random.default_rng(6)
    root = tmp_path / "edge"
    old = root / "c"
    old.mkdir(parents=True)
    EdgeShard.create(
        str(old), EdgeConfig(vectors=EdgeVectorParams(size=8, distance=Distance.Cosine, on_disk=True))
    ).close()
    n = 1200
    ids = list(range(1, n + 1))
    vecs = unit(rng, n, 8)
    store = EdgeVectorStore(root, compact_min=1000)
    store.ensure_collection("c", 8, graph=graph)  # below compact_min (empty): nothing to do
    store.create_payload_indexes("c", [("tags", "keyword"), ("image_id", "integer")])
    store.upsert("c", ids, vecs, [{"image_id": i, "tags": ["odd" if i % 2 else "even"]} for i in ids])
    store.delete("c", [2, 4, 6])
    assert store.uncompacted_count("c") >= 1000
    store.close()

    below = EdgeVectorStore(root, compact_min=5000)
    below.ensure_collection("c", 8, graph=graph)
    assert below.uncompacted_count("c") == below.count("c") == n - 3  # left as it was
    below.close()

    store = EdgeVectorStore(root, compact_min=1000)
    try:
        store.ensure_collection("c", 8, graph=graph)
        assert store.uncompacted_count("c") == 0
        assert store.count("c") == n - 3
        configs = _segment_configs(old)
        sealed = [c for c in configs if c["vector_data"][""]["index"]["type"] == "hnsw"]
        assert sealed and all(
            c["vector_data"][""]["index"]["options"]["m"] == (16 if graph else 0) for c in sealed
        )
        assert all(
            c["id_tracker_memory"] == "cold" and c["payload_storage_type"]["type"] == "mmap" for c in sealed
        )
        edge_json = json.loads((old / "edge_config.json").read_text())
        assert edge_json["payload_memory"] == "cold" and edge_json["hnsw_config"]["m"] == (16 if graph else 0)

        got = store.retrieve("c", [1, 2, 600, n])
        assert set(got) == {1, 600, n} and np.allclose(got[600], vecs[599], atol=1e-6)
        even = {i for i in ids if i % 2 == 0} - {2, 4, 6}
        assert store.filtered_ids("c", {"must": [("any", "tags", ["even"])]}) == even
        assert store.filtered_count("c", {"must": [("range", "image_id", 100, 199)]}) == 100
        q = unit(rng, 1, 8)[0]
        live = np.array([i for i in ids if i not in (2, 4, 6)])
        expected = live[np.argsort(-(vecs[live - 1] @ q))[:10]]
        assert [h.id for h in store.search("c", q, 10)] == expected.tolist()
        # New points go to a fresh appendable segment and are served from it.
        store.upsert("c", [n + 1], unit(rng, 1, 8))
        assert store.count("c") == n - 2 and store.uncompacted_count("c") == 1
    finally:
        store.close()


def test_edge_builds_its_own_graph_only_where_asked(tmp_path: Path):
    import json

    store = EdgeVectorStore(tmp_path / "edge", compact_min=0)
    try:
        store.ensure_collection("mirrored", 8, graph=False)
        store.ensure_collection("searched", 8)
    finally:
        store.close()

    def read(name: str) -> dict:
        return json.loads((tmp_path / "edge" / name / "edge_config.json").read_text())

    assert read("mirrored")["hnsw_config"]["m"] == 0
    assert read("searched")["hnsw_config"]["m"] == 16 and read("searched")["hnsw_config"]["memory"] == "cold"
