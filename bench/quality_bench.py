"""Query expansion measured with `loupe eval`'s own code (section "Quality: query expansion"): do prompt-template
ensembles or pseudo-relevance feedback (PRF) earn a place in the defaults?

The only CLIP with meaningful weights offline is the tiny one (synthetic shapes, trained by
loupe.models.tiny_clip), so the figures say how the options behave on that model, not on photographs. Each seed
imports a fresh library of `--per-class` pictures per class through the real ingest path; the queries are

  text:class   one per class and phrasing: "{c} {s}", "a small {c} {s}", "an image of a {c} {s}" (relevant: the class)
  text:coarse  "a {c} shape" (all pictures of that colour) and "a {s}" (all pictures of that shape)
  image        three pictures per class (relevant: the rest of the class; the query picture itself excluded)

Every variant runs through run_eval's variant_service (settings overrides on the running library, nothing written).
Deltas are paired per query against the baseline of the same library, pooled over seeds, with two standard errors.

PRF is also measured on a real encoder (`--debian`): all-MiniLM-L6-v2 embeddings of Debian's package descriptions
(bench/vectors.py, cached) in an exact mirror; a query is the first eight words of one package's description, the
relevant items are the other packages built from the same source package (the query's own package excluded from
the ranking, as an image query's own picture is). The feedback step is SearchService.feedback itself; the search
API cannot take these vectors whole (they are not in a CLIP space and have no library rows).

    python bench/quality_bench.py [--seeds 3] [--per-class 10] [--k 10] [--debian] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, scratch_runtime, tiny_model, write_section
from tests.fixtures.images import shape_set

from loupe.models import tiny_clip
from loupe.search.evaluate import EvalQuery, Report, apply_overrides, metrics_at_k, run_eval
from loupe.search.query import Term

PHRASINGS = ("{c} {s}", "a small {c} {s}", "an image of a {c} {s}")
TEMPLATES_1 = ["a photo of {}"]
TEMPLATES_4 = ["{}", "a photo of {}", "a picture of {}", "a drawing of {}"]
PRF_VARIANTS: list[tuple[str, list[str]]] = [
    (f"PRF k={k} weight={w}", [f"search.prf_k={k}", f"search.prf_weight={w}"])
    for k in (3, 5, 10)
    for w in (0.5, 1.0)
]
VARIANTS: list[tuple[str, list[str]]] = [
    ("templates: a photo of {}", [f"search.prompt_templates={json.dumps(TEMPLATES_1)}"]),
    (
        "templates: 4 (as typed, photo, picture, drawing)",
        [f"search.prompt_templates={json.dumps(TEMPLATES_4)}"],
    ),
    *PRF_VARIANTS,
    (
        "templates 4 + PRF k=5 weight=0.5",
        [f"search.prompt_templates={json.dumps(TEMPLATES_4)}", "search.prf_k=5", "search.prf_weight=0.5"],
    ),
]
KINDS = ("text:class", "text:coarse", "image", "all")


def library_queries(rt, per_class: int, seed: int) -> list[EvalQuery]:  # type: ignore[no-untyped-def]
    """Import the shape library (one album per class) and build the labelled queries over its ids."""
    ids: dict[tuple[str, str], list[int]] = {}
    for pic in shape_set(per_class, seed=seed):
        (out,) = rt.ingest.upload([(pic.name, pic.data)], albums=[f"{pic.colour}-{pic.shape}"])
        assert out.id is not None, out
        ids.setdefault((pic.colour, pic.shape), []).append(int(out.id))
    rt.ingest.drain()
    queries: list[EvalQuery] = []
    for (c, s), members in ids.items():
        for p in PHRASINGS:
            text = p.format(c=c, s=s)
            queries.append(EvalQuery(text, "text:class", (Term(text=text),), frozenset(members)))
        for image_id in members[:3]:
            rest = frozenset(members) - {image_id}
            queries.append(
                EvalQuery(f"image {image_id}", "image", (Term(image_id=image_id),), rest, None, (image_id,))
            )
    for c in tiny_clip.COLOURS:
        rel = frozenset(i for (cc, _), m in ids.items() if cc == c for i in m)
        queries.append(EvalQuery(f"a {c} shape", "text:coarse", (Term(text=f"a {c} shape"),), rel))
    for s in tiny_clip.SHAPES:
        rel = frozenset(i for (_, ss), m in ids.items() if ss == s for i in m)
        queries.append(EvalQuery(f"a {s}", "text:coarse", (Term(text=f"a {s}"),), rel))
    return queries


def per_query(report: Report, kind: str, metric: str) -> np.ndarray:
    return np.array([r[metric] for r in report.per_query if kind == "all" or r["kind"] == kind])


def paired(base: np.ndarray, other: np.ndarray) -> str:
    d = other - base
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{d.mean():+.3f} +- {2 * se:.3f}"


def debian_prf(rt, k: int, queries: int = 400) -> str:  # type: ignore[no-untyped-def]
    """PRF variants on MiniLM vectors of Debian descriptions; sibling packages of one source are the relevant set."""
    from vectors import CACHE, debian_descriptions, debian_packages, minilm

    from loupe.config import IndexSettings
    from loupe.index.faiss_mirror import FaissMirror
    from loupe.models.text_encoder import SentenceEncoder

    minilm()  # encodes and caches the corpus on first use (rows: debian_descriptions() in order)
    corpus = np.load(CACHE / "minilm-debian.npy")
    row_of = {text: i for i, text in enumerate(debian_descriptions())}
    rows_of_source: dict[str, set[int]] = {}
    text_of_row: dict[int, str] = {}
    for _, source, text in debian_packages():
        rows_of_source.setdefault(source, set()).add(row_of[text])
        text_of_row[row_of[text]] = text
    groups = sorted(sorted(r) for r in rows_of_source.values() if 3 <= len(r) <= 12)
    rng = np.random.default_rng(0)
    picked = [groups[i] for i in rng.choice(len(groups), size=min(queries, len(groups)), replace=False)]
    q_rows = [int(rng.choice(g)) for g in picked]
    q_texts = [" ".join(text_of_row[r].split()[:8]) for r in q_rows]
    q_vecs = SentenceEncoder(max_tokens=128).embed(q_texts)
    with tempfile.TemporaryDirectory() as tmp:
        mirror = FaissMirror(
            Path(tmp), collection="debian", model_version_id=0, dim=corpus.shape[1], settings=IndexSettings()
        )
        mirror.upsert(np.arange(len(corpus)), corpus)
        scores: dict[str, dict[str, np.ndarray]] = {}
        for name, overrides in [("baseline (no feedback)", []), *PRF_VARIANTS]:
            service = rt.search_service_for(
                rt.clip,
                mirror,
                rt.collection,
                rt.search.model_version_id,
                apply_overrides(rt.settings, overrides),
            )
            rows = []
            for q, own, group in zip(q_vecs, q_rows, picked, strict=True):
                ids, _ = mirror.search(service.feedback(q, None), k + 1)
                ranked = [int(i) for i in ids if int(i) != own][:k]
                rows.append(metrics_at_k(ranked, set(group) - {own}, k))
            scores[name] = {m: np.array([r[m] for r in rows]) for m in ("recall", "map", "ndcg")}
    base = scores["baseline (no feedback)"]
    lines = [
        f"all-MiniLM-L6-v2 (real weights), {len(corpus):,} Debian descriptions in an exact mirror, {len(q_rows)} "
        f"queries (eight words of a package whose source builds 3 to 12 packages; relevant: its siblings), k={k}:",
        "",
        "| variant | recall@10 | mAP@10 | NDCG@10 |",
        "|---|---|---|---|",
    ]
    for name, sc in scores.items():
        if sc is base:
            lines.append(f"| {name} | " + " | ".join(f"{base[m].mean():.3f}" for m in base) + " |")
        else:
            lines.append(f"| {name} | " + " | ".join(paired(base[m], sc[m]) for m in base) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--debian", action="store_true", help="also PRF on MiniLM vectors of Debian descriptions")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    model = tiny_model()
    runs: list[list[Report]] = []
    for seed in range(1, args.seeds + 1):
        with scratch_runtime(model) as rt:
            queries = library_queries(rt, args.per_class, seed)
            reports = run_eval(rt, queries, args.k, VARIANTS)
        runs.append(reports)
        print(
            f"seed {seed}: {len(queries)} queries, baseline mAP {reports[0].by_kind['all']['map']:.3f}",
            flush=True,
        )

    def pooled(v: int, kind: str, metric: str) -> np.ndarray:
        return np.concatenate([per_query(r[v], kind, metric) for r in runs])

    n = {kind: len(pooled(0, kind, "map")) for kind in KINDS}
    names = ["baseline (as typed, no feedback)", *[name for name, _ in VARIANTS]]
    lines = [
        f"Tiny CLIP (synthetic shapes, `loupe.models.tiny_clip`), {args.seeds} libraries of {args.per_class} "
        f"pictures x 30 classes imported through ingest, k={args.k}; queries per library: "
        + ", ".join(f"{kind} {n[kind] // args.seeds}" for kind in KINDS[:-1])
        + f". {machine()}.",
        "",
        "mAP@10 per query kind (baseline), and each variant's paired difference from it, pooled over the libraries "
        "(mean +- two standard errors); NDCG@10 for all queries; search p50 in ms (one query at a time).",
        "",
        "| variant | " + " | ".join(f"mAP {k}" for k in KINDS) + " | NDCG all | p50 ms |",
        "|---|" + "---|" * (len(KINDS) + 2),
    ]
    for v, name in enumerate(names):
        cells = []
        for kind in [*KINDS, "ndcg"]:
            metric, k = ("ndcg", "all") if kind == "ndcg" else ("map", kind)
            base = pooled(0, k, metric)
            cells.append(f"{base.mean():.3f}" if v == 0 else paired(base, pooled(v, k, metric)))
        p50 = np.median([r[v].ms_p50 for r in runs])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {p50:.1f} |")
    if args.debian:
        with scratch_runtime(model) as rt:
            lines += ["", debian_prf(rt, args.k)]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("Quality: query expansion", text, command_line())


if __name__ == "__main__":
    main()
