"""Micro-batches of text queries on a bfloat16 copy of the text tower, where the CPU makes that faster.

Under concurrent load, text queries are encoded in micro-batches (models/batching.py). On CPUs with native bf16
matrix units (Intel AMX, AVX512-BF16) a bf16 copy of the text tower runs a batch of 8 about 1.8x faster than
ONNX Runtime fp32, while a single query stays faster on ONNX Runtime (bench/RESULTS.md, "Text tower runtimes").
On CPUs without them bf16 is slower. So nothing is assumed: at start the copy is timed against the text runtime in
use on probe batches of 4 and 8, and it takes batches from the smallest size where it wins by BATCH_GAIN, and only
if its vectors keep a worst cosine of COSINE_FLOOR to torch fp32 on the probes. The copy shares the fp32 token
embedding table (a lookup needs no bf16), so it costs the transformer's weights at 2 bytes each: about 76 MB for
ViT-B/32 (80-170 MB more anonymous memory in the server, measured). ONNX Runtime's threads do not busy-wait
(models/onnx_text.py): spinning, they took the cores from this copy, and the server lost throughput
(bench/RESULTS.md, "A/B: bf16 micro-batches"). Image vectors never come from it.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from loupe.models.clip import pooled
from loupe.models.vectors import normalize

log = logging.getLogger(__name__)

PROBES = [
    "a photo of a cat",
    "a red bicycle against a brick wall",
    "sunset over the sea with boats",
    "two people walking a dog on the beach at dawn",
    "a hand-drawn sketch of a house",
    "screenshot of an error message",
    "a bowl of ramen on a wooden table",
    "snow on the mountains",
]
# bf16 rounding measured 0.99994 on ViT-B/32 and 0.9999 on MiniLM's real weights (99.5% of its top 10).
COSINE_FLOOR = 0.9995
# The speed-up over the runtime in use that makes the copy worth its memory.
BATCH_GAIN = 1.25


class _Bf16Embedding:  # torch module built lazily (torch is imported by the caller)
    @staticmethod
    def make(table: Any) -> Any:
        import torch

        class Bf16Embedding(torch.nn.Module):
            """The shared fp32 token embedding, its rows cast to bf16 after the lookup."""

            def __init__(self) -> None:
                super().__init__()
                self.table = [table]  # a list: not registered as a submodule, so .to(bfloat16) leaves it fp32

            def forward(self, input_ids: Any) -> Any:
                return self.table[0](input_ids).to(torch.bfloat16)

        return Bf16Embedding()


class Bf16TextTower:
    """get_text_features of a CLIP model, on a bfloat16 copy of its text transformer and projection."""

    def __init__(self, model: Any) -> None:
        import torch

        text = model.text_model
        table = text.embeddings.token_embedding
        text.embeddings.token_embedding = None  # not copied: shared in fp32
        try:
            self.text = copy.deepcopy(text).to(torch.bfloat16).eval()
        finally:
            text.embeddings.token_embedding = table
        self.text.embeddings.token_embedding = _Bf16Embedding.make(table)
        self.projection = copy.deepcopy(model.text_projection).to(torch.bfloat16).eval()
        self._lock = threading.Lock()

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        import torch

        with self._lock, torch.inference_mode():
            out = self.text(input_ids=input_ids, attention_mask=attention_mask)
            return normalize(self.projection(pooled(out)).float().numpy())


def _best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    fn()  # warm
    took = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t)
    return min(took)


def attach(clip: Any, mode: str, gain_needed: float = BATCH_GAIN) -> str:
    """Route micro-batches to a bf16 copy of the text tower when `mode` is on, or auto and it measures at least
    `gain_needed` times faster. Returns a description for health: "" (not used) or "bf16 from N queries"."""
    clip.text_batch_tower, clip.text_batch_min = None, 0
    if mode == "off" or clip.info.device != "cpu":
        return ""
    try:
        tower = Bf16TextTower(clip.model)
        enc = clip.tokenize(PROBES)
        got = tower(enc["input_ids"], enc["attention_mask"])
        worst = float(np.min(np.sum(clip.embed_texts_torch(PROBES) * got, axis=1)))
    except Exception as exc:  # bf16 unsupported by this torch build or model: the runtime in use serves
        log.warning("the bf16 text tower could not be built (%s: %s): not used", type(exc).__name__, exc)
        return ""
    if worst < COSINE_FLOOR:
        log.warning(
            "the bf16 text tower differs from fp32 (worst cosine %.5f < %.4f): not used", worst, COSINE_FLOOR
        )
        return ""
    start = 0
    if mode == "on":
        start = 2
    else:
        for size in (4, 8):
            part = clip.tokenize(PROBES[:size])
            gain = _best_of(partial(clip.embed_texts, PROBES[:size])) / _best_of(
                partial(tower, part["input_ids"], part["attention_mask"])
            )
            log.info("bf16 text tower on %d queries: %.2fx the %s runtime", size, gain, clip.text_runtime)
            if gain >= gain_needed:
                start = size
                break
    if not start:
        return ""
    clip.text_batch_tower, clip.text_batch_min = tower, start
    log.info(
        "text query batches of %d or more run on a bf16 copy of the text tower (worst cosine %.6f)",
        start,
        worst,
    )
    return f"bf16 from {start} queries"
