"""Text queries on a bfloat16 copy of the text tower, where the CPU makes that faster.

Under concurrent load, text queries are encoded in micro-batches (models/batching.py). On CPUs with native bf16
matrix units (Intel AMX, AVX512-BF16) a bf16 copy of the text tower runs a batch of 8 about 1.8x faster than
ONNX Runtime fp32 (bench/RESULTS.md, "Text tower runtimes"); traced (one call per pass, see Bf16TextTower) it runs a
single query faster too on an AMX CPU (5.8 against 9.1 ms). On CPUs without bf16 units it is slower. So nothing is
assumed: at start the copy is timed against the text runtime in use on probe batches of 1, 2, 4 and 8, and it takes
batches from the smallest size where it wins by BATCH_GAIN, and only if its vectors keep a worst cosine of
COSINE_FLOOR to torch fp32 on the probes. The copy shares the fp32 token embedding table (a lookup needs no bf16),
so it costs the transformer's weights at 2 bytes each: about 76 MB for ViT-B/32 (80-170 MB more anonymous memory in
the server, measured). ONNX Runtime's threads do not busy-wait (models/onnx_text.py): spinning, they took the cores
from this copy, and the server lost throughput (bench/RESULTS.md, "A/B: bf16 micro-batches"). Image vectors never
come from it. `auto` does not try the copy where oneDNN has no bf16 kernels (`cpu_has_bf16`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from loupe.models import text_pooled
from loupe.models.runtime_choice import ChoiceMemory, TimingWindow, described, fastest_interleaved, timed
from loupe.models.tracing import trace_checked
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
# A trace must give eager mode's vectors (it runs the same bf16 kernels) at other shapes than it was traced at.
TRACE_FLOOR = 0.99999
# Batch sizes timed at start; the copy takes batches from the smallest where it wins.
PROBE_SIZES = (1, 2, 4, 8)
# The speed-up over the runtime in use that makes the copy worth its memory.
BATCH_GAIN = 1.25


class _Modules:  # torch modules built lazily (torch is imported by the caller)
    @staticmethod
    def embedding(table: Any) -> Any:
        import torch

        class Bf16Embedding(torch.nn.Module):
            """The shared fp32 token embedding, its rows cast to bf16 after the lookup."""

            def __init__(self) -> None:
                super().__init__()
                self.table = [table]  # a list: not registered as a submodule, so .to(bfloat16) leaves it fp32

            def forward(self, input_ids: Any) -> Any:
                return self.table[0](input_ids).to(torch.bfloat16)

        return Bf16Embedding()

    @staticmethod
    def tower(text: Any, projection: Any, table: Any, bos_id: int | None) -> Any:
        """(input_ids, attention_mask, prefix_keys, prefix_values) -> (the projected bf16 embedding, each layer's
        keys and values), computing only what it depends on (models/text_pooled.py with `states`; without a start
        token (input_ids, attention_mask) -> the embedding). The shared fp32 table is registered on it (after the
        cast), so a trace sees it as a parameter, not a constant to copy."""
        tower = text_pooled.make(text, projection, bos_id, states=True)
        tower.table = table
        return tower


class Bf16TextTower:
    """get_text_features of a CLIP model, on a bfloat16 copy of its text transformer and projection.

    The copy runs as a TorchScript trace where tracing works: one call that releases the GIL for the whole
    forward pass. Eager mode releases and retakes the GIL at each of its ~400 operators, so in a server whose other
    threads run Python (HTTP, JSON, the search) every operator queued behind them: a batch of 4 took 2.5x its
    standalone time under load (bench/RESULTS.md, "Text tower under load"). A trace is checked against eager mode
    at other batch sizes and lengths than it was traced at; if it fails or differs, eager mode serves.

    Like the ONNX Runtime tower, each query of a pass is given the longest kept prefix it starts with (`prefixes`,
    a models/text_prefix.py PrefixCache given once the copy is chosen)."""

    def __init__(self, model: Any, tokenize: Callable[[list[str]], Any] | None = None) -> None:
        import torch

        text = model.text_model
        table = text.embeddings.token_embedding
        text.embeddings.token_embedding = None  # not copied: shared in fp32
        try:
            self.text = copy.deepcopy(text).to(torch.bfloat16).eval()
        finally:
            text.embeddings.token_embedding = table
        self.text.embeddings.token_embedding = _Modules.embedding(table)
        self.projection = copy.deepcopy(model.text_projection).to(torch.bfloat16).eval()
        bos = None
        if tokenize is not None:
            try:
                bos = text_pooled.bos_token_id(tokenize)
            except Exception as exc:  # the start token then runs through the layers like the others
                log.warning("the bf16 text tower cannot tokenize its probes (%s)", exc)
        self.tower = _Modules.tower(self.text, self.projection, table, bos)
        self.takes_prefix = bool(getattr(self.tower, "states", False))
        self._empty: Any = self.tower.empty_prefix() if self.takes_prefix else None
        self.prefixes: Any = None
        self.traced: Any = None
        self._lock = threading.Lock()
        if tokenize is not None:
            self.traced = self._trace(tokenize)

    def empty_prefix(self) -> Any:
        """prefix_keys of no tokens (None where the tower takes none)."""
        return self._empty

    def _trace(self, tokenize: Callable[[list[str]], Any]) -> Any:
        """Traced on two queries of different lengths (so the trace packs a padded batch), their tokens after a
        prefix of two given to both (its values do not matter to the trace), checked on one query and on eight
        padded to a third length, given none."""

        def differs(eager: Any, traced: Any) -> str | None:
            if isinstance(eager, tuple):
                eager, traced = eager[0], traced[0]
            worst = float(
                np.min(np.sum(normalize(eager.float().numpy()) * normalize(traced.float().numpy()), 1))
            )
            return f"worst cosine {worst:.6f} to eager mode" if worst < TRACE_FLOOR else None

        try:
            inputs = [tokenize(texts) for texts in (PROBES[1:3], PROBES[:1], PROBES)]
        except Exception as exc:
            log.warning("the bf16 text tower runs in eager mode: the probes cannot be tokenized (%s)", exc)
            return None
        pairs: list[tuple[Any, ...]] = [(enc["input_ids"], enc["attention_mask"]) for enc in inputs]
        example, *checks = pairs
        e: Any = self._empty
        if e is not None:  # the prefixed graph: each query's tokens after its prefix (text_pooled.make)
            import torch

            ids, mask = example[0][:, 3:], example[1][:, 3:]
            two = e.new_zeros((e.shape[0], e.shape[1], 2, e.shape[3]))
            start = torch.full((ids.shape[0],), 3, dtype=torch.int64)
            example = (ids, mask, start, two, two, torch.ones((ids.shape[0], 2)))
            checks = [self._whole(c[0], c[1]) for c in checks]
        return trace_checked("bf16 text tower", self.tower, example, checks, differs)

    def _whole(self, input_ids: Any, attention_mask: Any) -> tuple[Any, ...]:
        """The prefixed graph's inputs for whole rows given no prefix: what the trace is checked on."""
        import torch

        batch = input_ids.shape[0]
        start = torch.ones((batch,), dtype=torch.int64)
        return (
            input_ids[:, 1:],
            attention_mask[:, 1:],
            start,
            self._empty,
            self._empty,
            torch.zeros((batch, 0)),
        )

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        import torch

        from loupe.models import text_prefix

        # A trace runs side by side from several threads (text passes under load, models/batching.py); eager mode,
        # the fallback, one pass at a time as it always has.
        run = self.traced if self.traced is not None else self.tower
        with self._lock if self.traced is None else contextlib.nullcontext(), torch.inference_mode():
            if not self.takes_prefix:
                return normalize(run(input_ids, attention_mask).float().numpy())

            def prefixed(plan: Any, ids: np.ndarray, mask: np.ndarray, start: np.ndarray) -> Any:
                tensors = (torch.from_numpy(a) for a in (ids, mask, start))
                return run(*tensors, plan.keys, plan.values, torch.from_numpy(plan.allowed))

            emb = text_prefix.encode(self.prefixes, self._empty, input_ids, attention_mask, prefixed)
            return normalize(emb.float().numpy())


