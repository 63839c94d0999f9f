"""The FAISS mirror over the real stores: exact while small, approximate (with exact re-ranking) past the
threshold, caught up by replaying the change log, rebuilt from Qdrant when its files are gone."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from loupe.config import IndexSettings
from loupe.index.faiss_mirror import FaissMirror


def clustered(n: int, d: int, seed: int, clusters: int = 50, intrinsic: int = 12) -> np.ndarray:
    """Anisotropic clusters (low intrinsic dimension), closer to real embeddings than isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(intrinsic, d))
    centres = rng.normal(size=(clusters, intrinsic)) * 3
    labels = rng.integers(0, clusters, n)
    x = (centres[labels] + rng.normal(size=(n, intrinsic))) @ basis + rng.normal(size=(n, d)) * 0.3
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    scores = vecs @ q
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist()


def test_exact_mirror_equals_brute_force(make_settings, runtime_factory):
    rt = runtime_factory(make_settings())
    vecs = clustered(3000, rt.clip.dim, seed=1)
    ids = np.asarray(rt.ingest.add_vectors(vecs))
    assert rt.mirror.index_type == "flat" and rt.mirror.live_count == 3000
    for q in clustered(20, rt.clip.dim, seed=2):
        got, scores = rt.mirror.search(q, 25)
        assert got.tolist() == exact_top(vecs, ids, q, 25)
        assert np.allclose(scores, np.sort(vecs @ q)[::-1][:25], atol=1e-5)


def test_approximate_index_past_the_threshold_keeps_recall(make_settings, runtime_factory):
    settings = make_settings()
    settings.index.exact_max = 5_000
    rt = runtime_factory(settings)
    n = 20_000
    vecs = clustered(n, rt.clip.dim, seed=3, clusters=200)
    ids = np.asarray(rt.ingest.add_vectors(vecs))
    assert rt.mirror.index_type.startswith("IVF"), rt.mirror.stats()
    queries = clustered(200, rt.clip.dim, seed=4, clusters=200)
    recall = np.mean(
        [
            len(set(rt.mirror.search(q, 10)[0].tolist()) & set(exact_top(vecs, ids, q, 10))) / 10
            for q in queries
        ]
    )
    print(f"IVF-PQ + exact re-rank recall@10 at {n} vectors: {recall:.3f} ({rt.mirror.stats()})")
    assert recall >= 0.95
    params = rt.mirror.stats()["params"]  # the recall measured at the build, on probe queries
    assert params["recall@10"] >= 0.95 and list(params["tried"]) == [rt.mirror.index_type]


def test_auto_index_choice_rejects_codes_that_fail_cross_distribution_queries(tmp_path):
    """These queries come from another distribution, as text queries do for image vectors. 4-bit fast-scan codes
    score 0.99 on the library's own vectors but under 0.5 on them; the probes turned away from the library's
    vectors see that, so `auto` moves on to a type that holds."""
    d, n = 64, 20_000
    vecs = clustered(n, d, seed=3, clusters=200)
    settings = IndexSettings(exact_max=5_000, factory="auto")
    mirror = FaissMirror(tmp_path / "m", collection="c", model_version_id=1, dim=d, settings=settings)
    mirror.upsert(np.arange(n), vecs)
    assert mirror.maybe_go_approximate()
    tried = mirror.stats()["params"]["tried"]
    assert tried["IVF512,PQ16x4fs"] < 0.6 and mirror.index_type != "IVF512,PQ16x4fs"
    assert tried[mirror.index_type] >= 0.95
    queries = clustered(200, d, seed=4, clusters=200)
    ids = np.arange(n)
    found = [len(set(mirror.search(q, 10)[0].tolist()) & set(exact_top(vecs, ids, q, 10))) for q in queries]
    assert np.mean(found) / 10 >= 0.95


def test_the_mirror_catches_up_by_replaying_the_change_log(make_settings, runtime_factory):
    rt = runtime_factory(make_settings())
    first = rt.ingest.add_vectors(clustered(500, rt.clip.dim, seed=5))
    rt.mirror.save()
    saved_seq = rt.mirror.last_seq
    more = rt.ingest.add_vectors(clustered(300, rt.clip.dim, seed=6))
    rt.ingest.delete(first[0])
    # A second mirror on the same files starts from the saved manifest and replays what came after.
    fresh = FaissMirror(
        rt.mirror.directory,
        collection=rt.collection,
        model_version_id=rt.mirror.model_version_id,
        dim=rt.clip.dim,
        settings=rt.settings.index,
    )
    report = fresh.open(rt.repo, rt.vectors)
    assert not report.rebuilt and report.applied == 301 and fresh.last_seq > saved_seq
    assert fresh.live_count == 799 and fresh.vector(first[0]) is None and fresh.vector(more[-1]) is not None
    q = clustered(1, rt.clip.dim, seed=7)[0]
    assert fresh.search(q, 10)[0].tolist() == rt.mirror.search(q, 10)[0].tolist()


def test_lost_mirror_files_are_rebuilt_from_qdrant_with_the_same_answers(make_settings, runtime_factory):
    settings = make_settings()
    rt = runtime_factory(settings)
    ids = rt.ingest.add_vectors(clustered(800, rt.clip.dim, seed=8))
    rt.ingest.delete(ids[5])
    queries = clustered(10, rt.clip.dim, seed=9)
    before = [rt.mirror.search(q, 10)[0].tolist() for q in queries]
    mirror_dir = rt.mirror.directory
    rt.close()
    shutil.rmtree(mirror_dir)
    rt2 = runtime_factory(settings)
    assert rt2.mirror.live_count == 799
    assert [rt2.mirror.search(q, 10)[0].tolist() for q in queries] == before
    assert (mirror_dir / "manifest.json").exists()


