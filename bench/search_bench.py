"""Search at scale: index choice by measured recall, filtered recall, baselines, and HTTP latency/throughput.

    python bench/search_bench.py --scales 10k,100k [--skip-http] [--skip-minilm] [--write]

For each scale (generated vectors cached under ~/.cache/loupe/bench):
1. Index candidates through the real FaissMirror (the server's index path) on synthetic clustered vectors, and on
   real-encoder vectors (MiniLM embeddings of Debian's package descriptions): recall@10 against exact search,
   latency (one thread, as one request sees it), build time and memory (codes + the re-ranking vectors).
2. A library on the embedded defaults (SQLite + Qdrant Edge) filled through IngestService.add_vectors, with tags
   selecting 0.01% .. 100% of it: filtered recall@10 of SearchService against an exact scan of the matching
   vectors; baselines in the same run: exact flat search (numpy over all vectors) and Qdrant-only search.
3. `loupe serve` on that library with a full-size ViT-B/32 (random weights, real tokenizer: bench/fullsize.py),
   loaded by an HTTP generator on loopback: text searches uncached (every query new) and repeated, vector-term
   searches (no model), at several concurrencies; resident memory of the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faiss
from common import ROOT, command_line, cpu_s, loupe_env, serve, write_section
from fullsize import build as build_fullsize
from ingest_bench import make_jpegs
from vectors import CACHE, minilm, synthetic

from loupe.config import IndexSettings, Settings
from loupe.index.faiss_mirror import FaissMirror

SELECTIVITIES = (0.0001, 0.001, 0.01, 0.1, 0.5, 1.0)


def parse_scale(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def exact_topk(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), np.int64)
    for i in range(0, len(queries), 64):
        s = queries[i : i + 64] @ corpus.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        out[i : i + 64] = np.take_along_axis(top, order, 1)
    return out


def recall(found: list[np.ndarray], truth: np.ndarray, k: int = 10) -> float:
    return float(
        np.mean(
            [len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth, strict=True)]
        )
    )


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) if xs else float("nan")


# ------------------------------------------------------------ 1. index candidates


AUTO = 0


def candidates(n: int, d: int, only_default: bool = False) -> list[tuple[str, dict, list[int]]]:
    """(label, IndexSettings overrides, nprobe values; AUTO: the nprobe the build chose by probe recall)."""
    exact = ("Flat (exact, numpy)", {"exact_max": 10**9}, [AUTO])
    default = (f"IVF,PQ{d // 4}x8 + re-rank 10x (default)", {"exact_max": 0}, [AUTO, 16, 32, 64, 128])
    # 4-bit PQ codes scanned with SIMD lookups (FAISS fast-scan); the exact re-ranking restores the order.
    fast = (
        f"IVF,PQ{d // 4}x4fs + re-rank 10x",
        {"exact_max": 0, "factory": "IVF{nlist},PQ{m}x4fs"},
        [32, 128],
    )
    if only_default:
        return [exact, (default[0], default[1], [AUTO, 32, 128])]
    out: list[tuple[str, dict, list[int]]] = [exact, default, fast]
    out.append(
        (
            "auto (first of PQx4fs, PQx4fsr, PQx8 to reach 0.95 on probes) + re-rank 10x",
            {"exact_max": 0, "factory": "auto"},
            [AUTO],
        )
    )
    out.append(
        (
            f"IVF,PQ{d // 8}x8 + re-rank 10x",
            {"exact_max": 0, "factory": "IVF{nlist},PQ{m}x8", "pq_m": d // 8},
            [32],
        )
    )
    # OPQ{m},IVF,PQ{m}x8 was tried and dropped: its rotation training did not finish in 8 minutes on 60k x 384
    # (2 cores), and the PQ48 vs PQ96 rows show the loss comes from IVF probing, not from the codes.
    out.append(("IVF,SQ8 + re-rank 10x", {"exact_max": 0, "factory": "IVF{nlist},SQ8"}, [32, 128]))
    out.append(("IVF,Flat", {"exact_max": 0, "factory": "IVF{nlist},Flat"}, [32, 128]))
    return out


def index_table(
    name: str, corpus: np.ndarray, queries: np.ndarray, tmp: Path, only_default: bool = False
) -> tuple[str, list[dict]]:
    n, d = corpus.shape
    truth = exact_topk(corpus, queries, 10)
    ids = np.arange(1, n + 1, dtype=np.int64)
    rows: list[dict] = []
    faiss.omp_set_num_threads(1)
    for label, over, probes in candidates(n, d, only_default):
        settings = IndexSettings(**over)
        mirror = FaissMirror(tmp / "m", collection="bench", model_version_id=0, dim=d, settings=settings)
        t0 = time.perf_counter()
        mirror.upsert(ids, corpus)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        mirror.maybe_go_approximate()
        faiss.omp_set_num_threads(1)
        build = time.perf_counter() - t0
        ann = mirror._ann  # the bench reads the trained index to size it and sweep nprobe
        codes = len(faiss.serialize_index(ann)) if ann is not None else 0
        for nprobe in probes:
            shown = "-"
            if ann is not None:
                chosen = mirror.stats()["params"]["nprobe"]
                faiss.extract_index_ivf(ann).nprobe = nprobe or chosen
                shown = f"auto: {chosen}" if nprobe == AUTO else str(nprobe)
            lat: list[float] = []
            found: list[np.ndarray] = []
            for q in queries:
                t = time.perf_counter()
                got, _ = mirror.search(q, 10)
                lat.append((time.perf_counter() - t) * 1000)
                found.append(got - 1)
            rows.append(
                {
                    "set": name,
                    "index": label if ann is None else f"{label} = {mirror.index_type}",
                    "nprobe": shown,
                    "recall10": recall(found, truth),
                    "p50_ms": pct(lat, 50),
                    "p99_ms": pct(lat, 99),
                    "build_s": build,
                    "codes_mb": codes / 2**20,
                    "vectors_mb": corpus.nbytes / 2**20,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        del mirror
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    lines = [
        f"**{name}**: {n:,} x {d}, {len(queries)} held-out queries, latency on 1 thread.",
        "",
        "| index | nprobe | recall@10 | p50 ms | p99 ms | vs exact p50 | build s | codes MB | + re-rank vectors MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = rows[0]["p50_ms"]
    for r in rows:
        rerank = r["vectors_mb"] if "re-rank" in r["index"] or r["codes_mb"] == 0 else 0
        lines.append(
            f"| {r['index']} | {r['nprobe'] or '-'} | {r['recall10']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{base / r['p50_ms']:.1f}x | {r['build_s']:.1f} | {r['codes_mb']:.0f} | {rerank:.0f} |"
        )
    return "\n".join(lines), rows


# ------------------------------------------------------------ 2. library, filtered recall, baselines


def library_dir(n: int) -> Path:
    return CACHE / f"library-{n}"


def build_library(n: int, corpus: np.ndarray, model_dir: Path) -> tuple[Settings, float]:
    """A data directory on the embedded defaults holding n vector-only images, tagged for the selectivities."""
    from loupe.runtime import Runtime

    data = library_dir(n)
    settings = Settings(data_dir=data, clip_model=str(model_dir), ocr={"enabled": False})  # type: ignore[arg-type]
    stamp = data / "bench-complete"
    if stamp.exists():
        return settings, float(stamp.read_text())
    import shutil

    shutil.rmtree(data, ignore_errors=True)
    rng = np.random.default_rng(42)
    rank = np.empty(n, np.int64)
    rank[rng.permutation(n)] = np.arange(n)  # image k is in selectivity s when rank[k] < s*n
    rt = Runtime.open(settings)
    t0 = time.perf_counter()
    try:
        for start in range(0, n, 20_000):
            chunk = range(start, min(n, start + 20_000))
            meta = [
                {"tags": [f"sel-{s}" for s in SELECTIVITIES if rank[k] < max(1, round(s * n))]} for k in chunk
            ]
            rt.ingest.add_vectors(corpus[chunk.start : chunk.stop], meta=meta)
            print(f"added {chunk.stop:,}/{n:,} ({chunk.stop / (time.perf_counter() - t0):.0f}/s)", flush=True)
        rt.sync_mirror()
        rt.mirror.save()
    finally:
        rt.close()
    took = time.perf_counter() - t0
    stamp.write_text(str(took))
    return settings, took


def filtered_and_baselines(settings: Settings, queries: np.ndarray, n: int) -> tuple[str, dict]:
    from loupe.runtime import Runtime
    from loupe.search.filters import Filter, ready_and
    from loupe.search.query import SearchRequest, Term

    rt = Runtime.open(settings)
    try:
        ids, vecs = rt.mirror.snapshot()
        order = np.argsort(ids)
        ids, vecs = ids[order], vecs[order]
        truth = exact_topk(vecs, queries, 10)
        params = rt.mirror.stats()["params"]
        shown = rt.mirror.index_type + (f" at nprobe {params['nprobe']}" if "nprobe" in params else "")
        out: dict = {"n": rt.mirror.live_count, "index": shown}

        def timed_search(fn) -> tuple[list[np.ndarray], list[float]]:  # type: ignore[no-untyped-def]
            found, lat = [], []
            for q in queries:
                t = time.perf_counter()
                found.append(np.asarray(fn(q)))
                lat.append((time.perf_counter() - t) * 1000)
            return found, lat

        exact_found, exact_lat = timed_search(lambda q: ids[np.argsort(-(vecs @ q))[:10]])
        mirror_found, mirror_lat = timed_search(lambda q: rt.mirror.search(q, 10)[0])
        qd_found, qd_lat = timed_search(lambda q: [h.id for h in rt.vectors.search(rt.collection, q, 10)])
        svc_found, svc_lat = timed_search(
            lambda q: [
                h.id for h in rt.search.search(SearchRequest(query=[Term(vector=q.tolist())], limit=10)).hits
            ]
        )
        t_ids = [ids[t] for t in truth]
        base = pct(exact_lat, 50)
        lines = [
            f"In-process, {out['n']:,} images (mirror: {out['index']}), {len(queries)} queries, top 10:",
            "",
            "| path | recall@10 | p50 ms | p95 ms | p99 ms | speed vs exact |",
            "|---|---|---|---|---|---|",
        ]
        for label, found, lat in (
            ("exact flat search (numpy, baseline)", exact_found, exact_lat),
            ("Qdrant-only search (Qdrant Edge, baseline)", qd_found, qd_lat),
            ("FAISS mirror", mirror_found, mirror_lat),
            ("SearchService (mirror + join + paging)", svc_found, svc_lat),
        ):
            lines.append(
                f"| {label} | {recall(found, np.asarray(t_ids)):.3f} | {pct(lat, 50):.2f} | {pct(lat, 95):.2f} | "
                f"{pct(lat, 99):.2f} | {base / pct(lat, 50):.1f}x |"
            )
        lines += [
            "",
            "Filtered search (tags selecting a share of the library) against an exact scan of the matching vectors:",
            "",
            "| selectivity | matching | strategy | recall@10 | p50 ms | p95 ms |",
            "|---|---|---|---|---|---|",
        ]
        for s in SELECTIVITIES:
            f = Filter.model_validate({"tags": {"any": [f"sel-{s}"]}})
            match = rt.repo.ids_where(ready_and(f))
            pos = np.searchsorted(ids, match)
            sub_vecs, sub_ids = vecs[pos], ids[pos]
            found, lat, plans = [], [], []
            qs = queries[:100]
            for q in qs:
                t = time.perf_counter()
                res = rt.search.search(SearchRequest(query=[Term(vector=q.tolist())], filters=f, limit=10))
                lat.append((time.perf_counter() - t) * 1000)
                found.append(np.asarray([h.id for h in res.hits]))
                plans.append(res.plan.get("filter", {}).get("strategy"))
            truth_s = [sub_ids[np.argsort(-(sub_vecs @ q))[:10]] for q in qs]
            kk = min(10, len(sub_ids))
            r = float(
                np.mean(
                    [
                        len(set(a[:kk].tolist()) & set(b[:kk].tolist())) / kk
                        for a, b in zip(found, truth_s, strict=True)
                    ]
                )
            )
            lines.append(
                f"| {s * 100:g}% | {len(sub_ids):,} | {plans[0]} | {r:.3f} | {pct(lat, 50):.2f} | {pct(lat, 95):.2f} |"
            )
            out[f"filtered_{s}"] = r
        return "\n".join(lines), out
    finally:
        rt.close()


# ------------------------------------------------------------ 3. HTTP


WORDS = [
    "red",
    "blue",
    "green",
    "yellow",
    "dog",
    "cat",
    "bicycle",
    "wall",
    "beach",
    "mountain",
    "city",
    "night",
    "snow",
    "forest",
    "car",
    "bridge",
    "portrait",
    "painting",
    "sketch",
    "street",
    "market",
    "river",
    "sunset",
    "garden",
    "kitchen",
    "window",
    "boat",
    "train",
    "flower",
    "bird",
    "horse",
]


def mixed_text(rng: np.random.Generator, n: int) -> str:
    """A new query of 1 to 12 words (about 3 to 16 tokens) ending in a number that makes it unique: queries of
    different lengths, as concurrent searches are, so a micro-batch holds tokens of several lengths."""
    return " ".join(rng.choice(WORDS, int(rng.integers(1, 13))).tolist()) + f" {n}"


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process in MB: anonymous (heap, model weights, index codes) and file-backed (the
    memory-mapped mirror vectors, SQLite and Qdrant Edge pages the kernel can drop and share)."""
    out = {"total": float("nan"), "anon": float("nan"), "file": float("nan")}
    names = {"VmRSS:": "total", "RssAnon:": "anon", "RssFile:": "file"}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = names.get(line.split(":")[0] + ":")
        if key:
            out[key] = int(line.split()[1]) / 1024
    return out


