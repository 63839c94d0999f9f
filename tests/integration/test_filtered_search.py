"""Filters applied inside the search: the true best matches among the matching images at every selectivity,
on SQLite and PostgreSQL, through the real search path; and the SQL and Qdrant compilations select the same ids.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from loupe.config import Settings
from loupe.runtime import Runtime
from loupe.search.filters import Filter, ready_and, to_qdrant
from loupe.search.query import SearchRequest, Term
from tests.conftest import _pg_create_database

N = 10_000
CAMERAS = [("FUJIFILM", "X100V"), ("Canon", "EOS R5"), ("SONY", "ILCE-7M3"), ("Apple", "iPhone 13")]
PLACES = [(38.72, -9.14), (48.86, 2.35), (40.71, -74.0), (-33.87, 151.21)]


def library_meta(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    metas = []
    base = datetime(2015, 1, 1, tzinfo=UTC)
    for i in range(n):
        tags = []
        # Nested tag groups give selectivities 0.01%, 0.1%, 1%, 10%, 50% exactly.
        if i % 10_000 == 7:
            tags.append("one-in-10000")
        if i % 1000 == 7:
            tags.append("one-in-1000")
        if i % 100 == 7:
            tags.append("one-in-100")
        if i % 10 == 7:
            tags.append("one-in-10")
        if i % 2 == 1:
            tags.append("half")
        tags.append(rng.choice(["family", "work", "travel", "food"]))
        make, model = rng.choice(CAMERAS)
        lat, lon = rng.choice(PLACES)
        w, h = rng.choice([(4000, 3000), (3000, 4000), (1920, 1080), (1080, 1080)])
        metas.append(
            {
                "tags": tags,
                "albums": [rng.choice(["Lisbon 2019", "Paris", "Home"])] if rng.random() < 0.6 else [],
                "taken_at": base + timedelta(days=rng.randint(0, 9 * 365), seconds=rng.randint(0, 86_399)),
                "camera_make": make,
                "camera_model": model,
                "gps_lat": lat + rng.uniform(-0.05, 0.05) if rng.random() < 0.7 else None,
                "gps_lon": lon + rng.uniform(-0.05, 0.05),
                "rating": rng.choice([None, 1, 2, 3, 4, 5]),
                "starred": rng.random() < 0.1,
                "width": w,
                "height": h,
                "format": rng.choice(["JPEG", "PNG", "WEBP"]),
            }
        )
    for m in metas:
        if m["gps_lat"] is None:
            m["gps_lon"] = None
    return metas


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, d))
    centres = rng.normal(size=(100, 16)) * 3
    x = (centres[rng.integers(0, 100, n)] + rng.normal(size=(n, 16))) @ basis + rng.normal(size=(n, d)) * 0.3
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Lib:
    def __init__(self, rt: Runtime, vecs: np.ndarray, ids: np.ndarray) -> None:
        self.rt, self.vecs, self.ids = rt, vecs, ids
        self.row = {int(i): k for k, i in enumerate(ids)}

    def matching(self, flt: Filter) -> np.ndarray:
        return self.rt.repo.ids_where(ready_and(flt))

    def brute_top(self, q: np.ndarray, allowed: np.ndarray, k: int) -> list[int]:
        rows = np.array([self.row[int(i)] for i in allowed])
        scores = self.vecs[rows] @ q
        order = np.lexsort((allowed, -scores))[:k]
        return allowed[order].tolist()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def lib(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir
) -> Iterator[Lib]:
    db_url, drop = None, None
    if request.param == "postgres":
        db_url, drop = _pg_create_database(request.getfixturevalue("pg_admin_url"))
    settings = Settings(
        data_dir=tmp_path_factory.mktemp(f"filters-{request.param}"),
        clip_model=str(tiny_clip_dir),
        database_url=db_url,
        ocr={"enabled": False},  # type: ignore[arg-type]
        index={"exact_max": 2_000},  # type: ignore[arg-type]  (the approximate index serves 10k vectors)
        search={"exact_scan_max": 500},  # type: ignore[arg-type]  (larger matches go through the masked ANN path)
    )
    rt = Runtime.open(settings)
    try:
        vecs = clustered(N, rt.clip.dim, seed=1)
        ids = np.asarray(rt.ingest.add_vectors(vecs, meta=library_meta(N, seed=2)))
        assert rt.mirror.index_type.startswith("IVF")
        yield Lib(rt, vecs, ids)
    finally:
        rt.close()
        if drop:
            drop()


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("one-in-10000", 1),
        ("one-in-1000", 10),
        ("one-in-100", 100),
        ("one-in-10", 1000),
        ("half", 5000),
        (None, N),
    ],
)
def test_filtered_results_are_the_true_best_matches_at_every_selectivity(
    lib: Lib, tag: str | None, expected: int
):
    flt = Filter.model_validate({"tags": {"any": [tag]}}) if tag else None
    allowed = lib.matching(flt) if flt else lib.ids
    assert len(allowed) == expected
    queries = clustered(40, lib.rt.clip.dim, seed=3)
    recalls = []
    strategy = None
    for q in queries:
        req = SearchRequest(query=[Term(vector=q.tolist())], limit=10, filters=flt)
        res = lib.rt.search.search(req)
        got = [h.id for h in res.hits]
        truth = lib.brute_top(q, allowed, 10)
        assert set(got) <= set(allowed.tolist()), "a hit outside the filter"
        recalls.append(len(set(got) & set(truth)) / len(truth))
        strategy = (res.plan.get("filter") or {}).get("strategy")
    recall = float(np.mean(recalls))
    print(f"\nselectivity {expected / N:.4%}: recall@10 {recall:.3f} via {strategy or 'unfiltered ANN'}")
    if strategy == "exact-scan":
        assert recall == 1.0
    assert recall >= 0.95


FILTERS = [
    {"tags": {"any": ["family", "food"]}},
    {"tags": {"all": ["half", "one-in-10"]}},
    {"tags": {"none": ["work"]}, "albums": {"any": ["Paris"]}},
    {"taken": {"from": "2019-01-01", "to": "2019-12-31"}},
    {"taken": {"from": "2021-06-01T12:00:00Z"}},
    {"width": {"min": 3000}, "aspect": {"max": 1.0}},
    {"format": ["png", "webp"]},
    {"camera": {"model": "x100v"}},
    {"camera": {"make": "canon"}, "rating": {"min": 4}},
    {"starred": True},
    {"near": {"lat": 38.72, "lon": -9.14, "radius_m": 4000}},
    {"box": {"min_lat": 48.0, "min_lon": 2.0, "max_lat": 49.0, "max_lon": 3.0}},
    {"or": [{"albums": {"any": ["Lisbon 2019"]}}, {"near": {"lat": 40.71, "lon": -74.0, "radius_m": 3000}}]},
    {"not": {"tags": {"any": ["half"]}}, "taken": {"to": "2016-12-31"}},
    {"and": [{"tags": {"any": ["travel"]}}, {"not": {"camera": {"model": "EOS R5"}}}], "rating": {"max": 2}},
]


@pytest.mark.parametrize("raw", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_sql_and_qdrant_compilations_select_the_same_ids(lib: Lib, raw: dict):
    flt = Filter.model_validate(raw)
    sql_ids = set(lib.matching(flt).tolist())
    qdrant_ids = lib.rt.vectors.filtered_ids(lib.rt.collection, to_qdrant(flt))
    assert sql_ids, f"the filter {raw} selects nothing: a weak test"
    assert sql_ids == qdrant_ids, (len(sql_ids), len(qdrant_ids))


def test_edits_reach_the_payload_and_the_filters(lib: Lib):
    some = [int(i) for i in lib.ids[:5]]
    lib.rt.ingest.edit(some, {"add_tags": ["picked"], "rating": 5, "starred": True})
    flt = Filter.model_validate({"tags": {"all": ["picked"]}, "rating": {"min": 5}, "starred": True})
    assert set(lib.matching(flt).tolist()) == set(some)
    assert lib.rt.vectors.filtered_ids(lib.rt.collection, to_qdrant(flt)) == set(some)


def test_a_cached_filter_follows_edits_and_deletes(lib: Lib):
    flt = {"tags": {"any": ["cache-probe"]}}
    limits = iter(range(50, 10, -1))  # a new page size each time: the whole-response cache never answers

    def found() -> tuple[set[int], bool]:
        req = SearchRequest(query=[Term(vector=lib.vecs[0].tolist())], filters=flt, limit=next(limits))
        res = lib.rt.search.search(req)
        assert "result_cache" not in res.plan
        return {h.id for h in res.hits}, res.plan["filter"]["cached"]

    assert found() == (set(), False)
    assert found() == (set(), True)  # the matching ids came from the cache
    picked = [int(i) for i in lib.ids[100:103]]
    lib.rt.ingest.edit(picked, {"add_tags": ["cache-probe"]})
    assert found() == (set(picked), False)  # the edit's commit invalidated it
    assert found() == (set(picked), True)
    lib.rt.ingest.delete(picked[0])
    assert found() == (set(picked[1:]), False)


def test_a_filter_slower_than_its_ttl_is_still_cached_where_no_other_node_writes(lib: Lib):
    """At 1M pictures a broad filter's SQL took 2.5-6.5 s on a slow box, longer than the 5 s TTL counted from
    its start, so it was never cached and every search under it paid seconds. Where this process is the only
    writer (the embedded SQLite database under its locked data directory) the TTL does not apply; elsewhere
    (Postgres: other API nodes may write) it counts from the SQL's end."""
    svc = lib.rt.search
    assert svc.sole_writer == (lib.rt.settings.database_url is None)
    flt = {"tags": {"any": ["ttl-probe"]}}
    limits = iter(range(60, 10, -1))  # the whole-response cache never answers

    def cached() -> bool:
        req = SearchRequest(query=[Term(vector=lib.vecs[1].tolist())], filters=flt, limit=next(limits))
        return bool(svc.search(req).plan["filter"]["cached"])

    ttl = svc.settings.filter_cache_ttl_s
    try:
        svc.settings.filter_cache_ttl_s = 0.0  # every cached entry is older than the TTL
        assert cached() is False
        assert cached() is svc.sole_writer
        svc.settings.filter_cache_ttl_s = 60.0
        assert cached() is True  # within the TTL everywhere
        lib.rt.ingest.edit([int(lib.ids[7])], {"add_tags": ["ttl-probe"]})
        assert cached() is False  # this process's commit still invalidates it, sole writer or not
    finally:
        svc.settings.filter_cache_ttl_s = ttl


