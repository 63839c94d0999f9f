"""A/B of the search hot path: `loupe serve` from another git revision against this checkout, on the same library,
in the same run, rounds interleaved, so that a noisy or different machine still gives a fair ratio.

    python bench/ab_serve.py --base <git rev> [--scale 10k] [--rounds 3] [--requests 200] [--write]
        [--this-env KEY=VALUE ...] [--base-env KEY=VALUE ...]

`--this-env` / `--base-env` set the environment of one side's server only: the same revision on both sides with a
setting changed on one compares settings.

The base revision is checked out into a temporary git worktree and its server is started with PYTHONPATH pointing
at that worktree's `server/` (the same virtual environment, model and library otherwise). Rows: a vector term (no
model), text whose embedding is cached (each request made distinct by a min_score that excludes nothing, so the
result cache cannot answer), new text every request (the text tower runs: "a photo of a red bicycle number <n>",
whose first 8 of about 10 tokens every request shares), new text of 1 to 12 words (the lengths of a micro-batch's
queries differ; they share at most their first words) and "a photo of a <3 words> number <n>" (a template's 5
tokens shared, as the 1M section's uncached row), at concurrency 1 and 8. Each cell is the median over the
rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, base_worktree, command_line, revisions, write_section
from fullsize import build as build_fullsize
from search_bench import WORDS, build_library, load, mixed_text, parse_scale, pct, rss_mb, serving
from vectors import synthetic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare this checkout against")
    ap.add_argument("--scale", default="10k")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--name", default="Search hot path A/B", help="the RESULTS.md section to write")
    ap.add_argument(
        "--this-env",
        action="append",
        default=[],
        help="KEY=VALUE for this checkout's server only (repeatable)",
    )
    ap.add_argument(
        "--base-env",
        action="append",
        default=[],
        help="KEY=VALUE for the base revision's server only (repeatable)",
    )
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rev, this = revisions(args.base, "".join(f", with {e}" for e in args.this_env))
    base_label = rev + "".join(f", with {e}" for e in args.base_env)

    n = parse_scale(args.scale)
    corpus, queries = synthetic(n)
    settings, _ = build_library(n, corpus, build_fullsize())
    rng = np.random.default_rng(1)
    counter = iter(range(10**9))

    def vector(i: int) -> dict:
        v = queries[i % len(queries)] + rng.normal(scale=0.01, size=queries.shape[1])
        return {"query": [{"vector": (v / np.linalg.norm(v)).tolist()}], "limit": 10}

    def text(i: int) -> dict:
        return {
            "query": [{"text": "a red bicycle against a brick wall"}],
            "limit": 10,
            "min_score": -1 + next(counter) * 1e-6,
        }

    def new_text(i: int) -> dict:
        return {"query": [{"text": f"a photo of a red bicycle number {next(counter)}"}], "limit": 10}

    def mixed(i: int) -> dict:
        return {"query": [{"text": mixed_text(rng, next(counter))}], "limit": 10}

    def template(i: int) -> dict:
        words = " ".join(rng.choice(WORDS, 3).tolist())
        return {"query": [{"text": f"a photo of a {words} number {next(counter)}"}], "limit": 10}

    rows = [("vector term (no model)", vector, 1), ("vector term (no model)", vector, 8)]
    rows += [("text, embedding cached", text, 1), ("text, embedding cached", text, 8)]
    rows += [("text, uncached", new_text, 1), ("text, uncached", new_text, 8)]
    rows += [("text, uncached, 1-12 words", mixed, 1), ("text, uncached, 1-12 words", mixed, 8)]
    rows += [("text, uncached, 'a photo of a' + 3 words", template, 1)]
    rows += [("text, uncached, 'a photo of a' + 3 words", template, 8)]
    got: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    pooled: dict[tuple[str, str, int], list[float]] = {}  # every latency of a row over the rounds: its tail
    anon: dict[str, list[float]] = {}
    with base_worktree(rev) as tree:
        for r in range(args.rounds):
            # Both sides get the same requests in a round (each server starts with empty caches): new texts for one
            # side only would give the two servers queries of different token counts.
            warm = [vector(i) for i in range(30)] + [text(i) for i in range(20)]
            bodies = {(label, conc): [make(i) for i in range(args.requests)] for label, make, conc in rows}
            for side, path in (("base", tree / "server"), ("this", ROOT / "server")):
                env = dict(e.split("=", 1) for e in (args.this_env if side == "this" else args.base_env))
                with serving(settings, PYTHONPATH=str(path), **env) as (url, pid):
                    load(url, warm, 1)
                    anon.setdefault(side, []).append(rss_mb(pid)["anon"])
                    for label, _, conc in rows:
                        lat, wall, errors, _ = load(url, bodies[(label, conc)], conc)
                        assert errors == 0, f"{side}: {errors} failed requests"
                        got.setdefault((side, label, conc), []).append((pct(lat, 50), len(lat) / wall))
                        pooled.setdefault((side, label, conc), []).extend(lat)
                print(f"round {r + 1}/{args.rounds}: {side} done", flush=True)

    def med(side: str, label: str, conc: int, k: int) -> float:
        return statistics.median(x[k] for x in got[(side, label, conc)])

    lines = [
        f"`loupe serve` from {base_label} (base) against {this} (this), on the same {n:,}-image library (embedded "
        f"defaults, full-size ViT-B/32), {args.rounds} interleaved rounds of {args.requests} requests per row; "
        "medians over the rounds; p99 and the slowest request over all the rounds' requests of a row. The load "
        "generator shares the cores.",
        "",
        "| query | concurrency | base p50 ms | this p50 ms | p50 ratio | base searches/s | this searches/s | "
        "throughput ratio | base p99 / slowest ms | this p99 / slowest ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _, conc in rows:
        b50, t50 = med("base", label, conc, 0), med("this", label, conc, 0)
        bqps, tqps = med("base", label, conc, 1), med("this", label, conc, 1)
        tails = [pooled[(side, label, conc)] for side in ("base", "this")]
        b99, t99 = (f"{pct(t, 99):.0f} / {max(t):.0f}" for t in tails)
        lines.append(
            f"| {label} | {conc} | {b50:.1f} | {t50:.1f} | {t50 / b50:.2f}x | {bqps:.0f} | {tqps:.0f} | "
            f"{tqps / bqps:.2f}x | {b99} | {t99} |"
        )
    lines += [
        "",
        f"Server anonymous memory after warm-up (median): base {statistics.median(anon['base']):.0f} MB, this "
        f"{statistics.median(anon['this']):.0f} MB.",
    ]
    out = "\n".join(lines)
    print(out)
    if args.write:
        write_section(args.name, out, command_line())


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