def timed_load(url: str, bodies: list[dict], concurrency: int, pid: int) -> tuple:  # type: ignore[type-arg]
    """One row of the HTTP table: p50, p95, p99 ms, searches/s, errors, the server's CPU ms per search and the
    load generator's (this process: only its load threads run during a row), which shares the cores."""
    before = cpu_s(pid)
    lat, wall, errors, own_s = load(url, bodies, concurrency)
    n = max(1, len(lat))
    server_ms = (cpu_s(pid) - before) * 1000 / n
    client_ms = own_s * 1000 / n
    return pct(lat, 50), pct(lat, 95), pct(lat, 99), len(lat) / wall, errors, server_ms, client_ms


def load(
    url: str, bodies: list[dict] | list[bytes], concurrency: int
) -> tuple[list[float], float, int, float]:
    """POST each body to /api/search (a dict: JSON) or /api/search/image (bytes: an uploaded JPEG) from
    `concurrency` threads: (latencies ms, wall s, errors, this process's CPU s over the wall). Each thread's
    client is built before the clock starts: building one (its TLS context) costs 19 ms of CPU, which at
    concurrency 32 took 0.6 s of the cores inside a 2-3 s row."""
    import httpx

    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    it = iter(bodies)
    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(concurrency)]

    def worker(client: httpx.Client) -> None:
        nonlocal errors
        with client:
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                t = time.perf_counter()
                if isinstance(body, bytes):
                    res = client.post(
                        "/api/search/image",
                        files={"image": ("query.jpg", body, "image/jpeg")},
                        data={"query": '{"limit": 10}'},
                    )
                else:
                    res = client.post("/api/search", json=body)
                took = (time.perf_counter() - t) * 1000
                with lock:
                    lat.append(took)
                    errors += res.status_code != 200

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    t0, own = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0, errors, time.process_time() - own