def test_repeated_searches_come_from_the_result_cache_until_anything_changes(lib: Lib):
    svc = lib.rt.search
    flt = {"tags": {"any": ["result-probe"]}}
    q = lib.vecs[5]
    picked = [int(i) for i in lib.ids[200:204]]
    lib.rt.ingest.edit(picked[:2], {"add_tags": ["result-probe"]})

    def ask(**kw) -> tuple[list[int], str | None]:
        req = SearchRequest(query=[Term(vector=q.tolist())], **({"filters": flt, "limit": 10} | kw))
        res = svc.search(req)
        return [h.id for h in res.hits], res.plan.get("result_cache")

    first, how = ask()
    assert sorted(first) == sorted(picked[:2]) and how is None
    assert ask() == (first, "hit")
    assert ask(limit=1)[1] is None  # another page size is another request
    lib.rt.ingest.edit(picked[2:], {"add_tags": ["result-probe"]})  # a database commit drops it
    again, how = ask()
    assert sorted(again) == sorted(picked) and how is None
    # A new vector reaching the mirror drops it too (here one next to the query, so it comes first).
    near = q + np.random.default_rng(0).normal(scale=1e-3, size=q.shape).astype(np.float32)
    (new_id,) = lib.rt.ingest.add_vectors(
        near[None, :] / np.linalg.norm(near), meta=[{"tags": ["result-probe"]}]
    )
    top, how = ask()
    assert top[0] == new_id and how is None
    lib.rt.ingest.delete(new_id)
    assert new_id not in ask()[0]
    unfiltered = SearchRequest(query=[Term(vector=q.tolist())], limit=5)
    a, b = svc.search(unfiltered), svc.search(unfiltered)
    assert [h.id for h in a.hits] == [h.id for h in b.hits] and b.plan["result_cache"] == "hit"
    assert b.next_cursor == a.next_cursor and b.timing_ms["total"] < a.timing_ms["total"]
    page2 = svc.search(unfiltered.model_copy(update={"cursor": a.next_cursor}))
    assert "result_cache" not in page2.plan and not {h.id for h in page2.hits} & {h.id for h in a.hits}
    stats = lib.rt.health()["caches"]["results"]
    assert stats["hits"] >= 2 and stats["misses"] >= 5 and stats["entries"] >= 1
    ttl = svc.settings.result_cache_ttl_s
    svc.settings.result_cache_ttl_s = 0.0  # trusted for no time: every request is computed
    try:
        assert "result_cache" not in svc.search(unfiltered).plan
    finally:
        svc.settings.result_cache_ttl_s = ttl
