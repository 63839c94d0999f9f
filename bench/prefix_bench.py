"""The text tower with and without kept query prefixes (server/loupe/models/text_prefix.py), same run.

    python bench/prefix_bench.py [--rounds 3] [--write]

Full-size ViT-B/32 text tower (random weights, real tokenizer: bench/fullsize.py), exported by Loupe's own code
(`onnx` and `onnx-w8`), one session on all threads (a lone search) and one on one thread (a text pass under load,
passes side by side). Queries as the 1M bench sends them: "a photo of a <3 words> number <n>" (a template: 5 tokens
shared with the start token) and 1 to 12 random words ending in a number (they share at most their first words).
A third row is one search with three prompt templates ("a photo of a {}", "a drawing of a {}", "{} in the snow"
around 2 words and a number), encoded in one pass of three texts as `LOUPE_SEARCH__PROMPT_TEMPLATES` does; "one
search" there means that pass, "passes of 4" four such searches. Every query is new (its number), so nothing but the
prefixes is reused; each side warms its cache on 40 searches of the same kind first. Rounds alternate the sides; each cell is the median over the rounds of each round's median (one
query) or rate (passes of 4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_section
from fullsize import build as build_fullsize
from search_bench import WORDS, mixed_text

TEMPLATES = ("a photo of a {}", "a drawing of a {}", "{} in the snow")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from loupe.models import onnx_text, text_prefix
    from loupe.models.clip import load_clip

    clip = load_clip(str(build_fullsize()), device="cpu")
    rng = np.random.default_rng(0)
    counter = iter(range(10**9))

    def template() -> list[str]:
        return [f"a photo of a {' '.join(rng.choice(WORDS, 3).tolist())} number {next(counter)}"]

    def mixed() -> list[str]:
        return [mixed_text(rng, next(counter))]

    def expanded() -> list[str]:  # one search with three prompt templates: one pass of three texts
        words = f"{' '.join(rng.choice(WORDS, 2).tolist())} {next(counter)}"
        return [t.format(words) for t in TEMPLATES]

    kinds = {"'a photo of a' + 3 words": template, "1-12 words": mixed, "3 prompt templates": expanded}
    lines = [
        "| runtime | queries | one search, ms, no prefixes kept | kept | ratio | passes of 4 searches on 1 thread, "
        "searches/s, none kept | kept | ratio | tokens run a search, none / kept |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in ("onnx", "onnx-w8"):
            c = load_clip(str(build_fullsize()), device="cpu")
            assert onnx_text.attach(c, runtime, Path(tmp)) == runtime
            path = c.text_tower.path
            for label, make in kinds.items():
                towers = {
                    (threads, kept): onnx_text.OnnxTextTower(path, threads)
                    for threads in (0, 1)
                    for kept in (False, True)
                }
                for (_, kept), tower in towers.items():
                    if kept:
                        tower.prefixes = text_prefix.PrefixCache(64 << 20, tower.empty_prefix())
                    run(clip, tower, [make() for _ in range(40)])  # warm-up, the cache filled
                one: dict[bool, list[float]] = {False: [], True: []}
                four: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for kept in (False, True):
                        took = run(clip, towers[(0, kept)], [make() for _ in range(40)])
                        one[kept].append(statistics.median(took) * 1000)
                        fours = [[t for _ in range(4) for t in make()] for _ in range(15)]
                        took = run(clip, towers[(1, kept)], fours)
                        four[kept].append(4 * len(took) / sum(took))
                # Tokens after the start token (which every pass has always reused) a search has, and those the
                # kept side ran: over every search it encoded, warm-up included.
                tokens = statistics.mean(
                    sum(int(m.sum()) - 1 for m in clip.tokenize(make(), "np")["attention_mask"])
                    for _ in range(200)
                )
                queries = 40 + args.rounds * 40 + 40 + args.rounds * 60
                saved = sum(towers[(t, True)].prefixes.tokens_saved for t in (0, 1)) / queries
                o = [statistics.median(one[k]) for k in (False, True)]
                f = [statistics.median(four[k]) for k in (False, True)]
                lines.append(
                    f"| {runtime} | {label} | {o[0]:.2f} | {o[1]:.2f} | {o[0] / o[1]:.2f}x | {f[0]:.0f} | "
                    f"{f[1]:.0f} | {f[1] / f[0]:.2f}x | {tokens:.1f} / {tokens - saved:.1f} |"
                )
                print(lines[-1], flush=True)
    out = "\n".join(
        [
            f"Full-size ViT-B/32 text tower, {args.rounds} alternating rounds, new queries only (see the script's "
            'docstring); "kept": a 64 MB prefix cache (`LOUPE_MODEL__TEXT_PREFIX_CACHE_MB`, the default). The '
            "last column: tokens after the start token a search has (the three texts of a templated one together), and "
            "those the kept side still ran (averaged over all its searches, warm-up included).",
            "",
            *lines,
        ]
    )
    print(out)
    if args.write:
        write_section("Kept query prefixes (text tower)", out, command_line())


def run(clip: object, tower: object, passes: list[list[str]]) -> list[float]:
    """Seconds each pass took, tokenizing outside the clock."""
    took = []
    for texts in passes:
        enc = clip.tokenize(texts, "np")  # type: ignore[attr-defined]
        t = time.perf_counter()
        tower(enc["input_ids"], enc["attention_mask"])  # type: ignore[operator]
        took.append(time.perf_counter() - t)
    return took


if __name__ == "__main__":
    main()
