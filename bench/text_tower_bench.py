"""The CLIP text tower on this CPU, in every runtime Loupe has or has considered: one query at a time (a search's
latency) and batches of 8 (what micro-batching forms under load), with each runtime's cosine to torch fp32.

    python bench/text_tower_bench.py [--write]

Full-size ViT-B/32 text tower (random weights, real tokenizer: bench/fullsize.py). Runtimes: torch fp32 (the
reference), ONNX Runtime fp32 (`onnx`), ONNX Runtime with 8-bit weights in blocks (`onnx-w8`: smoothed, blocks
of 128 where the CPU has VNNI, else 32; `auto`, the default, serves it where it times 1.2x faster than `onnx` on one
query and gains more there than it loses on a pass of several, else `onnx`), ONNX Runtime int8 with
per-channel weight scales after smoothing its inputs (`onnx-int8`, opt-in), all exported by Loupe's own code (server/loupe/models/onnx_text.py), torch
bf16 in eager mode (a plain bfloat16 copy of the model) and Loupe's bf16 copy of the text tower as a TorchScript trace
(server/loupe/models/bf16_text.py, what `LOUPE_MODEL__TEXT_BATCHES_BF16` serves). Loupe's ONNX export and bf16 copy
run the pooled tower (server/loupe/models/text_pooled.py); each also runs as transformers' whole forward pass (the
"whole forward pass" rows, Loupe's graph before it), same run. Batches are drawn from 40 search-like queries of 1
to 15 words (3-17 tokens: server/loupe/models/smoothing.py's calibration set), so they hold queries of different
lengths, as micro-batches of real searches do; Loupe packs a batch into its real tokens, and the "padded batch"
rows run the same graphs with every padding token counted as real (an attention mask of ones: the work of a batch
padded to its longest, as Loupe's graphs did before packing; the same vectors). All on Loupe's torch thread.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_section
from fullsize import build as build_fullsize

from loupe.models.smoothing import CALIBRATION

QUERIES = [
    "a red bicycle against a brick wall",
    "a photo of a cat",
    "sunset over the sea with boats",
    "two people walking a dog on the beach",
    "a hand-drawn sketch of a house",
    "screenshot of an error message",
    "a bowl of ramen on a wooden table",
    "snow on the mountains at dawn",
]


# Micro-batches of mixed lengths, the same in every row.
_draw = random.Random(0)
BATCHES = [_draw.sample(CALIBRATION, 8) for _ in range(10)]


def single_ms(fn: Callable[[list[str]], np.ndarray], n: int = 40) -> float:
    for q in QUERIES[:3]:
        fn([q])
    took = []
    for i in range(n):
        t = time.perf_counter()
        fn([QUERIES[i % len(QUERIES)]])
        took.append(time.perf_counter() - t)
    return statistics.median(took) * 1000


def batch_qps(fn: Callable[[list[str]], np.ndarray], rounds: int = 10) -> float:
    fn(BATCHES[-1])
    t = time.perf_counter()
    for r in range(rounds):
        fn(BATCHES[r % len(BATCHES)])
    return rounds * 8 / (time.perf_counter() - t)


def one_thread_qps(fn: Callable[[list[str]], np.ndarray], rounds: int = 10) -> float:
    """Batches of 4 on one thread: a text pass under load (one thread per pass, passes side by side)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn(BATCHES[-1][:4])
        t = time.perf_counter()
        for r in range(rounds):
            fn(BATCHES[r % len(BATCHES)][:4])
        return rounds * 4 / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from loupe.models import torch_thread

    # Everything on Loupe's torch thread, as in the server: torch passes from a second thread would each get an
    # OpenMP team, and with more teams' threads than cores libgomp's workers sleep between operators.
    torch_thread.call(measure, args.write)


