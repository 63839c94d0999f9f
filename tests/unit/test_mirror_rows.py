"""The mirror's row store on its own: append-only rows, tombstones, memory-mapped saves that append, compaction
that renumbers, id lookups through the sorted view plus the recent dict, and cached subsets. Every answer is
checked against brute force over what should be live."""

from __future__ import annotations

import json

import numpy as np

from loupe.config import IndexSettings
from loupe.index import faiss_mirror
from loupe.index.faiss_mirror import FaissMirror

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mirror(tmp_path, **kw) -> FaissMirror:
    settings = IndexSettings(exact_max=kw.pop("exact_max", 10**9), **kw)
    return FaissMirror(tmp_path / "m", collection="c", model_version_id=1, dim=DIM, settings=settings)


def brute(live: dict[int, np.ndarray], q: np.ndarray, k: int, among: set[int] | None = None) -> list[int]:
    ids = np.asarray(sorted(i for i in live if among is None or i in among), dtype=np.int64)
    if len(ids) == 0:
        return []
    scores = np.stack([live[int(i)] for i in ids]) @ q
    return ids[np.lexsort((ids, -scores))][:k].tolist()


def check(m: FaissMirror, live: dict[int, np.ndarray], rng: np.random.Generator) -> None:
    assert m.live_count == len(live)
    for q in unit(rng, 5):
        assert m.search(q, 7)[0].tolist() == brute(live, q, 7)
        among = (
            set(rng.choice(list(live), size=min(len(live), 40), replace=False).tolist()) if live else set()
        )
        picked = np.asarray(sorted(among | {10**9}), dtype=np.int64)  # an id the mirror never had
        assert m.search_subset(q, 5, picked)[0].tolist() == brute(live, q, 5, among)
        sub = m.subset(picked)
        assert m.search_subset(q, 5, sub)[0].tolist() == brute(live, q, 5, among)
    for i in list(live)[:20]:
        v = m.vector(i)
        assert v is not None and np.array_equal(v, live[i])


def test_rows_survive_upserts_deletes_saves_and_reloads(tmp_path):
    rng = np.random.default_rng(0)
    m = mirror(tmp_path, compact_ratio=0.5)
    live: dict[int, np.ndarray] = {}
    ids = np.arange(1, 301)
    vecs = unit(rng, 300)
    m.upsert(ids, vecs)
    live.update(zip(ids.tolist(), vecs, strict=True))
    check(m, live, rng)
    m.save()
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["format_version"] == 2
    assert (tmp_path / "m" / "vectors.f32").stat().st_size == 300 * DIM * 4
    # Re-upserted ids replace their vector (the old row becomes a tombstone), deletes mask.
    again = np.arange(50, 80)
    new = unit(rng, 30)
    m.upsert(again, new)
    live.update(zip(again.tolist(), new, strict=True))
    m.delete([5, 6, 7, 999])
    for i in (5, 6, 7):
        del live[i]
    more = unit(rng, 50)
    m.upsert(np.arange(301, 351), more)  # appended past the saved rows, in the in-memory tail
    live.update(zip(range(301, 351), more, strict=True))
    check(m, live, rng)
    m.save()  # few tombstones: appends the tail rows to vectors.f32, nothing rewritten
    assert (tmp_path / "m" / "vectors.f32").stat().st_size == (300 + 30 + 50) * DIM * 4
    check(m, live, rng)
    reloaded = mirror(tmp_path, compact_ratio=0.5)
    assert reloaded.load()
    check(reloaded, live, rng)
    assert reloaded.memory()["mapped_bytes"] == 380 * DIM * 4  # the vectors are file-backed, not in RAM


def test_a_scattered_subset_is_scored_exactly_chunk_by_chunk_across_saved_and_new_rows(tmp_path):
    """A filter's matches scored a cache-sized chunk at a time (_View.scores_of): a subset of several chunks that
    spans the memory-mapped rows and the in-memory tail, with re-upserted and deleted ids among them."""
    rng = np.random.default_rng(5)
    m = mirror(tmp_path)
    vecs = unit(rng, 4000)
    m.upsert(np.arange(4000), vecs)
    live = dict(zip(range(4000), vecs, strict=True))
    m.save()  # rows 0..3999 memory-mapped
    more = unit(rng, 1000)
    m.upsert(np.arange(4000, 5000), more)  # the tail
    live.update(zip(range(4000, 5000), more, strict=True))
    again = unit(rng, 100)
    # Re-upserted: the old rows are tombstones, the new ones in the tail.
    m.upsert(np.arange(0, 200, 2), again)
    live.update(zip(range(0, 200, 2), again, strict=True))
    m.delete(list(range(1, 200, 4)))
    for i in range(1, 200, 4):
        del live[i]
    among = set(rng.choice(5000, 1100, replace=False).tolist()) | set(range(200))
    picked = np.asarray(sorted(among), dtype=np.int64)
    sub = m.subset(picked)
    # Several chunks, and under the share at which search_subset scores every row instead.
    assert faiss_mirror._SCORE_CHUNK < len(sub.rows) < m.live_count // 4
    for q in unit(rng, 4):
        ids, scores = m.search_subset(q, 60, sub)
        assert ids.tolist() == brute(live, q, 60, among)
        assert np.allclose(scores, np.stack([live[int(i)] for i in ids]) @ q, atol=1e-6)


