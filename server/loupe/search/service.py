"""The read path: compose the query vector, generate candidates from the FAISS mirror, join metadata, page.

Paging is keyset on (score desc, id asc) inside a signed cursor that also carries the page depth and a digest
of the query, so the next page never repeats or skips a hit and any API node can serve it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loupe.config import SearchSettings
from loupe.errors import InvalidQuery, NotFound
from loupe.index.faiss_mirror import FaissMirror, Subset
from loupe.ingest.text import TextIndexer
from loupe.models.batching import MicroBatcher
from loupe.models.clip import ClipModel
from loupe.models.vectors import normalize
from loupe.search import keyword as kw
from loupe.search.filters import ready_and
from loupe.search.fusion import fuse
from loupe.search.query import Channel, Hit, SearchRequest, SearchResponse, Term, TextMatch
from loupe.signing import Signer, digest, digest_text
from loupe.storage.metadata.repo import MetadataRepo
from loupe.storage.metadata.tables import ImageState
from loupe.storage.vectors.base import VectorStore

# Query pictures per image-tower pass: concurrent image searches share passes up to this many (MicroBatcher), and
# a request with more pictures runs in passes of this many.
IMAGE_QUERY_BATCH = 16


class TextEmbeddingCache:
    """LRU of query-text embeddings (text -> unit vector). Misses are encoded in micro-batches; while `busy()`
    says other searches are in flight, on the model's threads under load (ClipModel.threads_under_load)."""

    def __init__(self, size: int, clip: ClipModel, busy: Callable[[], bool] = lambda: False) -> None:
        self.size = size
        self.encode: MicroBatcher[str] = MicroBatcher(
            lambda texts: clip.embed_texts(texts, clip.threads_under_load if busy() else None),
            parallel=clip.text_passes,
        )
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        out: dict[str, np.ndarray] = {}
        missing: list[str] = []
        with self._lock:
            for t in texts:
                v = self._data.get(t)
                if v is None:
                    missing.append(t)
                else:
                    self._data.move_to_end(t)
                    out[t] = v
                    self.hits += 1
        if missing:
            uniq = list(dict.fromkeys(missing))
            vecs = self.encode(uniq)  # micro-batched with concurrent searches
            with self._lock:
                for t, v in zip(uniq, vecs, strict=True):
                    out[t] = v
                    self.misses += 1
                    if self.size:
                        self._data[t] = v
                        while len(self._data) > self.size:
                            self._data.popitem(last=False)
        return [out[t] for t in texts]


class _FilterEntry:
    """A cached filter: its matching ids, and their mirror rows for the mirror version they were mapped at."""

    __slots__ = ("at", "generation", "ids", "subset")

    def __init__(self, generation: int, at: float, ids: np.ndarray) -> None:
        self.generation, self.at, self.ids = generation, at, ids
        self.subset: Subset | None = None

    def rows(self, mirror: FaissMirror) -> Subset:
        sub = self.subset
        if sub is None or sub.version != mirror.version:
            sub = self.subset = mirror.subset(self.ids)
        return sub