def test_a_mirror_of_another_model_version_is_not_trusted(make_settings, runtime_factory):
    rt = runtime_factory(make_settings())
    rt.ingest.add_vectors(clustered(100, rt.clip.dim, seed=10))
    rt.mirror.save()
    other = FaissMirror(
        rt.mirror.directory,
        collection=rt.collection,
        model_version_id=999,
        dim=rt.clip.dim,
        settings=rt.settings.index,
    )
    assert other.load() is False


@pytest.mark.parametrize("corrupt", ["manifest", "vectors"])
def test_corrupt_mirror_files_lead_to_a_rebuild_not_a_crash(make_settings, runtime_factory, corrupt):
    settings = make_settings()
    rt = runtime_factory(settings)
    rt.ingest.add_vectors(clustered(200, rt.clip.dim, seed=11))
    mirror_dir = rt.mirror.directory
    rt.close()
    target = mirror_dir / ("manifest.json" if corrupt == "manifest" else "vectors.npy")
    target.write_bytes(b"garbage")
    rt2 = runtime_factory(settings)
    assert rt2.mirror.live_count == 200


def test_a_mirror_too_far_behind_is_rebuilt_instead_of_replayed(make_settings, runtime_factory):
    settings = make_settings()
    rt = runtime_factory(settings)
    rt.ingest.add_vectors(clustered(100, rt.clip.dim, seed=12))
    rt.mirror.save()
    rt.ingest.add_vectors(clustered(400, rt.clip.dim, seed=13))
    lagging = FaissMirror(
        rt.mirror.directory,
        collection=rt.collection,
        model_version_id=rt.mirror.model_version_id,
        dim=rt.clip.dim,
        settings=settings.index.model_copy(update={"rebuild_lag": 50}),
    )
    report = lagging.open(rt.repo, rt.vectors)
    assert report.rebuilt and lagging.live_count == 500 and lagging.last_seq == rt.repo.last_seq()
    q = clustered(1, rt.clip.dim, seed=14)[0]
    assert lagging.search(q, 10)[0].tolist() == rt.mirror.search(q, 10)[0].tolist()


@pytest.mark.parametrize("share", [0.001, 0.1, 0.25, 0.6, 1.0])
def test_subset_search_is_exact_at_every_share_with_deletions(tmp_path, share):
    from loupe.config import IndexSettings

    rng = np.random.default_rng(3)
    n, d = 4000, 32
    vecs = rng.normal(size=(n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(10, 10 + n, dtype=np.int64)
    mirror = FaissMirror(tmp_path, collection="c", model_version_id=1, dim=d, settings=IndexSettings())
    mirror.upsert(ids, vecs)
    mirror.delete(ids[:50])  # dead rows must never come back
    subset = np.sort(rng.choice(ids, max(1, int(n * share)), replace=False))
    q = vecs[7]
    got_ids, got_scores = mirror.search_subset(q, 25, subset)
    live = np.setdiff1d(subset, ids[:50])
    scores = vecs[live - 10] @ q
    order = np.lexsort((live, -scores))[:25]
    assert got_ids.tolist() == live[order].tolist()
    assert np.allclose(got_scores, scores[order], atol=1e-6)


def test_auto_nprobe_is_the_smallest_that_reaches_the_target_and_survives_a_reload(tmp_path):
    """nprobe 0 (the default) sweeps 8, 16, 32, ... at the build and keeps the first whose probe recall holds;
    the index searches with it, a reload keeps it, and a fixed setting still wins over it."""
    import faiss

    d, n = 64, 20_000
    vecs = clustered(n, d, seed=3, clusters=200)
    settings = IndexSettings(exact_max=5_000)
    assert settings.nprobe == 0
    mirror = FaissMirror(tmp_path / "m", collection="c", model_version_id=1, dim=d, settings=settings)
    mirror.upsert(np.arange(n), vecs)
    assert mirror.maybe_go_approximate()
    params = mirror.stats()["params"]
    sweep, chosen = params["by_nprobe"], params["nprobe"]
    print(f"auto nprobe on {params['nlist']} lists: {sweep} -> {chosen}")
    assert list(sweep) == [str(p) for p in (8, 16, 32, 64, 128, 256)][: len(sweep)]
    assert int(list(sweep)[-1]) == chosen < settings.nprobe_max and sweep[str(chosen)] >= 0.95
    assert faiss.extract_index_ivf(mirror._ann).nprobe == chosen
    # A filtered search among a tenth of the library probes ten times the lists, never more than there are.
    assert mirror.masked_nprobe(n) == chosen and mirror.masked_nprobe(n // 10) == min(
        10 * chosen, params["nlist"]
    )
    assert mirror.masked_nprobe(1) == params["nlist"]
    queries = clustered(200, d, seed=4, clusters=200)  # held out, from elsewhere, as text queries are
    ids = np.arange(n)
    found = [len(set(mirror.search(q, 10)[0].tolist()) & set(exact_top(vecs, ids, q, 10))) for q in queries]
    assert np.mean(found) / 10 >= 0.95
    mirror.save()
    again = FaissMirror(tmp_path / "m", collection="c", model_version_id=1, dim=d, settings=settings)
    assert again.load() and again.stats()["params"]["nprobe"] == chosen
    assert faiss.extract_index_ivf(again._ann).nprobe == chosen
    fixed = IndexSettings(exact_max=5_000, nprobe=chosen * 2)
    pinned = FaissMirror(tmp_path / "m", collection="c", model_version_id=1, dim=d, settings=fixed)
    assert pinned.load() and faiss.extract_index_ivf(pinned._ann).nprobe == chosen * 2
