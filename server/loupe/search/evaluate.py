"""Retrieval quality: Recall@K, Precision@K, mAP@K and NDCG@K over a labelled query set, and settings side by side.

A query set is JSONL, one query per line (blank lines and lines starting with # are skipped):

    {"text": "a red circle", "relevant": [12, 40, 41]}                      text -> image, relevant ids
    {"image_id": 42, "relevant_tags": ["red", "circle"]}                    image -> image (itself excluded)
    {"terms": [{"text": "sunset"}, {"image_id": 7, "weight": -0.5}], "relevant_where": {"albums": {"any": ["Sea"]}}}

Relevant images are given as ids, as tags an image must all carry, or as a filter in the search grammar; a query
may carry its own `filters` (the search is restricted to them) and an `id` naming it in the report.

Variants are dotted setting overrides applied to the running configuration (`index.factory=IVF{nlist},PQ{m}x8`,
`index.nprobe=8`, `search.prf_k=5`, `clip_model=/path/to/checkpoint`): a different index is trained in memory on
the library's vectors, a different model re-embeds the library's originals in memory. Nothing is written.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from loupe.config import Settings
from loupe.errors import InvalidQuery
from loupe.index.faiss_mirror import FaissMirror
from loupe.search.filters import Filter, ready_and
from loupe.search.query import SearchRequest, Term
from loupe.search.service import SearchService

if TYPE_CHECKING:
    from loupe.models.clip import ClipModel
    from loupe.runtime import Runtime

METRICS = ("recall", "precision", "map", "ndcg")


# ------------------------------------------------------------ metrics


def metrics_at_k(ranked: Sequence[int], relevant: Collection[int], k: int) -> dict[str, float]:
    """Binary-relevance metrics of one ranked list at cut-off k.

    recall = relevant found in the top k / all relevant; precision = relevant found / k;
    AP@k = sum over the ranks r <= k holding a relevant image of precision@r, / min(|relevant|, k);
    NDCG@k = sum(1 / log2(r + 1)) over relevant ranks, / the same for a perfect ranking."""
    if k <= 0:
        raise ValueError("k must be positive")
    if not relevant:
        raise ValueError("a query needs at least one relevant image")
    rel = set(relevant)
    found = 0
    ap = dcg = 0.0
    for r, image_id in enumerate(ranked[:k], start=1):
        if image_id in rel:
            found += 1
            ap += found / r
            dcg += 1.0 / math.log2(r + 1)
    ideal = min(len(rel), k)
    idcg = sum(1.0 / math.log2(r + 1) for r in range(1, ideal + 1))
    return {
        "recall": found / len(rel),
        "precision": found / k,
        "map": ap / ideal,
        "ndcg": dcg / idcg,
    }


# ------------------------------------------------------------ query sets


@dataclass(frozen=True)
class EvalQuery:
    qid: str
    kind: str  # text | image | mixed
    terms: tuple[Term, ...]
    relevant: frozenset[int]
    filters: Filter | None = None
    exclude: tuple[int, ...] = ()


def _bad(line: int, message: str) -> InvalidQuery:
    return InvalidQuery(f"query set line {line}: {message}", code="bad_eval_query", detail={"line": line})


def parse_queries(lines: Iterable[str], resolve: Any) -> list[EvalQuery]:
    """Parse JSONL query lines. `resolve(filter) -> ids` turns tag and filter labels into relevant ids."""
    out: list[EvalQuery] = []
    for n, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(n, f"not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise _bad(n, "a query is a JSON object")
        try:
            if "terms" in obj:
                terms = tuple(Term.model_validate(t) for t in obj["terms"])
            elif "text" in obj:
                terms = (Term(text=obj["text"]),)
            elif "image_id" in obj:
                terms = (Term(image_id=obj["image_id"]),)
            else:
                raise _bad(n, "give one of text, image_id or terms")
            filters = Filter.model_validate(obj["filters"]) if obj.get("filters") else None
            labels = [key for key in ("relevant", "relevant_tags", "relevant_where") if key in obj]
            if len(labels) != 1:
                raise _bad(n, "give exactly one of relevant, relevant_tags or relevant_where")
            if "relevant" in obj:
                relevant = frozenset(int(i) for i in obj["relevant"])
            elif "relevant_tags" in obj:
                tags = obj["relevant_tags"]
                relevant = frozenset(int(i) for i in resolve(Filter.model_validate({"tags": {"all": tags}})))
            else:
                relevant = frozenset(int(i) for i in resolve(Filter.model_validate(obj["relevant_where"])))
        except ValidationError as exc:
            raise _bad(n, exc.errors()[0]["msg"]) from exc
        except (TypeError, ValueError) as exc:
            raise _bad(n, str(exc)) from exc
        images = tuple(int(t.image_id) for t in terms if t.image_id is not None)
        kind = (
            "text"
            if all(t.text is not None for t in terms)
            else "image"
            if len(images) == len(terms)
            else "mixed"
        )
        relevant = relevant - set(images)  # the query image itself is excluded from its results
        if not relevant:
            raise _bad(n, "no relevant image (after excluding the query's own images)")
        out.append(EvalQuery(str(obj.get("id", n)), kind, terms, relevant, filters, images))
    if not out:
        raise InvalidQuery("the query set is empty", code="bad_eval_query")
    return out


def load_queries(path: Path, rt: Runtime) -> list[EvalQuery]:
    def resolve(f: Filter) -> np.ndarray:
        return rt.repo.ids_where(ready_and(f))

    with path.open(encoding="utf-8") as fh:
        return parse_queries(fh, resolve)


# ------------------------------------------------------------ running


@dataclass
class Report:
    name: str
    k: int
    queries: int
    by_kind: dict[str, dict[str, float]]  # kind (and "all") -> metric -> mean; plus "n"
    ms_p50: float
    per_query: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(service: SearchService, queries: Sequence[EvalQuery], k: int, name: str = "current") -> Report:
    rows: list[dict[str, Any]] = []
    times: list[float] = []
    for q in queries:
        req = SearchRequest(query=list(q.terms), filters=q.filters, limit=k)
        t0 = time.perf_counter()
        res = service.search(req, exclude=q.exclude)
        times.append((time.perf_counter() - t0) * 1000)
        ranked = [h.id for h in res.hits]
        rows.append({"id": q.qid, "kind": q.kind, **metrics_at_k(ranked, q.relevant, k), "top": ranked})
    by_kind: dict[str, dict[str, float]] = {}
    for kind in [*sorted({r["kind"] for r in rows}), "all"]:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        by_kind[kind] = {"n": float(len(sel)), **{m: float(np.mean([r[m] for r in sel])) for m in METRICS}}
    return Report(name, k, len(rows), by_kind, float(np.median(times)), rows)


# ------------------------------------------------------------ variants


def apply_overrides(settings: Settings, overrides: Sequence[str]) -> Settings:
    """`area.name=value` overrides (value as JSON where it parses, else a string) on a copy of the settings."""
    data = settings.model_dump()
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key.strip():
            raise InvalidQuery(f"override {ov!r}: write it as area.name=value", code="bad_override")
        node = data
        path = key.strip().split(".")
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise InvalidQuery(f"override {ov!r}: no settings area {part!r}", code="bad_override")
            node = node[part]
        if path[-1] not in node:
            raise InvalidQuery(f"override {ov!r}: no setting {key.strip()!r}", code="bad_override")
        try:
            node[path[-1]] = json.loads(value)
        except json.JSONDecodeError:
            node[path[-1]] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise InvalidQuery(f"override {where}: {e['msg']}", code="bad_override") from exc


def embed_library(rt: Runtime, clip: ClipModel) -> tuple[np.ndarray, np.ndarray]:
    """Every ready image's original through another model (in memory): the vectors a model switch would write."""
    from loupe.ingest.switch import embed_originals

    ids, _ = rt.mirror.snapshot()
    return embed_originals(rt, clip, np.sort(ids).tolist())