@dataclass
class FilterScope:
    entry: _FilterEntry  # the matching ids (sorted) and their mirror rows
    selectivity: float
    exact: bool
    cached: bool = False

    @property
    def ids(self) -> np.ndarray:
        return self.entry.ids

    @property
    def matching(self) -> int:
        return len(self.ids)

    def search(self, mirror: FaissMirror, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        within = self.entry.rows(mirror)
        if self.exact:
            return mirror.search_subset(query, k, within)
        return mirror.search_masked(query, k, within)

    def allows(self, image_id: int) -> bool:
        pos = int(np.searchsorted(self.ids, image_id))
        return pos < len(self.ids) and int(self.ids[pos]) == image_id

    def describe(self) -> dict[str, Any]:
        return {
            "matching": self.matching,
            "selectivity": round(self.selectivity, 6),
            "strategy": "exact-scan" if self.exact else "faiss-masked+rerank",
            "cached": self.cached,
        }


class SearchService:
    def __init__(
        self,
        *,
        settings: SearchSettings,
        repo: MetadataRepo,
        clip: ClipModel,
        mirror: FaissMirror,
        vectors: VectorStore,
        collection: str,
        secret: bytes,
        text_cache_size: int = 4096,
        text_indexer: TextIndexer | None = None,
        model_version_id: int = 0,
        sole_writer: bool = False,
    ) -> None:
        self.settings = settings
        # No other process can write this library (the embedded SQLite database in a data directory this
        # process holds the lock of): repo.generation alone says whether a cached filter still holds.
        self.sole_writer = sole_writer
        self.model_version_id = model_version_id
        self.repo = repo
        self.clip = clip
        self.mirror = mirror
        self.vectors = vectors
        self.collection = collection
        self.cursors = Signer(secret, "search-cursor")
        self._in_flight = 0  # searches running now in this process (the text tower's thread count follows it)
        self._in_flight_lock = threading.Lock()
        self.text_cache = TextEmbeddingCache(text_cache_size, clip, busy=lambda: self._in_flight > 1)
        # Uploaded query pictures (resize_crop outputs): concurrent image searches share image-tower passes.
        self.picture_encode: MicroBatcher[np.ndarray] = MicroBatcher(
            lambda pixels: clip.embed_uint8(np.stack(pixels)), max_batch=IMAGE_QUERY_BATCH, dedupe=False
        )
        self._filter_cache: OrderedDict[str, _FilterEntry] = OrderedDict()
        self._filter_lock = threading.Lock()
        self._results: OrderedDict[str, tuple[int, int, float, SearchResponse]] = OrderedDict()
        self._results_lock = threading.Lock()
        self.result_hits = self.result_misses = 0
        self.text_indexer = text_indexer
        self.url_for: Callable[[str], str] = lambda path: (
            path
        )  # the runtime signs URLs when keys are required

    def cache_stats(self) -> dict[str, dict[str, int]]:
        return {
            "query_embeddings": {
                "entries": len(self.text_cache),
                "hits": self.text_cache.hits,
                "misses": self.text_cache.misses,
            },
            "results": {
                "entries": len(self._results),
                "hits": self.result_hits,
                "misses": self.result_misses,
            },
            "filters": {"entries": len(self._filter_cache)},
        }

    # ------------------------------------------------------------ composition

    def image_vector(self, image_id: int) -> np.ndarray:
        v = self.mirror.vector(image_id)
        if v is None:
            got = self.vectors.retrieve(self.collection, [image_id])
            v = got.get(image_id)
        if v is None:
            image = self.repo.get_image(image_id)
            if image is None:
                raise NotFound(f"image {image_id} does not exist", detail={"field": "image_id"})
            raise InvalidQuery(
                f"image {image_id} is {image.state} and has no vector yet",
                code="image_not_ready",
                detail={"field": "image_id"},
            )
        return v

    def compose(self, terms: Sequence[Term], extra: Sequence[tuple[np.ndarray, float]] = ()) -> np.ndarray:
        """normalize(sum(w_i * e_i)) over the clip-channel terms (and any extra pre-embedded vectors)."""
        if len(terms) + len(extra) > self.settings.max_terms:
            raise InvalidQuery(
                f"{len(terms) + len(extra)} terms, over the limit of {self.settings.max_terms}",
                detail={"field": "query"},
            )
        terms = [t for t in terms if t.channel in (Channel.clip, Channel.auto)]
        total = np.zeros(self.clip.dim, dtype=np.float32)
        texts = [t.text for t in terms if t.text is not None]
        text_vecs = iter(self.embed_query_texts(texts)) if texts else iter(())
        for i, t in enumerate(terms):
            if t.text is not None:
                e = next(text_vecs)
            elif t.image_id is not None:
                e = self.image_vector(t.image_id)
            else:
                e = np.asarray(t.vector, dtype=np.float32)
                if e.shape != (self.clip.dim,):
                    raise InvalidQuery(
                        f"vector has {e.shape[0]} dimensions, the model's space has {self.clip.dim}",
                        detail={"field": f"query[{i}].vector"},
                    )
                if not np.all(np.isfinite(e)):
                    raise InvalidQuery("vector has non-finite values", detail={"field": f"query[{i}].vector"})
                e = normalize(e)
            total += np.float32(t.weight) * e
        for e, w in extra:
            total += np.float32(w) * normalize(e)
        if float(np.linalg.norm(total)) < 1e-6:
            raise InvalidQuery("the terms cancel out: the composed query is empty", detail={"field": "query"})
        return normalize(total)

    def embed_query_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Query texts on the clip channel: as typed, or averaged over the prompt templates when set."""
        templates = self.settings.prompt_templates
        if not templates:
            return self.text_cache.get_many(texts)
        expanded = [
            tpl.replace("{}", text) if "{}" in tpl else f"{tpl} {text}" for text in texts for tpl in templates
        ]
        vecs = np.stack(self.text_cache.get_many(expanded))
        n = len(templates)
        return [normalize(vecs[i * n : (i + 1) * n].mean(axis=0)) for i in range(len(texts))]

    def embed_query_pictures(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Query pictures prepared as ingest prepares a library picture (ingest.service.query_pixels), as unit
        vectors, in passes shared with concurrent image searches."""
        step = IMAGE_QUERY_BATCH
        return np.concatenate(
            [self.picture_encode(pixels[i : i + step]) for i in range(0, len(pixels), step)]
        )

    def feedback(self, query: np.ndarray, scope: FilterScope | None) -> np.ndarray:
        """Pseudo-relevance feedback: move the query towards the mean of its own top prf_k images."""
        k = self.settings.prf_k
        if not k:
            return query
        ids, _ = scope.search(self.mirror, query, k) if scope else self.mirror.search(query, k)
        vecs = [v for v in (self.mirror.vector(int(i)) for i in ids) if v is not None]
        if not vecs:
            return query
        centroid = normalize(np.mean(np.stack(vecs), axis=0))
        return normalize(query + np.float32(self.settings.prf_weight) * centroid)

    # ------------------------------------------------------------ search

    def search(
        self,
        req: SearchRequest,
        *,
        extra: Sequence[tuple[np.ndarray, float]] = (),
        exclude: Sequence[int] = (),
        return_query_term: bool = False,
        cursor_scope: Any = None,
    ) -> SearchResponse:
        """One page of results. A repeated identical request (same terms, filters, page, options) is answered
        from a small cache while neither this node's database nor the mirror changed, for at most
        search.result_cache_ttl_s; uploaded-image queries (`extra`, `cursor_scope`) are not cached."""
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            return self._search_cached(req, extra, exclude, return_query_term, cursor_scope)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _search_cached(
        self,
        req: SearchRequest,
        extra: Sequence[tuple[np.ndarray, float]],
        exclude: Sequence[int],
        return_query_term: bool,
        cursor_scope: Any,
    ) -> SearchResponse:
        t0 = time.perf_counter()
        # The query's digest (what a cursor is bound to) is computed once, from pydantic's own JSON (fields in
        # declaration order, no free-form dicts): for a 512-float vector term 0.12 ms, against 1.3 ms through
        # model_dump and json.dumps.
        qhash = (
            digest(cursor_scope)
            if cursor_scope is not None
            else digest_text(req.model_dump_json(exclude={"cursor"}))
        )
        if extra or cursor_scope is not None or not self.settings.result_cache_size:
            return self._search(req, extra, exclude, return_query_term, qhash, t0)
        key = f"{qhash}|{req.cursor}|{sorted(int(i) for i in exclude)}|{return_query_term}"
        gen, mver, now = self.repo.generation, self.mirror.version, time.monotonic()
        with self._results_lock:
            hit = self._results.get(key)
            if (
                hit is not None
                and hit[:2] == (gen, mver)
                and now - hit[2] <= self.settings.result_cache_ttl_s
            ):
                self._results.move_to_end(key)
                self.result_hits += 1
                took = round((time.perf_counter() - t0) * 1000, 3)
                return hit[3].model_copy(
                    update={
                        "timing_ms": {"embed": 0.0, "search": 0.0, "join": 0.0, "total": took},
                        "plan": {**hit[3].plan, "result_cache": "hit"},
                    }
                )
        res = self._search(req, extra, exclude, return_query_term, qhash, t0)
        with self._results_lock:
            self.result_misses += 1
            self._results[key] = (gen, mver, now, res)
            while len(self._results) > self.settings.result_cache_size:
                self._results.popitem(last=False)
        return res

    def _search(
        self,
        req: SearchRequest,
        extra: Sequence[tuple[np.ndarray, float]],
        exclude: Sequence[int],
        return_query_term: bool,
        qhash: str,
        t0: float,
    ) -> SearchResponse:
        limit = min(req.limit, self.settings.max_limit)
        offset, after = 0, None
        if req.cursor:
            cur = self.cursors.loads(req.cursor)
            if cur.get("v", self.model_version_id) != self.model_version_id:
                raise InvalidQuery(
                    "the library switched to another model since this cursor was made: run the search again",
                    code="stale_cursor",
                    detail={"field": "cursor"},
                )
            if cur.get("q") != qhash:
                raise InvalidQuery(
                    "cursor belongs to a different query", code="bad_cursor", detail={"field": "cursor"}
                )
            offset, after = int(cur["o"]), (float(cur["s"]), int(cur["i"]))
        if offset > self.settings.max_offset:
            raise InvalidQuery(
                f"results deeper than {self.settings.max_offset} are not served", detail={"field": "cursor"}
            )
        scope = self._plan_filter(req)
        channels = {t.channel for t in req.query if t.weight != 0} | ({Channel.clip} if extra else set())
        if scope is not None and scope.matching == 0:
            t1 = time.perf_counter()
            hits: list[Hit] = []
            last: tuple[int, float] | None = None
            plan: dict[str, Any] = {"candidates": "none"}
            t_search = t_join = 0.0
            term = None
        elif channels <= {Channel.clip}:
            query = self.compose(req.query, extra)
            t1 = time.perf_counter()
            hits, last, plan, t_search, t_join = self._page(
                self.feedback(query, scope), offset, after, limit, set(exclude), req.min_score, scope
            )
            # The composed query before feedback: sent back as a term, the next page applies feedback once.
            term = Term(vector=query.tolist(), weight=1.0) if return_query_term else None
        else:
            t1 = t0
            hits, last, plan, t_search, t_join = self._fused_page(
                req, extra, offset, after, limit, set(exclude), scope
            )
            term = None
        if scope is not None:
            plan["filter"] = scope.describe()
        plan["model_version"] = self.model_version_id
        if req.collapse_duplicates and hits:
            hits = self._collapse(hits)
        t2 = time.perf_counter()
        next_cursor = None
        if last is not None:
            next_cursor = self.cursors.dumps(
                {"q": qhash, "o": offset + len(hits), "s": last[1], "i": last[0], "v": self.model_version_id}
            )
        timing = {
            "embed": (t1 - t0) * 1000,
            "search": t_search * 1000,
            "join": t_join * 1000,
            "total": (t2 - t0) * 1000,
        }
        return SearchResponse(
            hits=hits,
            next_cursor=next_cursor,
            timing_ms={k: round(v, 3) for k, v in timing.items()},
            plan=plan,
            query_term=term,
        )

    def _collapse(self, hits: list[Hit], max_distance: int = 4) -> list[Hit]:
        from loupe.ingest.exif import hamming

        rows = self.repo.get_images([h.id for h in hits])
        kept: list[Hit] = []
        seen: list[int] = []
        for h in hits:
            ph = rows[h.id].phash if h.id in rows else None
            if ph is not None and any(hamming(ph, other) <= max_distance for other in seen):
                continue
            if ph is not None:
                seen.append(ph)
            kept.append(h)
        return kept

    # ------------------------------------------------------------ filters: the planner

    def _plan_filter(self, req: SearchRequest) -> FilterScope | None:
        """Count the matching images with the authoritative SQL compilation, then choose how to search them:
        few matches (<= exact_scan_max) -> an exact scan of just their vectors (always the true best matches);
        many -> the mirror's ANN index restricted to them by a FAISS id bitmap, re-ranked exactly (at high
        selectivity this has the unfiltered recall). A flat mirror is always exact."""
        if req.filters is None:
            return None
        entry, cached = self._filter_ids(req)
        matching = len(entry.ids)
        total = max(self.mirror.live_count, 1)
        exact = matching <= self.settings.exact_scan_max or self.mirror.index_type == "flat"
        return FilterScope(entry=entry, selectivity=matching / total, exact=exact, cached=cached)

    def _filter_ids(self, req: SearchRequest) -> tuple[_FilterEntry, bool]:
        """The matching ids, from a small cache valid while the database is unchanged (this process's commits
        bump repo.generation) and, where other nodes may write, for at most search.filter_cache_ttl_s after
        the SQL returned: a user typing queries and paging under one filter pays the SQL once, and the id-to-row
        mapping once per mirror version. The age counts from the SQL's end, not its start: a broad filter over
        a large library can take longer than the TTL, and would never be cached (every search paying seconds)."""
        assert req.filters is not None
        key = req.filters.model_dump_json(exclude_none=True, by_alias=True)
        gen = self.repo.generation
        with self._filter_lock:
            hit = self._filter_cache.get(key)
            if (
                hit is not None
                and hit.generation == gen
                and (self.sole_writer or time.monotonic() - hit.at <= self.settings.filter_cache_ttl_s)
            ):
                self._filter_cache.move_to_end(key)
                return hit, True
        ids = self.repo.ids_where(ready_and(req.filters))
        ids.setflags(write=False)
        entry = _FilterEntry(gen, time.monotonic(), ids)
        with self._filter_lock:
            if self.settings.filter_cache_size:
                self._filter_cache[key] = entry
            while len(self._filter_cache) > self.settings.filter_cache_size:
                self._filter_cache.popitem(last=False)
        return entry, False

    # ------------------------------------------------------------ several channels

    def _ocr_query(self, terms: Sequence[Term]) -> np.ndarray | None:
        picked = [t for t in terms if t.text is not None and t.channel in (Channel.ocr, Channel.auto)]
        if not picked:
            return None
        if self.text_indexer is None:
            raise InvalidQuery(
                "the OCR channel is off on this server (LOUPE_OCR__ENABLED)", detail={"field": "query"}
            )
        vecs = self.text_indexer.encoder.embed([t.text for t in picked])  # type: ignore[misc]
        total = sum(
            (np.float32(t.weight) * v for t, v in zip(picked, vecs, strict=True)),
            np.zeros(vecs.shape[1], np.float32),
        )
        if float(np.linalg.norm(total)) < 1e-6:
            raise InvalidQuery("the OCR terms cancel out", detail={"field": "query"})
        return normalize(total)

    def _keyword_rank(
        self, terms: Sequence[Term], depth: int
    ) -> tuple[list[tuple[int, float]], dict[int, set[str]]]:
        picked = [t for t in terms if t.text is not None and t.channel in (Channel.keyword, Channel.auto)]
        positive = [tok for t in picked if t.weight > 0 for tok in kw.tokens(t.text or "")]
        negative = [tok for t in picked if t.weight < 0 for tok in kw.tokens(t.text or "")]
        if not positive:
            return [], {}
        cands = self.repo.keyword_candidates(list(dict.fromkeys(positive + negative)), depth * 4)
        rows = self.repo.get_texts(cands)
        ranked: list[tuple[int, float]] = []
        matched: dict[int, set[str]] = {}
        for image_id, row in rows.items():
            m = kw.score_text(positive, row.content)
            if m.score <= 0:
                continue
            if negative and kw.score_text(negative, row.content).score >= 0.8:
                continue  # a negative keyword term excludes the images that contain it
            ranked.append((image_id, m.score))
            matched[image_id] = set(m.matched)
        ranked.sort(key=lambda x: (-x[1], x[0]))
        return ranked[:depth], matched

    def _fused_page(
        self,
        req: SearchRequest,
        extra: Sequence[tuple[np.ndarray, float]],
        offset: int,
        after: tuple[float, int] | None,
        limit: int,
        exclude: set[int],
        scope: FilterScope | None = None,
    ) -> tuple[list[Hit], tuple[int, float] | None, dict[str, Any], float, float]:
        depth = max(self.settings.channel_depth, offset + limit + len(exclude) + self.settings.overfetch + 1)
        ts = time.perf_counter()
        lists: dict[str, list[tuple[int, float]]] = {}
        chunk_of: dict[int, int] = {}
        clip_terms = [t for t in req.query if t.channel in (Channel.clip, Channel.auto)]
        if clip_terms or extra:
            q = self.feedback(self.compose(clip_terms, extra), scope)
            ids, scores = scope.search(self.mirror, q, depth) if scope else self.mirror.search(q, depth)
            lists["clip"] = list(zip(ids.tolist(), scores.tolist(), strict=True))
        q_ocr = self._ocr_query(req.query)
        if q_ocr is not None and self.text_indexer is not None:
            found = self.text_indexer.search(q_ocr, depth if scope is None else depth * 8)
            if (
                scope is not None
            ):  # post-filtered with a deeper fetch: the OCR collection has no filter payload
                found = [f for f in found if scope.allows(f[0])][:depth]
            lists["ocr"] = [(i, sc) for i, sc, _ in found]
            chunk_of = {i: k for i, _, k in found}
        kw_ranked, kw_matched = self._keyword_rank(req.query, depth)
        if scope is not None:
            kw_ranked = [r for r in kw_ranked if scope.allows(r[0])]
        if any(t.channel in (Channel.keyword, Channel.auto) for t in req.query):
            lists["keyword"] = kw_ranked
        fusion = req.fusion
        weights: dict[str, float] = {
            "clip": self.settings.fusion.clip,
            "ocr": self.settings.fusion.ocr,
            "keyword": self.settings.fusion.keyword,
        }
        if fusion:
            weights.update({str(ch): w for ch, w in fusion.weights.items()})
        method = fusion.method if fusion else self.settings.fusion.method
        fused = (
            fuse(lists, weights, method=method, k=self.settings.fusion.rrf_k)
            if len(lists) > 1
            else [(i, sc, {ch: sc}) for ch, ranked in lists.items() for i, sc in ranked]
        )
        t_search = time.perf_counter() - ts
        cand = [
            (i, sc, ev)
            for i, sc, ev in fused
            if i not in exclude
            and not (after is not None and (sc > after[0] or (sc == after[0] and i <= after[1])))
            and not (req.min_score is not None and sc < req.min_score)
        ]
        tj = time.perf_counter()
        window = cand[: limit + self.settings.overfetch + 1]
        rows = self.repo.hit_rows([i for i, _, _ in window])
        live = [(i, sc, ev) for i, sc, ev in window if i in rows and rows[i].state == ImageState.ready]
        page = live[:limit]
        texts = self.repo.get_texts([i for i, _, ev in page if "ocr" in ev or "keyword" in ev])
        t_join = time.perf_counter() - tj
        hits = []
        for i, sc, ev in page:
            text = None
            if i in texts:
                if "keyword" in ev:
                    text = TextMatch(**kw.text_evidence(texts[i].data, kw_matched.get(i, set())))
                elif "ocr" in ev:
                    text = TextMatch(**kw.text_evidence(texts[i].data, set(), chunk=chunk_of.get(i, 0)))
            hits.append(
                Hit(
                    id=i,
                    score=sc,
                    channels=ev,
                    text=text,
                    width=rows[i].width,
                    height=rows[i].height,
                    thumbnail_url=self.url_for(f"/api/images/{i}/thumbnail"),
                    file_url=self.url_for(f"/api/images/{i}/file"),
                )
            )
        more = len(live) > limit or len(cand) > len(window)
        plan = {
            "candidates": "fusion" if len(lists) > 1 else next(iter(lists), "none"),
            "channels": {ch: len(r) for ch, r in lists.items()},
            "fusion": method if len(lists) > 1 else None,
            "depth": depth,
        }
        last = (page[-1][0], page[-1][1]) if more and page else None
        return hits, last, plan, t_search, t_join

    def _page(
        self,
        query: np.ndarray,
        offset: int,
        after: tuple[float, int] | None,
        limit: int,
        exclude: set[int],
        min_score: float | None,
        scope: FilterScope | None = None,
    ) -> tuple[list[Hit], tuple[int, float] | None, dict[str, Any], float, float]:
        """One page of hits, and the raw (id, score) of its last hit when more follow."""
        k = offset + limit + len(exclude) + self.settings.overfetch + 1
        t_search = t_join = 0.0
        while True:
            ts = time.perf_counter()
            ids, scores = scope.search(self.mirror, query, k) if scope else self.mirror.search(query, k)
            t_search += time.perf_counter() - ts
            exhausted = len(ids) < k
            cand: list[tuple[int, float]] = []
            for i, s in zip(ids.tolist(), scores.tolist(), strict=True):
                if i in exclude:
                    continue
                if after is not None and (s > after[0] or (s == after[0] and i <= after[1])):
                    continue  # on or before the previous page's last hit
                if min_score is not None and s < min_score:
                    exhausted = True
                    break
                cand.append((i, s))
            tj = time.perf_counter()
            rows = self.repo.hit_rows([i for i, _ in cand[: limit + self.settings.overfetch + 1]])
            t_join += time.perf_counter() - tj
            # Ids the database no longer has (deleted, not yet out of the mirror) are masked here.
            live = [(i, s) for i, s in cand if i in rows and rows[i].state == ImageState.ready]
            enough = len(live) > limit or exhausted
            if enough or k >= self.settings.max_offset + limit + 1024:
                break
            k *= 2
        page = live[:limit]
        more = len(live) > limit
        hits = [
            Hit(
                id=i,
                score=s,
                channels={"clip": s},
                width=rows[i].width,
                height=rows[i].height,
                thumbnail_url=self.url_for(f"/api/images/{i}/thumbnail"),
                file_url=self.url_for(f"/api/images/{i}/file"),
            )
            for i, s in page
        ]
        plan = {
            "candidates": "faiss-mirror",
            "index": self.mirror.index_type,
            "k": k,
            "vectors": self.mirror.live_count,
        }
        return hits, (page[-1] if more and page else None), plan, t_search, t_join

    def similar(self, image_id: int, limit: int, cursor: str | None) -> SearchResponse:
        req = SearchRequest(query=[Term(image_id=image_id)], limit=limit, cursor=cursor)
        return self.search(req, exclude=[image_id])