def measure(write: bool) -> None:
    import torch

    from loupe.models import bf16_text, onnx_text
    from loupe.models.clip import load_clip, pooled
    from loupe.models.vectors import normalize

    clip = load_clip(str(build_fullsize()), device="cpu")
    ref = clip.embed_texts_torch(QUERIES)
    runtimes: dict[str, Callable[[list[str]], np.ndarray]] = {"torch fp32": clip.embed_texts_torch}
    # Each runtime's one-thread variant (ONNX Runtime sets its threads per session).
    single: dict[str, Callable[[list[str]], np.ndarray]] = {}

    class Whole(torch.nn.Module):
        """transformers' whole forward pass (every token through every layer), as exported before the pooled
        tower (models/text_pooled.py): the baseline of the "pooled" rows."""

        def __init__(self, text: torch.nn.Module, projection: torch.nn.Module, table: object = None) -> None:
            super().__init__()
            self.text, self.projection, self.table = text, projection, table

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.projection(pooled(self.text(input_ids=input_ids, attention_mask=attention_mask)))

    def onnx_runner(path: Path, threads: int, padded: bool = False) -> Callable[[list[str]], np.ndarray]:
        tower = onnx_text.OnnxTextTower(path, threads)

        def run(texts: list[str]) -> np.ndarray:
            enc = clip.tokenize(texts, "np")
            mask = np.ones_like(enc["attention_mask"]) if padded else enc["attention_mask"]
            return tower(enc["input_ids"], mask)

        return run

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.onnx"
        enc = clip.tokenize(QUERIES[:2])
        onnx_text.export_encoder(
            Whole(clip.model.text_model, clip.model.text_projection).eval(),
            enc["input_ids"],
            enc["attention_mask"],
            whole,
        )
        runtimes["ONNX Runtime onnx, whole forward pass"] = onnx_runner(whole, torch.get_num_threads())
        single["ONNX Runtime onnx, whole forward pass"] = onnx_runner(whole, 1)
        for kind in ("onnx", "onnx-w8", "onnx-int8"):
            c = load_clip(str(build_fullsize()), device="cpu")
            assert onnx_text.attach(c, kind, Path(tmp), torch.get_num_threads()) == kind
            runtimes[f"ONNX Runtime {kind}"] = c.embed_texts
            single[f"ONNX Runtime {kind}"] = onnx_runner(c.text_tower.path, 1)
            if kind != "onnx-int8":
                padded = f"ONNX Runtime {kind}, padded batch"
                runtimes[padded] = onnx_runner(c.text_tower.path, torch.get_num_threads(), padded=True)
                single[padded] = onnx_runner(c.text_tower.path, 1, padded=True)
        bf16 = copy.deepcopy(clip.model).to(torch.bfloat16).eval()

        def torch_bf16(texts: list[str]) -> np.ndarray:
            enc = clip.tokenize(texts)
            with torch.inference_mode():
                out = bf16.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            return normalize(pooled(out).float().numpy())

        runtimes["torch bf16 (eager)"] = torch_bf16
        copy16 = bf16_text.Bf16TextTower(clip.model, clip.tokenize)
        assert copy16.traced is not None

        def traced_bf16(texts: list[str]) -> np.ndarray:
            enc = clip.tokenize(texts)
            return copy16(enc["input_ids"], enc["attention_mask"])

        runtimes["Loupe's bf16 copy (traced)"] = traced_bf16

        def traced_bf16_padded(texts: list[str]) -> np.ndarray:
            enc = clip.tokenize(texts)
            return copy16(enc["input_ids"], torch.ones_like(enc["attention_mask"]))

        runtimes["Loupe's bf16 copy (traced), padded batch"] = traced_bf16_padded
        # The same copy traced from transformers' whole forward pass (Loupe's before the pooled tower).
        pooled_tower = bf16_text._Modules.tower
        setattr(  # noqa: B010 (restored below)
            bf16_text._Modules,
            "tower",
            staticmethod(lambda text, proj, table, bos: Whole(text, proj, table).eval()),
        )
        try:
            whole16 = bf16_text.Bf16TextTower(clip.model, clip.tokenize)
        finally:
            setattr(bf16_text._Modules, "tower", staticmethod(pooled_tower))  # noqa: B010
        assert whole16.traced is not None

        def traced_whole(texts: list[str]) -> np.ndarray:
            enc = clip.tokenize(texts)
            return whole16(enc["input_ids"], enc["attention_mask"])

        runtimes["Loupe's bf16 copy (traced), whole forward pass"] = traced_whole
        rows = []
        for name, fn in runtimes.items():
            cos = float(np.min(np.sum(ref * fn(QUERIES), axis=1)))
            rows.append((name, single_ms(fn), batch_qps(fn), one_thread_qps(single.get(name, fn)), cos))
            print(rows[-1], flush=True)
    base_ms, base_qps = rows[2][1], rows[2][2]  # ONNX Runtime fp32
    lines = [
        f"Full-size ViT-B/32 text tower, single queries of 5-9 words, batches of 8 queries of 3-17 tokens (mixed "
        f"lengths, as real searches), run on their real tokens only; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Ratios against ONNX Runtime fp32 (`onnx`), same run. Loupe's ONNX "
        "export and bf16 copy compute only what the pooled embedding depends on and pack a batch into its real tokens "
        '(models/text_pooled.py); the rows marked "padded batch" run the same graphs on a batch padded to its '
        'longest (Loupe before packing), those marked "whole forward pass" transformers\' forward pass as Loupe '
        "did before the pooled tower. The last speed column: batches of 4 on one thread, as a text pass runs "
        "under load.",
        "",
        "| runtime | one query, ms (median) | vs onnx | batch of 8, queries/s | vs onnx | batch of 4 on "
        "1 thread, queries/s | worst cosine to torch fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {ms:.1f} | {base_ms / ms:.2f}x | {qps:.0f} | {qps / base_qps:.2f}x | {one:.0f} | {cos:.5f} |"
        for name, ms, qps, one, cos in rows
    ]
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("Text tower runtimes", text, command_line())


if __name__ == "__main__":
    main()