def test_compaction_renumbers_rows_and_keeps_answers(tmp_path):
    rng = np.random.default_rng(1)
    m = mirror(tmp_path, compact_ratio=0.2)
    vecs = unit(rng, 500)
    m.upsert(np.arange(500), vecs)
    live = dict(zip(range(500), vecs, strict=True))
    m.save()
    gone = rng.choice(500, 200, replace=False).tolist()
    m.delete(gone)
    for i in gone:
        del live[i]
    stale = m.subset(np.arange(500))  # made before the compaction: its rows are renumbered away
    m.save()  # 40% tombstones: a compacted file
    assert (tmp_path / "m" / "vectors.f32").stat().st_size == 300 * DIM * 4
    check(m, live, rng)
    q = unit(rng, 1)[0]
    assert m.search_subset(q, 10, stale)[0].tolist() == brute(live, q, 10)
    reloaded = mirror(tmp_path)
    assert reloaded.load()
    check(reloaded, live, rng)


def test_approximate_index_through_saves_compaction_and_masks(tmp_path):
    rng = np.random.default_rng(2)
    m = mirror(tmp_path, exact_max=1000, nlist=16, pq_m=4, nprobe=16, compact_ratio=0.1)
    vecs = unit(rng, 3000)
    m.upsert(np.arange(3000), vecs)
    live = dict(zip(range(3000), vecs, strict=True))
    assert m.maybe_go_approximate() and m.index_type.startswith("IVF")
    m.save()
    m.delete(list(range(0, 3000, 3)))  # a third: compacted at the next save, the index re-added
    for i in range(0, 3000, 3):
        del live[i]
    m.save()
    reloaded = mirror(tmp_path, exact_max=1000, nprobe=16)
    assert reloaded.load() and reloaded.index_type.startswith("IVF")
    for mm in (m, reloaded):
        among = set(range(1, 3000, 7)) & set(live)
        sub = mm.subset(np.asarray(sorted(among)))
        hits = 0
        for q in unit(rng, 20):
            got = mm.search_masked(q, 10, sub)[0].tolist()
            assert set(got) <= among  # never outside the mask, never a deleted id
            hits += len(set(got) & set(brute(live, q, 10, among)))
        assert hits / 200 >= 0.9
        # 60 results re-rank 600 candidates, more than one scoring chunk: each score is its id's exact one.
        assert 60 * mm.settings.rerank_factor > faiss_mirror._SCORE_CHUNK
        for q in unit(rng, 5):
            for ids, scores in (mm.search(q, 60), mm.search_masked(q, 60, sub)):
                assert len(ids) == 60 and np.all(np.diff(scores) <= 0)
                assert np.allclose(scores, np.stack([live[int(i)] for i in ids]) @ q, atol=1e-6)


def test_a_truncated_vectors_file_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    m = mirror(tmp_path)
    m.upsert(np.arange(100), unit(rng, 100))
    m.save()
    path = tmp_path / "m" / "vectors.f32"
    path.write_bytes(path.read_bytes()[: 50 * DIM * 4])
    fresh = mirror(tmp_path)
    assert not fresh.load() and fresh.live_count == 0


def test_rows_can_stay_in_ram(tmp_path):
    rng = np.random.default_rng(4)
    m = mirror(tmp_path, mmap_vectors=False)
    vecs = unit(rng, 64)
    m.upsert(np.arange(64), vecs)
    m.save()
    again = mirror(tmp_path, mmap_vectors=False)
    assert again.load() and again.memory()["mapped_bytes"] == 0
    check(again, dict(zip(range(64), vecs, strict=True)), rng)


def test_a_long_run_of_upserts_folds_the_recent_dict_into_the_sorted_view(tmp_path):
    rng = np.random.default_rng(5)
    m = mirror(tmp_path)
    live: dict[int, np.ndarray] = {}
    for start in range(0, 70_000, 5_000):  # past 65,536 rows added since the last sort
        ids = np.arange(start, start + 5_000) * 3
        v = unit(rng, len(ids))
        m.upsert(ids, v)
        live.update(zip(ids.tolist(), v, strict=True))
    assert len(m._recent) < 65_536
    v = unit(rng, 3)
    m.upsert(np.asarray([3, 3, 6]), v)  # the same id twice in one batch: the last vector wins
    live[3], live[6] = v[1], v[2]
    m.delete([9])
    del live[9]
    check(m, live, rng)


def test_a_configured_factory_is_used_as_it_is_and_its_recall_reported(tmp_path):
    rng = np.random.default_rng(6)
    m = mirror(tmp_path, exact_max=500, nlist=8, pq_m=4, factory="IVF{nlist},SQ8")
    m.upsert(np.arange(2000), unit(rng, 2000))
    assert m.maybe_go_approximate()
    params = m.stats()["params"]
    assert m.index_type == "IVF8,SQ8" and list(params["tried"]) == ["IVF8,SQ8"]
    assert 0.9 <= params["recall@10"] <= 1.0