def cpu_has_bf16() -> bool:
    """Whether torch's CPU kernels (oneDNN) run bf16 here (AVX-512 or newer). Where they do not (AVX2-only CPUs)
    the bf16 copies are far slower than fp32: the image tower's 1.7 pictures/s against 14 on an AMD EPYC with AVX2
    (/tmp probe), so `auto` does not spend start-up time timing them. Unknown (an older torch): True, the timing
    decides."""
    import torch

    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except Exception:  # not built into this torch: the timing decides
        return True


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Seconds of the fastest of `repeat` runs of `fn`, after one to warm up."""
    return fastest_interleaved({"run": fn}, repeat)["run"]


def attach(clip: Any, mode: str, gain_needed: float | None = None, memory: ChoiceMemory | None = None) -> str:
    """Route micro-batches to a bf16 copy of the text tower when `mode` is on, or auto and it measures at least
    `gain_needed` (default BATCH_GAIN) times faster. With a `memory`, `auto` reuses the verdict an earlier start
    timed for this model, text runtime and machine (the copy, where used, still checked against fp32) and records
    the ones it times. Returns a description for health: "" (not used) or "bf16 from N queries" (N = 1: every
    text query)."""
    clip.text_batch_tower, clip.text_batch_min = None, 0
    gain_needed = BATCH_GAIN if gain_needed is None else gain_needed
    if mode == "off" or clip.info.device != "cpu":
        return ""
    key = entry = None
    if mode == "auto" and memory is not None:
        key = memory.key(
            "text-batches",
            clip.info.fingerprint,
            runtime=clip.text_runtime,
            threads=clip.threads,
            gain=gain_needed,
            sizes=PROBE_SIZES,
            graph=text_pooled.GRAPH,
        )
        entry = memory.get(key)
        if entry is not None and not isinstance(entry.get("start"), int):
            entry = None
        if entry is not None:
            clip.runtime_choices["text_batches"] = described(entry)
            if entry["start"] == 0:  # slower than the runtime in use here: not even built
                log.info(
                    "bf16 text tower: not used (%s; delete %s to time again)", described(entry), memory.path
                )
                return ""
    try:
        tower = Bf16TextTower(clip.model, clip.tokenize)
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
    elif entry is not None:
        start = int(entry["start"])
        log.info("bf16 text tower: from %d queries (%s)", start, described(entry))
    else:
        with TimingWindow(clip.threads) as window:
            for size in PROBE_SIZES:
                part = clip.tokenize(PROBES[:size])
                gain = best_of(partial(clip.embed_texts, PROBES[:size])) / best_of(
                    partial(clip.torch_pass, partial(tower, part["input_ids"], part["attention_mask"]))
                )
                log.info("bf16 text tower on %d queries: %.2fx the %s runtime", size, gain, clip.text_runtime)
                if gain >= gain_needed:
                    start = size
                    break
        if memory is not None and key is not None:
            memory.put(key, window=window, start=start)
        clip.runtime_choices["text_batches"] = timed(window)
    if not start:
        return ""
    clip.text_batch_tower, clip.text_batch_min = tower, start
    log.info(
        "text query batches of %d or more run on a bf16 copy of the text tower (worst cosine %.6f)",
        start,
        worst,
    )
    return f"bf16 from {start} {'query' if start == 1 else 'queries'}"