@contextlib.contextmanager
def serving(settings: Settings, **env_extra: str) -> Iterator[tuple[str, int]]:
    """`loupe serve` on the library, on a free loopback port: (url, pid) once it answers its health check."""
    env = loupe_env(
        settings.data_dir,
        settings.clip_model,
        LOUPE_LOG_LEVEL="WARNING",
        LOUPE_AUTH__RATE_PER_MINUTE="1000000",
        LOUPE_AUTH__BURST="100000",
        **env_extra,
    )
    (CACHE / "serve.log").unlink(missing_ok=True)
    with serve(env, CACHE / "serve.log") as (url, pid, _):
        yield url, pid


def http_bench(settings: Settings, queries: np.ndarray, requests: int) -> tuple[str, dict]:
    import httpx

    with serving(settings) as (url, pid):
        rss_idle = rss_mb(pid)
        model = httpx.get(url + "/api/health", timeout=10).json()["model"]
        rng = np.random.default_rng(7)
        counter = iter(range(10**9))

        def new_text() -> dict:
            words = " ".join(rng.choice(WORDS, 3).tolist())
            return {"query": [{"text": f"a photo of a {words} number {next(counter)}"}], "limit": 10}

        def new_vector(i: int) -> dict:
            # A fresh vector every request (a held-out query nudged by noise): the result cache never answers.
            v = queries[i % len(queries)] + rng.normal(scale=0.01, size=queries.shape[1])
            return {"query": [{"vector": (v / np.linalg.norm(v)).tolist()}], "limit": 10}

        repeated = {"query": [{"text": "a red bicycle against a brick wall"}], "limit": 10}
        # Warm up the model and the index pages.
        load(url, [new_text() for _ in range(10)] + [new_vector(i) for i in range(20)], 1)
        rows = []
        for label, make, conc in (
            ("vector term (no model)", new_vector, 1),
            ("vector term (no model)", new_vector, 8),
            ("text, uncached", lambda i: new_text(), 1),
            ("text, uncached", lambda i: new_text(), 8),
            ("text, uncached", lambda i: new_text(), 32),
            (
                "text, uncached, 1-12 words",
                lambda i: {"query": [{"text": mixed_text(rng, next(counter))}], "limit": 10},
                8,
            ),
            # The same words, each request made distinct by a min_score that excludes nothing: the query embedding
            # is cached, the search is computed.
            ("text, embedding cached", lambda i: {**repeated, "min_score": -1 + i * 1e-6}, 1),
            ("text, embedding cached", lambda i: {**repeated, "min_score": -1 + i * 1e-6}, 8),
            # The identical request again: the result cache.
            ("text, repeated", lambda i: repeated, 1),
            ("text, repeated", lambda i: repeated, 8),
        ):
            bodies = [make(i) for i in range(requests if conc > 1 else requests // 2)]
            rows.append((label, conc, *timed_load(url, bodies, conc, pid)))
            print(rows[-1], flush=True)
        rss_busy = rss_mb(pid)
        # Image queries: a new 1 MP JPEG each (decoded, embedded by the image tower, searched).
        pictures = make_jpegs(max(8, requests // 2), 1152, 864, seed=11)
        load(url, pictures[:3], 1)
        for conc in (1, 4):
            rows.append(("image query (a new 1 MP JPEG)", conc, *timed_load(url, pictures, conc, pid)))
            print(rows[-1], flush=True)
    if model.get("image_runtime") not in (None, "torch", "fp32"):
        # The same rows with the image tower on torch: the same run's baseline.
        with serving(settings, LOUPE_MODEL__IMAGE_RUNTIME="torch") as (url, pid):
            load(url, pictures[:3], 1)
            for conc in (1, 4):
                label = (
                    "image query (a new 1 MP JPEG), image tower on torch (LOUPE_MODEL__IMAGE_RUNTIME=torch)"
                )
                rows.append((label, conc, *timed_load(url, pictures, conc, pid)))
                print(rows[-1], flush=True)
    # The same text rows with the int8 text tower (opt-in: LOUPE_MODEL__TEXT_RUNTIME=onnx-int8).
    with serving(settings, LOUPE_MODEL__TEXT_RUNTIME="onnx-int8") as (url, pid):
        load(url, [new_text() for _ in range(10)], 1)
        for conc in (1, 8):
            bodies = [new_text() for _ in range(requests if conc > 1 else requests // 2)]
            rows.append(
                ("text, uncached, int8 text tower (opt-in)", conc, *timed_load(url, bodies, conc, pid))
            )
            print(rows[-1], flush=True)
    lines = [
        f"HTTP on loopback against `loupe serve` (full-size ViT-B/32 on the CPU, text tower on "
        f"{model.get('text_runtime', 'torch')}"
        + (f", micro-batches: {model['text_batches']}" if model.get("text_batches") else "")
        + f"; image vectors by the {model.get('image_runtime', 'torch')} image tower), {requests} requests per "
        "row (half that for the image queries and at concurrency 1); the load generator shares the 2 cores. "
        "Server CPU: the server process's user + system CPU time over the row, per search (a spinning OpenMP "
        "worker counts too). Load generator CPU: the bench process's own over the row, per search (httpx in "
        "one Python thread per concurrent client, on the same 2 cores):",
        "",
        "| query | concurrency | p50 ms | p95 ms | p99 ms | searches/s | errors | server CPU ms per search "
        "| load generator CPU ms per search |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]} | {r[7]:.1f} | "
        f"{r[8]:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        f"Server resident memory after start: {rss_idle['total']:.0f} MB ({rss_idle['anon']:.0f} MB anonymous, "
        f"{rss_idle['file']:.0f} MB file-backed); after the vector and text load: {rss_busy['total']:.0f} MB "
        f"({rss_busy['anon']:.0f} MB anonymous, {rss_busy['file']:.0f} MB file-backed).",
    ]
    return "\n".join(lines), {"rows": rows, "rss_idle": rss_idle, "rss_busy": rss_busy}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="10k,100k")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-library", action="store_true", help="index candidates only")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument(
        "--skip-index", action="store_true", help="no index table (the library and HTTP parts only)"
    )
    ap.add_argument(
        "--only-default", action="store_true", help="index table: exact and the default index only"
    )
    ap.add_argument("--write", action="store_true", help="write the sections into bench/RESULTS.md")
    args = ap.parse_args()
    import tempfile

    model_dir = build_fullsize()
    command = command_line()
    if not args.skip_minilm:
        corpus, queries = minilm()
        with tempfile.TemporaryDirectory() as tmp:
            table, _ = index_table(
                "MiniLM embeddings of Debian package descriptions", corpus, queries, Path(tmp)
            )
        print(table)
        if args.write:
            write_section("Search: index choice on real-encoder vectors", table, command)
    for scale in filter(None, args.scales.split(",")):
        n = parse_scale(scale)
        corpus, queries = synthetic(n)
        parts = []
        if not args.skip_index:
            with tempfile.TemporaryDirectory() as tmp:
                table, _ = index_table(
                    "synthetic Gaussian clusters (sqrt(n) centres, each point at cosine ~0.7 to its centre)",
                    corpus,
                    queries,
                    Path(tmp),
                    args.only_default,
                )
            parts.append(table)
            print(table)
        if not args.skip_library:
            settings, took = build_library(n, corpus, model_dir)
            parts.append(
                f"Library filled through IngestService.add_vectors ({n / took:,.0f} images/s when built)."
            )
            table, _ = filtered_and_baselines(settings, queries, n)
            parts.append(table)
            print(table)
            if not args.skip_http:
                table, _ = http_bench(settings, queries, args.requests)
                parts.append(table)
                print(table)
        if args.write:
            name = f"Search at {scale}" + (": library and HTTP" if args.skip_index else "")
            write_section(name, "\n\n".join(parts), command)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