@contextmanager
def variant_service(rt: Runtime, overrides: Sequence[str]) -> Iterator[tuple[SearchService, list[str]]]:
    """A SearchService over the runtime's library with these overrides; notes say what was rebuilt."""
    settings = apply_overrides(rt.settings, overrides)
    notes: list[str] = []
    clip = rt.clip
    if settings.clip_model != rt.settings.clip_model:
        from loupe.models.clip import load_clip

        t0 = time.perf_counter()
        clip = load_clip(settings.clip_model, device=settings.model.device)
        ids, vecs = embed_library(rt, clip)
        notes.append(
            f"re-embedded {len(ids)} images with {settings.clip_model} in {time.perf_counter() - t0:.1f} s"
        )
    else:
        ids, vecs = rt.mirror.snapshot()
        if settings.model.text_runtime != rt.settings.model.text_runtime:
            from loupe.models.clip import load_clip

            clip = load_clip(rt.clip.info.source, device=settings.model.device, is_demo=rt.clip.info.is_demo)
    if settings.model.text_runtime != rt.settings.model.text_runtime or clip is not rt.clip:
        from loupe.models import onnx_text

        clip.text_runtime = onnx_text.attach_for_settings(clip, settings)
        notes.append(f"text queries on {clip.text_runtime}")
    with tempfile.TemporaryDirectory(prefix="loupe-eval-") as tmp:
        mirror = rt.mirror
        if (
            clip.dim != rt.clip.dim
            or clip.info.fingerprint != rt.clip.info.fingerprint
            or settings.index != rt.settings.index
        ):
            t0 = time.perf_counter()
            mirror = FaissMirror(
                Path(tmp), collection=rt.collection, model_version_id=0, dim=clip.dim, settings=settings.index
            )
            mirror.upsert(ids, vecs)
            mirror.maybe_go_approximate()
            notes.append(
                f"index {mirror.index_type} over {mirror.live_count} vectors in {time.perf_counter() - t0:.1f} s"
            )
        yield rt.search_service_for(clip, mirror, rt.collection, rt.search.model_version_id, settings), notes


def run_eval(
    rt: Runtime, queries: Sequence[EvalQuery], k: int, variants: Sequence[tuple[str, Sequence[str]]] = ()
) -> list[Report]:
    """The running configuration first, then each named variant (a list of overrides)."""
    reports = [evaluate(rt.search, queries, k, "current")]
    for name, overrides in variants:
        with variant_service(rt, overrides) as (service, notes):
            report = evaluate(service, queries, k, name)
            report.notes = notes
            reports.append(report)
    return reports
