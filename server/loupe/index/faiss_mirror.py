"""The FAISS mirror: the hot ANN path over one model version's `clip` vectors, always rebuildable from Qdrant.

* Exact while small: a brute-force inner product over the full-precision vectors (what IndexFlatIP does).
* Approximate past `index.exact_max` live vectors: a FAISS index (IVF-PQ by default; the factory string and its
  parameters are settings) over row numbers, whose candidates (limit x rerank_factor) are re-ranked exactly with
  the full-precision vectors, so the scores returned are always exact cosines.
* Catch-up: the database's change log is replayed from the manifest's last sequence; when the mirror is missing,
  belongs to another model version, or is too far behind, it is rebuilt from the vector store.
* Rows are append-only: an upsert adds a row, a delete (or a replaced vector) leaves a tombstone. The read path also
  masks ids the database no longer has, and over-fetches to make up for them. Tombstones are compacted away at a
  save once they are `index.compact_ratio` of the rows.
* Memory: the full-precision vectors are a raw float32 file (`vectors.f32`), memory-mapped read-only once saved
  (`index.mmap_vectors`), so they are file-backed pages the kernel can drop and share, not anonymous memory; rows
  added since the last save live in an in-memory tail. Lookups go through a sorted id array (16 bytes per row)
  plus a small dict for the tail, not a dict per row (~130 bytes each).
* Persistence: a save appends the tail's rows to vectors.f32 (rows below the manifest's count are never rewritten
  in place), then writes ids.npy, alive.npy and ann.faiss to temporary names and renames them, and manifest.json
  last: the commit point (rows past its count are ignored). Compaction writes a new vectors file and renames it
  over the old one, so searches still holding the old mapping finish on it. Losing the directory loses only time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from loupe.config import IndexSettings
from loupe.storage.metadata.tables import ChangeOp

log = logging.getLogger(__name__)

FORMAT_VERSION = (
    2  # 1: vectors.npy held in RAM, compacted at every save (still read, written as 2 at the next save)
)
_CHUNK = 65_536  # rows per chunk when copying or adding vectors in bulk
# Rows gathered at a time when scoring a scattered set of them (a filter's matches, an ANN search's candidates):
# 1 MB of float32 x 512, which the product reads back from the cache instead of from memory, and no copy of them all
# per query (bench/RESULTS.md: 10,000 scattered rows of a 1M mirror 6.6-7.2 -> 5.6-5.8 ms, 50,000 rows 39 -> 23 ms;
# re-ranking 10,270 candidates 6.0-7.1 -> 5.0-5.5 ms).
_SCORE_CHUNK = 512


class _ChangeSource(Protocol):
    def changes_since(self, model_version_id: int, after_seq: int, limit: int) -> list[Any]: ...

    def count_changes_since(self, model_version_id: int, after_seq: int) -> int: ...

    def last_seq(self) -> int: ...


class _VectorSource(Protocol):
    def retrieve(self, name: str, ids: Any) -> dict[int, np.ndarray]: ...

    def iter_all(self, name: str, batch: int = 1024) -> Any: ...


@dataclass
class Manifest:
    format_version: int
    model_version_id: int
    collection: str
    dim: int
    count: int
    last_seq: int
    index_type: str
    index_params: dict[str, Any]
    saved_at: float


@dataclass(frozen=True)
class SyncReport:
    applied: int
    rebuilt: bool
    last_seq: int
    seconds: float


@dataclass(frozen=True)
class _View:
    """A consistent snapshot of the row arrays for one search: rows [0, n_base) in `base` (memory-mapped once
    saved), rows [n_base, n) in `tail`. Rows are append-only, so a view stays valid while writers go on (a delete
    only flips `alive`)."""

    ids: np.ndarray
    alive: np.ndarray
    base: np.ndarray
    tail: np.ndarray
    n_base: int
    n: int
    ann: Any
    version: int

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of these rows (a copy)."""
        if len(rows) == 0 or int(rows.max()) < self.n_base:
            return self.base[rows]
        out = np.empty((len(rows), self.base.shape[1]), dtype=np.float32)
        low = rows < self.n_base
        out[low] = self.base[rows[low]]
        out[~low] = self.tail[rows[~low] - self.n_base]
        return out

    def scores_of(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """q against these rows, gathered a cache-sized chunk at a time (no copy of them all at once)."""
        out = np.empty(len(rows), dtype=np.float32)
        for start in range(0, len(rows), _SCORE_CHUNK):
            part = rows[start : start + _SCORE_CHUNK]
            out[start : start + len(part)] = self.take(part) @ q
        return out

    def scores(self, q: np.ndarray) -> np.ndarray:
        """q against every row, dead ones included."""
        head = self.base[: self.n_base] @ q
        if self.n == self.n_base:
            return head
        return np.concatenate([head, self.tail[: self.n - self.n_base] @ q])

    def chunks(self, rows: np.ndarray) -> Any:
        for start in range(0, len(rows), _CHUNK):
            part = rows[start : start + _CHUNK]
            yield part, self.take(part)


@dataclass
class Subset:
    """The mirror rows of a set of ids (a filter's matching images), valid for one mirror version; the bitmap for
    FAISS's IDSelectorBitmap is built on first use. Kept next to a cached filter, it spares the id-to-row mapping
    (and at 1M ids, 40 ms) on every query."""

    ids: np.ndarray
    rows: np.ndarray
    version: int
    n: int
    _bitmap: np.ndarray | None = field(default=None, repr=False)

    def bitmap(self) -> np.ndarray:
        if self._bitmap is None:
            mask = np.zeros(self.n, dtype=bool)
            mask[self.rows] = True
            self._bitmap = np.packbits(mask, bitorder="little")
        return self._bitmap

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """A mask over `rows`: which are in the subset."""
        bits = self.bitmap()
        inside = rows < self.n
        out = np.zeros(len(rows), dtype=bool)
        r = rows[inside]
        out[inside] = ((bits[r >> 3] >> (r & 7)) & 1).astype(bool)
        return out


AUTO_FACTORIES = ["IVF{nlist},PQ{m}x4fs", "IVF{nlist},PQ{m}x4fsr", "IVF{nlist},PQ{m}x8"]


@dataclass
class ProbeSet:
    """Sample queries and their exact top-10 among the live rows: the yardstick the approximate index is chosen
    by. Two kinds, and both must reach the target: the library's own vectors (image-to-image queries), and the
    same vectors turned away to cosine 0.3 in a random direction, which is about how far a CLIP text query sits
    from the pictures it matches (the modality gap). Sampling only the library's own vectors overrates some
    codes: on the test suite's clustered vectors, 4-bit fast-scan PQ scores 0.99 on them but 0.47 on queries
    from elsewhere, and 0.52 on these turned probes."""

    queries: np.ndarray
    truth: list[set[int]]
    kinds: np.ndarray  # 0: a library vector, 1: turned away

    @property
    def size(self) -> int:
        return len(self.queries)

    @classmethod
    def make(cls, view: _View, rows: np.ndarray, rng: np.random.Generator, n: int) -> ProbeSet:
        picked = rng.choice(rows, min(n, len(rows)), replace=False)
        own = view.take(picked)
        noise = rng.standard_normal(own.shape).astype(np.float32)
        noise -= (noise * own).sum(axis=1, keepdims=True) * own
        noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
        cos = np.float32(0.3)
        turned = cos * own + np.sqrt(1 - cos * cos) * noise
        half = len(picked) // 2
        queries = np.ascontiguousarray(np.concatenate([own[:half], turned[half:]]), dtype=np.float32)
        kinds = np.r_[np.zeros(half, np.int8), np.ones(len(picked) - half, np.int8)]
        best = np.full((len(queries), 10), -np.inf, dtype=np.float32)
        best_rows = np.zeros((len(queries), 10), dtype=np.int64)
        for part, vecs in view.chunks(rows):
            scores = queries @ vecs.T
            both = np.concatenate([best, scores], axis=1)
            both_rows = np.concatenate([best_rows, np.broadcast_to(part, scores.shape)], axis=1)
            top = np.argpartition(-both, 9, axis=1)[:, :10]
            best = np.take_along_axis(both, top, axis=1)
            best_rows = np.take_along_axis(both_rows, top, axis=1)
        return cls(queries, [set(r.tolist()) for r in best_rows], kinds)

    def recall(self, index: Any, view: _View, rerank: int) -> tuple[float, float]:
        """Recall@10 of the index searched as the mirror searches (k x rerank candidates, re-ranked exactly), the
        lower of the two kinds', and a lower bound for it (mean - 2 standard errors): a sample of a few hundred
        queries is not the library's whole query stream."""
        if self.size == 0:
            return 1.0, 1.0
        _, cand = index.search(self.queries, max(10 * rerank, 10 + 32))
        found = np.zeros(self.size)
        for i, (q, c, truth) in enumerate(zip(self.queries, cand, self.truth, strict=True)):
            c = c[c >= 0]
            top = c[_top_rows(view.take(c) @ q, 10)]
            found[i] = len(truth & set(top.tolist())) / 10
        groups = [found[self.kinds == k] for k in np.unique(self.kinds)]
        means = [float(g.mean()) for g in groups]
        bounds = [
            float(g.mean() - 2 * g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else 0.0 for g in groups
        ]
        return min(means), min(bounds)


class FaissMirror:
    def __init__(
        self, directory: Path, *, collection: str, model_version_id: int, dim: int, settings: IndexSettings
    ) -> None:
        self.directory = directory
        self.collection = collection
        self.model_version_id = model_version_id
        self.dim = dim
        self.settings = settings
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._reset_state()
        self.use_gpu = bool(settings.use_gpu and _gpu_count() > 0)

    # ------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._epoch = getattr(self, "_epoch", 0) + 1  # row numbers are valid within one epoch
        # Per row; capacity grows by doubling (9 bytes a row with alive).
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._n = 0
        self._base = np.zeros((0, self.dim), dtype=np.float32)  # rows [0, n_base): memory-mapped once saved
        self._n_base = 0
        self._tail = np.zeros((0, self.dim), dtype=np.float32)  # rows [n_base, n)
        # Rows of <directory>/vectors.f32 that are ours (0: write a new file at the next save).
        self._file_rows = 0
        self._live = 0
        # id -> row: a sorted view of the live rows at the last fold, plus a dict for the rows added since.
        self._sorted_ids = np.zeros(0, dtype=np.int64)
        self._sorted_rows = np.zeros(0, dtype=np.int64)
        self._recent: dict[int, int] = {}
        self._recent_sorted: tuple[int, np.ndarray, np.ndarray] = (-1, self._sorted_ids, self._sorted_rows)
        self._ann: Any = None
        self._ann_type = "flat"
        self._ann_params: dict[str, Any] = {}
        self._ann_trained_on = 0
        self.last_seq = 0
        self._unsaved = 0
        self._version = 0

    @property
    def live_count(self) -> int:
        return self._live

    @property
    def index_type(self) -> str:
        return self._ann_type

    @property
    def _nprobe(self) -> int:
        """The nprobe the approximate index searches with (chosen at its build, or the setting)."""
        return int(self._ann_params.get("nprobe", self.settings.nprobe or 1))

    @property
    def version(self) -> int:
        """Bumped by every change: what a cached Subset is checked against."""
        return self._version

    def _view(self) -> _View:
        with self._lock:
            return _View(
                self._ids,
                self._alive,
                self._base,
                self._tail,
                self._n_base,
                self._n,
                self._ann,
                self._version,
            )

    def _grow(self, extra: int) -> None:
        need = self._n + extra
        if need > len(self._ids):
            cap = max(need, len(self._ids) * 2, 1024)
            ids, alive = np.zeros(cap, dtype=np.int64), np.zeros(cap, dtype=bool)
            ids[: self._n], alive[: self._n] = self._ids[: self._n], self._alive[: self._n]
            self._ids, self._alive = ids, alive
        tail_need = need - self._n_base
        if tail_need > len(self._tail):
            cap = max(tail_need, len(self._tail) * 2, 1024)
            tail = np.zeros((cap, self.dim), dtype=np.float32)
            used = self._n - self._n_base
            tail[:used] = self._tail[:used]
            self._tail = tail

    def _index_rows(self) -> None:
        """Rebuild the sorted id -> row view over every live row (after a load, a save or a rebuild)."""
        live = np.nonzero(self._alive[: self._n])[0].astype(np.int64)
        ids = self._ids[live]
        order = np.argsort(ids, kind="stable")
        self._sorted_ids, self._sorted_rows = ids[order], live[order]
        self._recent = {}
        self._live = len(live)

    def _row(self, image_id: int) -> int | None:
        row = self._recent.get(image_id)
        if row is None:
            pos = int(np.searchsorted(self._sorted_ids, image_id))
            if pos < len(self._sorted_ids) and int(self._sorted_ids[pos]) == image_id:
                row = int(self._sorted_rows[pos])
        return row if row is not None and self._alive[row] else None

    def upsert(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"mirror expects {self.dim}-d vectors, got {vecs.shape}")
        uniq, first_from_end = np.unique(ids[::-1], return_index=True)
        if len(uniq) != len(ids):  # the same id twice in one batch: its last vector wins
            keep = np.sort(len(ids) - 1 - first_from_end)
            ids, vecs = ids[keep], vecs[keep]
        with self._lock:
            # An upsert of an id already present replaces it: tombstone the old row.
            stale = [r for r in (self._row(i) for i in ids.tolist()) if r is not None]
            if stale:
                self._tombstone(np.asarray(stale, dtype=np.int64))
            self._grow(len(ids))
            start = self._n
            rows = np.arange(start, start + len(ids), dtype=np.int64)
            self._ids[start : start + len(ids)] = ids
            self._tail[start - self._n_base : start - self._n_base + len(ids)] = vecs
            self._alive[start : start + len(ids)] = True
            self._n += len(ids)
            self._live += len(ids)
            self._version += 1
            self._recent.update(zip(ids.tolist(), rows.tolist(), strict=True))
            if self._ann is not None:
                self._ann.add_with_ids(vecs, rows)
            self._unsaved += len(ids)
            if len(self._recent) > max(_CHUNK, self._live // 8):
                self._index_rows()  # fold the dict into the sorted view

    def delete(self, ids: list[int] | np.ndarray) -> None:
        with self._lock:
            rows = []
            for i in ids:
                row = self._row(int(i))
                self._recent.pop(int(i), None)
                if row is not None:
                    rows.append(row)
            if rows:
                self._tombstone(np.asarray(rows, dtype=np.int64))
                self._unsaved += len(rows)

    def _tombstone(self, rows: np.ndarray) -> None:
        self._alive[rows] = False
        self._live -= len(rows)
        self._version += 1
        if self._ann is not None:
            self._ann.remove_ids(rows)  # faiss takes an id array too

    def vector(self, image_id: int) -> np.ndarray | None:
        with self._lock:
            row = self._row(int(image_id))
            if row is None:
                return None
            return self._view().take(np.asarray([row]))[0]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the live (ids, vectors), in row order."""
        view = self._view()
        rows = np.nonzero(view.alive[: view.n])[0]
        return view.ids[rows].copy(), view.take(rows)

    # ------------------------------------------------------------ search

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids, scores) by exact cosine, best first, ties broken by smaller id."""
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        view = self._view()
        if view.n == 0 or k <= 0:
            return _empty()
        if view.ann is None:
            scores = np.where(view.alive[: view.n], view.scores(q[0]), -np.inf)
            rows = _top_rows(scores, k)
            return _ordered(view.ids[rows], scores[rows])
        _, cand = view.ann.search(q, max(k * self.settings.rerank_factor, k + 32))
        cand = cand[0]
        cand = cand[(cand >= 0) & (cand < view.n)]
        cand = cand[view.alive[cand]]
        exact = view.scores_of(cand, q[0])
        top = _top_rows(exact, k)
        return _ordered(view.ids[cand[top]], exact[top])

    def subset(self, ids: np.ndarray) -> Subset:
        """The live rows of these ids (those present), for search_subset / search_masked."""
        return self._subset_view(ids)[0]

    def _subset_view(self, ids: np.ndarray | Subset) -> tuple[Subset, _View]:
        """A Subset and a view of the same mirror version (row numbers change only at compaction, which bumps
        the version): a cached Subset of the current version is taken as it is."""
        with self._lock:
            view = self._view()
            if isinstance(ids, Subset):
                if ids.version == view.version:
                    return ids, view
                ids = ids.ids
            sorted_ids, sorted_rows = self._sorted_ids, self._sorted_rows
            if self._recent and self._recent_sorted[0] != self._version:
                rid = np.fromiter(self._recent.keys(), np.int64, len(self._recent))
                rrow = np.fromiter(self._recent.values(), np.int64, len(self._recent))
                order = np.argsort(rid)
                self._recent_sorted = (self._version, rid[order], rrow[order])
            lookups = [(sorted_ids, sorted_rows)]
            if self._recent:
                lookups.append(self._recent_sorted[1:])
        ids = np.asarray(ids, dtype=np.int64)
        found = [np.zeros(0, dtype=np.int64)]
        for keys, rows in lookups:
            if len(keys) and len(ids):
                pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
                found.append(rows[pos[keys[pos] == ids]])
        rows = np.concatenate(found)
        # An id upserted again has its older row in the sorted view, dead: keep only alive rows, once each.
        rows = np.unique(rows[view.alive[rows]])
        return Subset(ids=ids, rows=rows, version=view.version, n=view.n), view

    def search_subset(
        self, query: np.ndarray, k: int, ids: np.ndarray | Subset
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the given ids only (a filter's matching set): the true best matches."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        sub, view = self._subset_view(ids)
        rows = sub.rows[view.alive[sub.rows]]
        if len(rows) == 0 or k <= 0:
            return _empty()
        if len(rows) * 4 >= view.n:
            # A large share: one product over every row, then a mask, instead of gathering the rows first (a copy
            # of len(rows) x dim floats per query).
            full = view.scores(q)
            scores = np.full(view.n, -np.inf, dtype=np.float32)
            scores[rows] = full[rows]
            top = _top_rows(scores, min(k, len(rows)))
            return _ordered(view.ids[top], scores[top])
        scores = view.scores_of(rows, q)
        top = _top_rows(scores, k)
        return _ordered(view.ids[rows[top]], scores[top])

    def search_masked(
        self, query: np.ndarray, k: int, ids: np.ndarray | Subset
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k among the given ids through the approximate index (FAISS IDSelectorBitmap over rows), re-ranked
        exactly; falls back to the exact subset scan when the mirror is flat.

        The lists probed widen by the inverse of the subset's share of the library: the best k among a random
        tenth of the pictures lie about as far out as the best 10k among all, so the nprobe the build chose for
        unfiltered queries would miss them (on the test suite's clustered vectors, recall@10 0.86 at one in ten
        with nprobe unwidened)."""
        sub, view = self._subset_view(ids)
        if view.ann is None:
            return self.search_subset(query, k, sub)
        bitmap = sub.bitmap()
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))  # n: bytes, not bits
        params = faiss.SearchParametersIVF()
        params.sel = sel  # `sel` and `bitmap` stay referenced here for the whole search
        params.nprobe = self.masked_nprobe(len(sub.rows))
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        _, cand = view.ann.search(q, max(k * self.settings.rerank_factor, k + 32), params=params)
        cand = cand[0]
        cand = cand[(cand >= 0) & (cand < view.n)]
        cand = cand[view.alive[cand] & sub.contains(cand)]
        exact = view.scores_of(cand, q[0])
        top = _top_rows(exact, k)
        return _ordered(view.ids[cand[top]], exact[top])

    def masked_nprobe(self, matching: int) -> int:
        """nprobe for a search among `matching` live rows: the chosen nprobe / their share, at most nlist."""
        nprobe = self._nprobe
        widened = math.ceil(nprobe * max(self._live, 1) / max(matching, 1))
        return min(widened, max(int(self._ann_params.get("nlist", nprobe)), nprobe))

    # ------------------------------------------------------------ approximate index

    def _approx_params(self, n: int) -> dict[str, Any]:
        nlist = self.settings.nlist or int(min(65536, max(16, round(4 * np.sqrt(n)))))
        nlist = min(nlist, max(1, n // 39))  # FAISS wants >= 39 training points per list
        m = self.settings.pq_m or max(1, self.dim // 4)
        while self.dim % m:
            m -= 1
        return {"nlist": nlist, "m": m}

    def _nprobe_ladder(self, nlist: int) -> list[int]:
        """The nprobe values a build tries, smallest first: the setting alone, or (auto) 8, 16, 32, ... up to
        nprobe_max, never past nlist (where IVF scans every list)."""
        if self.settings.nprobe:
            return [self.settings.nprobe]
        top = max(1, min(self.settings.nprobe_max, nlist))
        ladder = [p for p in (2**i for i in range(3, 17)) if p < top]
        return [*ladder, top]

    def _candidates(self, params: dict[str, Any]) -> list[str]:
        """Factory strings to try, cheapest first: `auto` tries 4-bit fast-scan PQ (plain, then residual), then
        8-bit PQ; a configured factory (the default is 8-bit PQ) is used as it is, its recall still measured."""
        spec = self.settings.factory
        chain = AUTO_FACTORIES if spec == "auto" else [spec]
        return [f.format(nlist=params["nlist"], m=params["m"]) for f in chain]

    def _build_ann(self) -> None:
        """(Re)train the approximate index on the live vectors and measure its recall: each candidate type (one,
        unless index.factory is auto) is trained, then searched the way queries are (candidates re-ranked
        exactly) with probe queries (ProbeSet) against exact search at each nprobe of the ladder (one value
        unless index.nprobe is auto); the first type and the smallest nprobe whose recall is at least
        index.min_recall with two standard errors to spare are kept (the last type at its largest nprobe is kept
        anyway, with a warning below the target). Searches use the old index until the swap."""
        with self._lock:
            view, epoch = self._view(), self._epoch
        rows = np.nonzero(view.alive[: view.n])[0].astype(np.int64)
        params = self._approx_params(len(rows))
        rng = np.random.default_rng(0)
        per_list = self.settings.train_per_list * params["nlist"]
        sample = rows if len(rows) <= per_list else np.sort(rng.choice(rows, per_list, replace=False))
        train = view.take(sample)
        probe = ProbeSet.make(view, rows, rng, self.settings.recall_queries)
        chosen: tuple[Any, str, int, float, dict[str, float]] | None = None
        tried: dict[str, float] = {}
        ladder = self._nprobe_ladder(params["nlist"])
        candidates = self._candidates(params)
        for factory in candidates:
            started = time.monotonic()
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
            _no_polysemous(index)
            index.train(train)
            for part, vecs in view.chunks(rows):  # in chunks: no full copy of the vectors
                index.add_with_ids(vecs, part)
            trained = time.monotonic() - started
            sweep: dict[str, float] = {}
            for nprobe in ladder:
                _set_nprobe(index, nprobe)
                recall, bound = probe.recall(index, view, self.settings.rerank_factor)
                sweep[str(nprobe)] = round(recall, 4)
                if bound >= self.settings.min_recall:
                    break
            tried[factory] = round(recall, 4)  # at the last nprobe tried
            log.info(
                "mirror %s: trained %s on %d vectors in %.1f s; at nprobe %d recall@10 %.3f (at least %.3f) on %d "
                "sample queries",
                self.collection,
                factory,
                len(rows),
                trained,
                nprobe,
                recall,
                bound,
                probe.size,
            )
            chosen = (index, factory, nprobe, recall, sweep)
            if bound >= self.settings.min_recall:
                break
        assert chosen is not None
        index, factory, nprobe, recall, sweep = chosen
        if factory == candidates[-1] and recall < self.settings.min_recall:
            log.warning(
                "mirror %s: no index type reached recall@10 %.2f (%s); using %s at nprobe %d: raise "
                "index.nprobe_max or choose another index.factory",
                self.collection,
                self.settings.min_recall,
                tried,
                factory,
                nprobe,
            )
        params = {
            **params,
            "nprobe": nprobe,
            "recall@10": round(recall, 4),
            "tried": tried,
            "by_nprobe": sweep,
        }
        with self._lock:
            if self._epoch != epoch:
                return  # reset or compacted meanwhile: row numbers changed, the next sync tries again
            # Rows added or deleted while training: bring the new index up to date before the swap.
            now = self._view()
            new_rows = np.arange(view.n, now.n, dtype=np.int64)
            new_rows = new_rows[now.alive[new_rows]]
            if len(new_rows):
                index.add_with_ids(now.take(new_rows), new_rows)
            dead = rows[~now.alive[rows]]
            if len(dead):
                index.remove_ids(dead)  # type: ignore[arg-type]
            self._ann = _to_gpu(index) if self.use_gpu else index
            self._ann_type = factory
            self._ann_params = params
            self._ann_trained_on = len(rows)
            self._version += 1

    def maybe_go_approximate(self) -> bool:
        """Past exact_max live vectors, build (or, after 4x growth, retrain) the approximate index."""
        live = self.live_count
        if live <= self.settings.exact_max:
            if self._ann is not None and live < self.settings.exact_max // 2:
                with self._lock:
                    self._ann, self._ann_type, self._ann_params = None, "flat", {}
                    self._version += 1
            return False
        if self._ann is None or live > 4 * self._ann_trained_on:
            self._build_ann()
            return True
        return False

    # ------------------------------------------------------------ catch-up

    def sync(self, changes: _ChangeSource, vectors: _VectorSource, batch: int = 1000) -> SyncReport:
        """Replay the change log from last_seq (or rebuild from the vector store when too far behind)."""
        started = time.monotonic()
        with self._sync_lock:
            behind = changes.count_changes_since(self.model_version_id, self.last_seq)
            if behind == 0:
                return SyncReport(0, False, self.last_seq, 0.0)
            if behind > self.settings.rebuild_lag:
                self.rebuild(changes, vectors)
                return SyncReport(behind, True, self.last_seq, time.monotonic() - started)
            applied = self._replay(changes, vectors, batch)
            self.maybe_go_approximate()
            if self._unsaved >= self.settings.save_every:
                self.save()
            return SyncReport(applied, False, self.last_seq, time.monotonic() - started)

    def _replay(self, changes: _ChangeSource, vectors: _VectorSource, batch: int) -> int:
        applied = 0
        while True:
            page = changes.changes_since(self.model_version_id, self.last_seq, batch)
            if not page:
                return applied
            # Collapse the page: the last operation on an id wins.
            last: dict[int, ChangeOp] = {}
            for ch in page:
                last[ch.image_id] = ch.op
            ups = [i for i, op in last.items() if op == ChangeOp.upsert]
            dels = [i for i, op in last.items() if op == ChangeOp.delete]
            if dels:
                self.delete(dels)
            if ups:
                got = vectors.retrieve(self.collection, ups)
                # An upsert whose point is gone was deleted later; its delete comes further down the log.
                present = [i for i in ups if i in got]
                if present:
                    self.upsert(np.asarray(present, dtype=np.int64), np.stack([got[i] for i in present]))
            self.last_seq = int(page[-1].seq)
            applied += len(page)

    def rebuild(self, changes: _ChangeSource, vectors: _VectorSource) -> None:
        """Start over from the vector store, then replay whatever was logged meanwhile."""
        started = time.monotonic()
        seq0 = changes.last_seq()
        with self._lock:
            self._reset_state()
        for ids, vecs in vectors.iter_all(self.collection, batch=2048):
            self.upsert(ids, vecs)
        self.last_seq = seq0
        self._replay(changes, vectors, 1000)
        self.maybe_go_approximate()
        self.save()
        log.info(
            "mirror %s: rebuilt from the vector store, %d vectors in %.1f s",
            self.collection,
            self.live_count,
            time.monotonic() - started,
        )

    # ------------------------------------------------------------ persistence

    def _map(self, rows: int) -> np.ndarray:
        """Rows [0, rows) of vectors.f32: memory-mapped read-only, or read into memory (index.mmap_vectors)."""
        path = self.directory / "vectors.f32"
        if rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.settings.mmap_vectors:
            return np.memmap(path, dtype=np.float32, mode="r", shape=(rows, self.dim)).view(np.ndarray)
        return np.fromfile(path, dtype=np.float32, count=rows * self.dim).reshape(rows, self.dim)

    def save(self) -> None:
        """Persist: append the rows added since the last save (or, with many tombstones or no file of ours yet,
        write a compacted file), then ids, alive flags, the FAISS index, and the manifest last."""
        with self._save_lock:
            with self._lock:
                view, epoch, file_rows = self._view(), self._epoch, self._file_rows
                dead = view.n - self._live
                compact = dead > 0 and dead >= self.settings.compact_ratio * view.n
                ann = self._ann
                ann_copy = faiss.clone_index(_to_cpu(ann)) if ann is not None else None
                last_seq, unsaved = self.last_seq, self._unsaved
                self._unsaved = 0
            self.directory.mkdir(parents=True, exist_ok=True)
            if compact or file_rows == 0:
                keep = np.nonzero(view.alive[: view.n])[0] if compact else np.arange(view.n)
                self._write_new_file(view, keep)
                if compact and ann_copy is not None:
                    ann_copy.reset()  # keeps the trained quantizers, drops the lists
                    for part, vecs in view.chunks(keep):
                        ann_copy.add_with_ids(vecs, np.searchsorted(keep, part))
            else:
                keep = np.arange(view.n)
                self._append_rows(view, file_rows)
            ids = view.ids[keep]
            alive = view.alive[keep].copy()
            with self._lock:
                if self._epoch != epoch:
                    self._unsaved += unsaved
                    return  # reset meanwhile (a rebuild): it saves its own state
                if compact:
                    self._swap_compacted(view, keep, ann_copy)
                else:
                    self._swap_base(view.n)
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                model_version_id=self.model_version_id,
                collection=self.collection,
                dim=self.dim,
                count=len(keep),
                last_seq=last_seq,
                index_type=self._ann_type if ann_copy is not None else "flat",
                index_params={**self._ann_params, "trained_on": self._ann_trained_on},
                saved_at=time.time(),
            )
            _atomic(self.directory / "ids.npy", lambda p: np.save(p, ids))
            _atomic(self.directory / "alive.npy", lambda p: np.save(p, alive))
            ann_path = self.directory / "ann.faiss"
            if ann_copy is not None:
                _atomic(ann_path, lambda p: faiss.write_index(ann_copy, str(p)))
            elif ann_path.exists():
                ann_path.unlink()
            (self.directory / "vectors.npy").unlink(missing_ok=True)  # format 1
            _atomic(
                self.directory / "manifest.json",
                lambda p: p.write_text(json.dumps(asdict(manifest), indent=2)),
            )

    def _write_new_file(self, view: _View, keep: np.ndarray) -> None:
        """These rows into a new vectors.f32, renamed over the old one (mappings of the old file stay valid)."""
        path = self.directory / "vectors.f32"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for _, vecs in view.chunks(keep):
                    f.write(np.ascontiguousarray(vecs).tobytes())

        _atomic(path, write)

    def _append_rows(self, view: _View, file_rows: int) -> None:
        """Rows [file_rows, n) at their place in vectors.f32; rows below are never rewritten in place, and
        anything past the manifest's count (a save cut short) is overwritten."""
        if view.n == file_rows:
            return
        row_bytes = self.dim * 4
        with open(self.directory / "vectors.f32", "r+b") as f:
            f.seek(file_rows * row_bytes)
            for _, vecs in view.chunks(np.arange(file_rows, view.n)):
                f.write(np.ascontiguousarray(vecs).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def _swap_base(self, rows: int) -> None:
        """Rows [0, rows) are in the file now: map them as the base, keep the rest in a smaller tail."""
        base = self._map(rows)
        extra = self._n - rows
        tail = np.zeros((max(extra, 1024), self.dim), dtype=np.float32)
        tail[:extra] = self._tail[rows - self._n_base : self._n - self._n_base]
        self._base, self._n_base, self._tail, self._file_rows = base, rows, tail, rows

    def _swap_compacted(self, view: _View, keep: np.ndarray, ann: Any) -> None:
        """Renumber: kept row keep[j] becomes row j, rows added since the snapshot follow them."""
        later = np.arange(view.n, self._n, dtype=np.int64)
        ids = np.concatenate([self._ids[keep], self._ids[later]])
        alive = np.concatenate([self._alive[keep], self._alive[later]])
        tail = np.concatenate([self._view().take(later), np.zeros((1024, self.dim), dtype=np.float32)])
        if ann is not None:
            moved = np.arange(len(keep), len(keep) + len(later), dtype=np.int64)
            if len(later):
                ann.add_with_ids(tail[: len(later)], moved)
            gone = np.nonzero(~alive)[0].astype(np.int64)
            if len(gone):
                ann.remove_ids(gone)
            ann = _to_gpu(ann) if self.use_gpu else ann
        elif self._ann is not None:  # built while the snapshot was written: the next sync builds it again
            self._ann_type, self._ann_params, self._ann_trained_on = "flat", {}, 0
        self._ids, self._alive, self._n = ids, alive, len(ids)
        self._base, self._n_base, self._file_rows = self._map(len(keep)), len(keep), len(keep)
        self._tail = tail
        self._ann = ann
        self._epoch += 1
        self._version += 1
        self._index_rows()

    def load(self) -> bool:
        """Load a saved mirror of this model version. False (and an empty mirror) when there is none usable."""
        path = self.directory / "manifest.json"
        try:
            data = json.loads(path.read_text())
            manifest = Manifest(**data)
        except (OSError, ValueError, TypeError):
            return False
        if (
            manifest.format_version not in (1, FORMAT_VERSION)
            or manifest.model_version_id != self.model_version_id
            or manifest.dim != self.dim
            or manifest.collection != self.collection
        ):
            log.warning(
                "mirror %s: saved files belong to another model or format; rebuilding", self.collection
            )
            return False
        n = manifest.count
        try:
            ids = np.load(self.directory / "ids.npy")
            if manifest.format_version == 1:
                base = np.load(self.directory / "vectors.npy", mmap_mode="r").view(np.ndarray)
                alive = np.ones(len(ids), dtype=bool)
                file_rows = 0  # the next save writes vectors.f32
            else:
                alive = np.load(self.directory / "alive.npy")
                size = (self.directory / "vectors.f32").stat().st_size
                if size < n * self.dim * 4:
                    raise ValueError(f"vectors.f32 holds {size} bytes, fewer than {n} rows")
                base, file_rows = self._map(n), n
            ann = None
            if manifest.index_type != "flat":
                ann = faiss.read_index(str(self.directory / "ann.faiss"))
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("mirror %s: cannot read saved files (%s); rebuilding", self.collection, exc)
            return False
        if len(ids) != n or len(alive) != n or base.shape != (n, self.dim):
            log.warning("mirror %s: saved files do not match the manifest; rebuilding", self.collection)
            return False
        with self._lock:
            self._reset_state()
            self._ids, self._alive, self._n = ids.astype(np.int64), alive.astype(bool), n
            self._base, self._n_base, self._file_rows = base, n, file_rows
            self._index_rows()
            if ann is not None:
                self._ann_type = manifest.index_type
                self._ann_params = {k: v for k, v in manifest.index_params.items() if k != "trained_on"}
                # A fixed setting wins (tuning needs no rebuild); auto keeps the nprobe chosen at the build (every
                # manifest records one: before auto, the setting's value, whose default was 128).
                self._ann_params["nprobe"] = self.settings.nprobe or int(self._ann_params.get("nprobe", 128))
                _set_nprobe(ann, self._ann_params["nprobe"])
                self._ann = _to_gpu(ann) if self.use_gpu else ann
                self._ann_trained_on = int(manifest.index_params.get("trained_on", n))
            self.last_seq = manifest.last_seq
        return True

    def open(self, changes: _ChangeSource, vectors: _VectorSource) -> SyncReport:
        """Load what is saved (or rebuild) and catch up with the change log."""
        if not self.load():
            shutil.rmtree(self.directory, ignore_errors=True)
            started = time.monotonic()
            self.rebuild(changes, vectors)
            return SyncReport(self.live_count, True, self.last_seq, time.monotonic() - started)
        return self.sync(changes, vectors)

    def memory(self) -> dict[str, int]:
        """Bytes held: in RAM (ids, flags, lookup, tail, index codes) and memory-mapped from vectors.f32."""
        with self._lock:
            mapped = self._n_base * self.dim * 4 if self.settings.mmap_vectors else 0
            ram = (
                self._ids.nbytes
                + self._alive.nbytes
                + self._sorted_ids.nbytes
                + self._sorted_rows.nbytes
                + self._tail.nbytes
                + (0 if self.settings.mmap_vectors else self._n_base * self.dim * 4)
            )
            ann = self._ann
        codes = 0
        if ann is not None:
            with contextlib.suppress(RuntimeError, AttributeError):  # not IVF, or on a GPU
                ivf = faiss.extract_index_ivf(ann)
                codes = int(ivf.ntotal) * (int(ivf.code_size) + 8)  # codes and ids in the inverted lists
        return {"ram_bytes": ram + codes, "index_bytes": codes, "mapped_bytes": mapped}

    def stats(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "vectors": self.live_count,
            "index": self._ann_type,
            "params": self._ann_params,
            "last_seq": self.last_seq,
            "gpu": self.use_gpu,
            "memory": self.memory(),
        }


# ---------------------------------------------------------------- helpers


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)


def _top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    part = part[np.isfinite(scores[part])]
    return part[np.argsort(-scores[part], kind="stable")]


def _ordered(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order].astype(np.float32)


def _no_polysemous(index: Any) -> None:
    """IndexIVFPQ trains polysemous codes by default: 7x the training time (45 s vs 6.5 s for 20k x 64-d on one
    core) for a Hamming pre-filter the mirror never uses."""
    with contextlib.suppress(RuntimeError):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False


def _set_nprobe(index: Any, nprobe: int) -> None:
    with contextlib.suppress(RuntimeError):  # not an IVF index (HNSW, flat...)
        faiss.extract_index_ivf(index).nprobe = nprobe


def _gpu_count() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


_gpu_resources: Any = None


def _to_gpu(
    index: Any,
) -> Any:  # pragma: no cover - needs faiss-gpu and a GPU; unverified on this project's CI
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)


def _to_cpu(index: Any) -> Any:
    if index is not None and hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)  # pragma: no cover
    return index


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
