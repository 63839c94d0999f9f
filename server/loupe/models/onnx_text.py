"""The text tower through ONNX Runtime on the CPU: the query-time hot path.

The text tower (transformer + projection, computing only what the pooled embedding depends on:
models/text_pooled.py) is exported once per model fingerprint into the data directory, with the batch and sequence
length dynamic so a query runs only its real tokens. Two quantized kinds are made from that export:
- `onnx-w8`: 8-bit weights with one scale per block of input channels (ONNX Runtime's MatMulNBits), the
  activations quantized per block too at run time (accuracy level 4: int8 dot products), smoothed first where
  the smoothing folds into the graph (models/smoothing.py: folded). Blocks of 128 where the CPU has VNNI, 32
  elsewhere (w8_block). On a real-weights text encoder (MiniLM, bench/int8_text_bench.py) query vectors keep a
  mean cosine of 0.9997 to fp32 and about 98.7% of the top 10 with blocks of 128 (bf16 rounding: 0.9999 and
  99.5%); ViT-B/32's text tower runs one query 1.5-1.9x faster than on fp32.
- `onnx-int8`: 8-bit weights with one scale per output channel and one activation scale per tensor
  (`quantize_dynamic`), each matmul's input smoothed first (models/smoothing.py: the activation outliers one
  scale per tensor cannot represent move into the per-channel weight scales): faster still (2.0x one query, 2.2x
  batches of 8), but 0.9950-0.9981 and 96.3% of the top 10 on MiniLM (without smoothing 0.9883-0.9936 and
  93.8%). The weights are int8 where the CPU has VNNI and uint8 on x86 CPUs without it, where int8 ones
  saturate (int8_unsigned_weights).
`auto` (the default) serves `onnx-w8` where it passes its cosine floor, times at least AUTO_GAIN faster than `onnx`
on one query and gains there more than it loses on a pass of several queries (w8_wins), else `onnx`; the verdict
is remembered per model and machine (models/runtime_choice.py).
Every export is checked against torch on probe queries before it is used: below the cosine floor it is refused and
torch keeps serving (the log says why). Image vectors come from the image runtime (models/image_runtime.py), never
from this choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loupe.config import Settings
from loupe.models import runtime_choice, text_pooled
from loupe.models.runtime_choice import ChoiceMemory, TimingWindow, described, fastest_interleaved, timed
from loupe.models.vectors import normalize

log = logging.getLogger(__name__)

PROBES = [
    "a photo of a cat",
    "a red bicycle against a brick wall",
    "sunset",
    "two people walking a dog on the beach at dawn, with long shadows",
    "a hand-drawn sketch of a house",
    "screenshot of an error message",
]
COSINE_FLOOR = {"onnx": 0.9999, "onnx-w8": 0.999, "onnx-int8": 0.99}
# The single-query speed-up over `onnx` that makes `auto` take `onnx-w8` (ViT-B/32 on an AMD EPYC Zen 5: 1.7-1.9x).
AUTO_GAIN = 1.2
# MatMulNBits' block of input channels sharing a scale, on CPUs with VNNI and without (w8_block).
W8_BLOCK_VNNI, W8_BLOCK_PLAIN = 128, 32
# Export files: PREFIX-<fingerprint><SUFFIX>.onnx. The prefix names the exported graph ("text5": the pooled tower
# of models/text_pooled.py taking kept prefixes' states, each query its own; "text4": one prefix for the whole
# pass, never released; "text3": the same without prefixes, a batch packed into its real tokens; "text2": the
# pooled tower on the padded batch; "text": transformers' whole forward pass), the suffix the quantization ("-int8c":
# per-channel scales, which replaced per-tensor "-int8"; "-int8s": per-channel scales after smoothing, which
# replaced "-int8c"; "-int8u": the same with unsigned weights, see int8_unsigned_weights; "-w8s<block>": 8-bit
# blocks after folded smoothing, which replaced unsmoothed blocks of 32, "-w8b32"), so an export of another kind
# is never reused.
PREFIX = "text5"
SUFFIX = {"onnx": "", "onnx-int8": "-int8s"}
W8_SUFFIX = "-w8s"  # onnx-w8's, followed by its block (suffix)
LEGACY_W8 = "-w8b"  # unsmoothed onnx-w8 exports: deleted at attach
# x86 CPU flags with which ONNX Runtime's int8 matmuls (MLAS) take VNNI dot products, exact for signed weights.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def w8_block(flags: frozenset[str] | None = None) -> int:
    """`onnx-w8`'s block of input channels: 128 where ONNX Runtime's blocked int8 products have VNNI, else 32.
    On an AMD EPYC Zen 4 (AVX512-VNNI; bench/RESULTS.md, "Kept on 2026-12-07, twenty-eighth box") ViT-B/32's text
    tower ran passes of 4 queries on one thread 1.23x faster with blocks of 128 than of 32 and one query about
    1.2x faster; on an AVX2-only Zen 3 blocks of 128 ran one MiniLM query slower (4.12 against 3.50 ms). Larger
    blocks quantize the activations more coarsely: the folded smoothing (models/smoothing.py) pays for that."""
    flags = runtime_choice.cpu_flags() if flags is None else flags
    return W8_BLOCK_VNNI if flags & VNNI_FLAGS else W8_BLOCK_PLAIN


def int8_unsigned_weights(flags: frozenset[str] | None = None, arch: str | None = None) -> bool:
    """Whether `onnx-int8` stores its weights as uint8 rather than int8 on this CPU: on x86 without VNNI.

    There ONNX Runtime multiplies uint8 activations by int8 weights with `vpmaddubsw`, which adds each pair of
    products into an int16 and saturates: a tensor's largest activations times large weights overflow it. ONNX
    Runtime's own advice is 7-bit weights (`reduce_range`); uint8 weights take its uint8 x uint8 kernels, which
    widen to int16 before multiplying and lose nothing. On an AMD EPYC Zen 3 (AVX2 only): all-MiniLM-L6-v2's real
    weights (bench/int8_text_bench.py) kept a mean / worst cosine to fp32 of 0.9958 / 0.9924 and 94.9% of the top
    10 with int8 weights, 0.9969 / 0.9917 and 95.3% with 7-bit ones, 0.9986 / 0.9956 and 96.8% with uint8 ones (an
    Ice Lake with VNNI, int8 weights: 0.9981 / 0.9950 and 96.3%). ViT-B/32's text tower ran batches of 4 on one
    thread at 208-213 queries/s with uint8 weights against 241-254 with int8 ones and 127-130 on fp32."""
    flags = runtime_choice.cpu_flags() if flags is None else flags
    arch = platform.machine() if arch is None else arch
    return arch.lower() in ("x86_64", "amd64", "i386", "i686") and not flags & VNNI_FLAGS


UNSIGNED_SUFFIX = "-int8u"  # onnx-int8's export with uint8 weights


def suffix(kind: str) -> str:
    """The export file's suffix for `kind` on this CPU."""
    if kind == "onnx-w8":
        return f"{W8_SUFFIX}{w8_block()}"
    return UNSIGNED_SUFFIX if kind == "onnx-int8" and int8_unsigned_weights() else SUFFIX[kind]


# An export of another model (an earlier fingerprint, a fine-tuned version rolled back from, a model compared by
# `loupe eval`) not used for this long is deleted at start: each costs 250-350 MB of disk for ViT-B/32.
UNUSED_DAYS = 30
# An unfinished export (`.tmp`: a process stopped while writing it) older than this is deleted at start.
STALE_TMP_S = 3600.0


def mark_used(path: Path) -> None:
    """Record that an export was loaded now (its modification time: what prune_exports goes by)."""
    with contextlib.suppress(OSError):  # a read-only data directory: nothing is pruned from it either
        os.utime(path)


def prune_exports(cache_dir: Path, now: float | None = None) -> list[Path]:
    """Delete the exports in `cache_dir` not loaded for UNUSED_DAYS and unfinished ones older than STALE_TMP_S;
    the files deleted."""
    now = time.time() if now is None else now
    gone = []
    for path in sorted(cache_dir.glob("*.onnx")) + sorted(cache_dir.glob("*.tmp")):
        try:
            age = now - path.stat().st_mtime
            if age > (STALE_TMP_S if path.suffix == ".tmp" else UNUSED_DAYS * 86400):
                path.unlink()
                gone.append(path)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    if gone:
        log.info(
            "deleted %d ONNX exports not used for %d days (or unfinished): %s",
            len(gone),
            UNUSED_DAYS,
            ", ".join(p.name for p in gone),
        )
    return gone


def cpu_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime session on the CPU on `threads` intra-op threads (0: its default, one per core), all graph
    optimizations on, its threads not busy-waiting between runs: spinning, they took the cores that the bf16 copy,
    torch or the next picture's decoding needed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    mark_used(path)
    return session


class OnnxTextTower:
    """The exported pooled tower. Where its graph takes prefix states (models/text_pooled.py, `states`: every
    model with a start token), `prefixes` (a models/text_prefix.py PrefixCache, set once the runtime is chosen, so
    that nothing kept speeds up the timings that choose it) gives each query of a pass the longest kept prefix it
    starts with and keeps the new ones."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.session = cpu_session(path, threads)
        self.path = path
        names = [i.name for i in self.session.get_inputs()]
        self.takes_prefix = "prefix_keys" in names
        self.state_names = [o.name for o in self.session.get_outputs()][1:]
        self.prefixes: Any = None
        self._empty: np.ndarray | None = None
        if self.takes_prefix:  # prefix_keys of no tokens, (layers, heads, 0, head_dim): the outputs' shape
            _, heads, _, head_dim = self.session.get_outputs()[1].shape
            self._empty = np.zeros((len(self.state_names) // 2, heads, 0, head_dim), np.float32)

    def empty_prefix(self) -> np.ndarray | None:
        """prefix_keys of no tokens (None where the graph takes none)."""
        return self._empty

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # The pooled tower packs the batch by its attention mask (an export of the earlier graph, which took none,
        # is deleted at attach).
        if not self.takes_prefix:
            feed = {
                "input_ids": input_ids.astype(np.int64),
                "attention_mask": attention_mask.astype(np.int64),
            }
            (out,) = self.session.run(None, feed)
            return normalize(out)
        from loupe.models import text_prefix

        def run(plan: Any, ids: np.ndarray, mask: np.ndarray, start: np.ndarray) -> list[np.ndarray]:
            feed = {"input_ids": ids, "attention_mask": mask, "start": start}
            feed.update(prefix_keys=plan.keys, prefix_values=plan.values, prefix_allowed=plan.allowed)
            names = ["embedding", *self.state_names] if plan.capture else ["embedding"]
            return self.session.run(names, feed)  # type: ignore[no-any-return]

        return normalize(text_prefix.encode(self.prefixes, self._empty, input_ids, attention_mask, run))


_export_lock = threading.Lock()


def export_module(
    module: Any,
    args: tuple[Any, ...],
    out: Path,
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    output_names: list[str] | None = None,
) -> None:
    """Export `module(*args) -> embedding` (or the outputs `output_names`) to ONNX, the inputs named `input_names`,
    the axes in `dynamic_axes` dynamic (the legacy TorchScript exporter: the dynamo one needs onnxscript)."""
    import torch

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks the export fixes
        torch.onnx.export(
            module,
            args,
            str(out),
            input_names=input_names,
            output_names=output_names or ["embedding"],
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )


def export_encoder(module: Any, input_ids: Any, attention_mask: Any, out: Path) -> None:
    """Export a text encoder `module(input_ids, attention_mask) -> embedding` to ONNX with the batch and the
    number of tokens dynamic."""
    tokens = {0: "batch", 1: "tokens"}
    names = ["input_ids", "attention_mask"]
    export_module(module, (input_ids, attention_mask), out, names, dict.fromkeys(names, tokens))


@contextlib.contextmanager
def quiet_quantizers() -> Iterator[None]:
    """ONNX Runtime's quantizers log every tensor through the root logger, and importing its MatMulNBits quantizer
    calls `logging.basicConfig(level=INFO)`: in a process without logging set up (an embedder, a benchmark) every
    library's INFO records, httpx's line per request among them, would be printed from then on. Inside, records
    under WARNING are dropped; on leaving, the root logger's level and handlers are put back as they were."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def quantize_w8(src: Path, dst: Path, block: int) -> None:
    """`onnx-w8`: every MatMul with constant weights as MatMulNBits, 8-bit symmetric weights in blocks of `block`
    input channels, int8 dot products (accuracy level 4)."""
    import onnx

    with quiet_quantizers():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=8, block_size=block, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def export(clip: Any, target: Path, kind: str) -> Path:
    """Export (and for onnx-w8 and onnx-int8 quantize) the text tower of `clip` to `target`; atomic, cached by the
    caller."""
    target.parent.mkdir(parents=True, exist_ok=True)
    end = suffix(kind)
    with _export_lock:
        if target.exists():
            return target
        tmp, smooth = target.with_suffix(".tmp"), target.with_suffix(".smooth.tmp")
        if kind == "onnx":
            export_pooled(clip, clip.model.text_model, clip.model.text_projection, tmp)
        else:  # the quantized kinds quantize their own smoothed graphs
            try:
                export_smoothed(clip, smooth, folded=kind == "onnx-w8")
                if kind == "onnx-w8":
                    # The file's name says its block: one decision for both. quantize_w8 quiets its quantizer itself.
                    quantize_w8(smooth, tmp, int(end.removeprefix(W8_SUFFIX)))
                else:
                    with quiet_quantizers():
                        from onnxruntime.quantization import QuantType, quantize_dynamic

                        # The file's name says which weights it holds: one decision for both.
                        weights = QuantType.QUInt8 if end == UNSIGNED_SUFFIX else QuantType.QInt8
                        quantize_dynamic(str(smooth), str(tmp), weight_type=weights, per_channel=True)
            finally:
                smooth.unlink(missing_ok=True)
        tmp.replace(target)
    return target


def calibrate_text_tower(clip: Any) -> tuple[Any, dict[str, Any]]:
    """The text tower's parts ({"text", "projection"}: `clip`'s own modules) and max |x| per input channel of each
    of their Linears over smoothing.CALIBRATION, in one pass of the pooled tower: it packs the queries into their
    real tokens, so no padding token's activations count."""
    import torch

    from loupe.models import smoothing

    parts = torch.nn.ModuleDict({"text": clip.model.text_model, "projection": clip.model.text_projection})
    tower = text_pooled.make(parts["text"], parts["projection"], text_pooled.bos_token_id(clip.tokenize))
    enc = clip.tokenize(smoothing.CALIBRATION)
    return parts, smoothing.calibrate(parts, lambda: tower(enc["input_ids"], enc["attention_mask"]))


def export_smoothed(clip: Any, out: Path, folded: bool = False) -> None:
    """The pooled text tower smoothed (models/smoothing.py), calibrated on smoothing.CALIBRATION, exported in fp32:
    every weight matmul's input divided by its factors (what `onnx-int8` quantizes), or with `folded` the factors
    folded into the operations before the matmuls (what `onnx-w8` quantizes)."""
    from loupe.models import smoothing

    parts, amax = calibrate_text_tower(clip)
    smooth = smoothing.folded(parts, amax) if folded else smoothing.smoothed(parts, amax)
    export_pooled(clip, smooth["text"], smooth["projection"], out)


def export_pooled(clip: Any, text_model: Any, projection: Any, out: Path) -> None:
    """The pooled text tower (models/text_pooled.py) of `text_model` and `projection`, exported in fp32; with a
    start token, the graph that takes kept prefixes' states and returns each layer's (`states`): inputs input_ids,
    attention_mask, start, prefix_keys, prefix_values, prefix_allowed; outputs embedding, keys_0.., values_0..."""
    import torch

    enc = clip.tokenize(PROBES[:2])
    tower = text_pooled.make(text_model, projection, text_pooled.bos_token_id(clip.tokenize), states=True)
    if not tower.states:
        export_encoder(tower, enc["input_ids"], enc["attention_mask"], out)
        return
    # Traced on the probes' tokens after a prefix of two (start 3; its states' values do not matter to the graph),
    # given to both queries, every length dynamic.
    empty = tower.empty_prefix()
    prefix = empty.new_zeros((empty.shape[0], empty.shape[1], 2, empty.shape[3]))
    ids, mask = enc["input_ids"][:, 3:], enc["attention_mask"][:, 3:]
    start = torch.full((ids.shape[0],), 3, dtype=torch.int64)
    allowed = torch.ones((ids.shape[0], 2))
    tokens, given = {0: "batch", 1: "tokens"}, {2: "prefix"}
    layers = [f"keys_{i}" for i in range(tower.layers)] + [f"values_{i}" for i in range(tower.layers)]
    axes = {"input_ids": tokens, "attention_mask": tokens, "start": {0: "batch"}}
    axes.update({"prefix_keys": given, "prefix_values": given, "prefix_allowed": {0: "batch", 1: "prefix"}})
    axes.update({name: {2: "columns"} for name in layers})
    names = ["input_ids", "attention_mask", "start", "prefix_keys", "prefix_values", "prefix_allowed"]
    args = (ids, mask, start, prefix, prefix, allowed)
    export_module(tower, args, out, names, axes, ["embedding", *layers])


def attach_for_settings(clip: Any, settings: Settings) -> str:
    """`attach` as configured: LOUPE_MODEL__TEXT_RUNTIME, the export cache in the data directory, torch's threads;
    then the bf16 copy for micro-batches (LOUPE_MODEL__TEXT_BATCHES_BF16), timed against the runtime chosen. On the
    torch thread, like every multi-threaded torch pass (models/torch_thread.py)."""
    from loupe.models import torch_thread

    return torch_thread.call(_attach_for_settings, clip, settings)


def _attach_for_settings(clip: Any, settings: Settings) -> str:
    from loupe.models import bf16_text

    memory = ChoiceMemory(settings.data_dir / "models")
    cache_dir, threads = settings.data_dir / "models" / "onnx", settings.model.torch_threads
    if settings.model.text_runtime == "auto":
        clip.text_runtime = attach_auto(clip, cache_dir, threads, memory)
    else:
        clip.text_runtime = attach(clip, settings.model.text_runtime, cache_dir, threads)
    mode = settings.model.text_batches_bf16
    if mode == "auto" and not bf16_text.cpu_has_bf16():
        log.info("this CPU has no bf16 kernels: the bf16 text tower is not tried")
        mode = "off"
    clip.text_batches = bf16_text.attach(clip, mode, memory=memory)
    clip.text_threads_under_load = settings.model.text_threads_under_load
    if clip.text_batch_tower is not None and clip.text_batch_min <= 1 and clip.text_tower is not None:
        # The bf16 copy takes every query, so the ONNX Runtime session would never run: its weights are freed.
        clip.text_tower = None
        clip.text_runtime = "bf16"
    for tower in (clip.text_tower, clip.text_batch_tower):
        keep_prefixes(tower, settings.model.text_prefix_cache_mb)
    return clip.text_runtime


def keep_prefixes(tower: Any, budget_mb: int) -> None:
    """Give a text tower whose graph takes prefix states (the ONNX Runtime one, the bf16 copy) a cache of them
    (models/text_prefix.py), each its own, once the runtimes are chosen: kept prefixes would speed up the timings
    that choose them."""
    from loupe.models import text_prefix

    if getattr(tower, "takes_prefix", False) and budget_mb > 0:
        tower.prefixes = text_prefix.PrefixCache(budget_mb << 20, tower.empty_prefix())


def export_path(clip: Any, cache_dir: Path, kind: str) -> Path:
    return cache_dir / f"{PREFIX}-{clip.info.fingerprint}{suffix(kind)}.onnx"


def attach(clip: Any, kind: str, cache_dir: Path, threads: int = 0) -> str:
    """Serve `clip`'s text queries through ONNX Runtime when `kind` asks for it and the export checks out.
    Returns the runtime in use: torch, onnx or onnx-int8."""
    if kind == "torch" or clip.info.device != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning(
            "LOUPE_MODEL__TEXT_RUNTIME=%s but onnxruntime is not installed: text queries use torch", kind
        )
        return "torch"
    path = export_path(clip, cache_dir, kind)
    # An export of this model's earlier graphs (prefixes "text", "text2") or unsmoothed onnx-w8 is never used again.
    for old in cache_dir.glob(f"text*-{clip.info.fingerprint}*.onnx"):
        if not old.name.startswith(f"{PREFIX}-") or LEGACY_W8 in old.name:
            old.unlink(missing_ok=True)
    try:
        if not path.exists():
            log.info("exporting the text tower to ONNX (%s), once per model: %s", kind, path)
        tower = OnnxTextTower(export(clip, path, kind), threads)
        ref = clip.embed_texts_torch(PROBES)
        enc = clip.tokenize(PROBES, "np")
        got = tower(enc["input_ids"], enc["attention_mask"])
        worst = float(np.min(np.sum(ref * got, axis=1)))
    except Exception as exc:  # an export problem must not stop the server: torch serves
        for stale in {path, export_path(clip, cache_dir, "onnx")}:
            stale.unlink(missing_ok=True)  # rebuilt at the next start
        log.warning(
            "the ONNX text tower could not be built (%s: %s): text queries use torch", type(exc).__name__, exc
        )
        return "torch"
    if worst < COSINE_FLOOR[kind]:
        log.warning(
            "the ONNX text tower (%s) differs from torch (worst cosine %.5f < %.4f): text queries use torch",
            kind,
            worst,
            COSINE_FLOOR[kind],
        )
        return "torch"
    clip.text_tower = tower
    weights = (
        ", uint8 weights: this CPU has no VNNI" if kind == "onnx-int8" and int8_unsigned_weights() else ""
    )
    log.info("text queries run on ONNX Runtime (%s%s), worst cosine to torch %.6f", kind, weights, worst)
    return kind


def w8_wins(one: float, together: float) -> bool:
    """Whether `auto` takes `onnx-w8` from its speed-ups over `onnx`: `one` on single queries (a lone search's
    latency), `together` on one pass of several (what micro-batches hold under load). It must run one query at
    least AUTO_GAIN faster, and gain more there than it loses together (one * together >= 1). On an AVX2-only AMD
    Zen 3, whose int8 dot products have no VNNI, it ran one query 1.04-1.33x faster but the six probes in one pass
    0.65-0.95x as fast; served at 1M (bench/RESULTS.md, "A/B at 1M, AVX2: onnx-w8 (auto's remembered choice)
    against onnx") a lone search took 25.3 against 27.1 ms on `onnx`, but concurrency 8 served 62 against 66
    searches/s (62 against 78 for queries of 1-12 words). Where it is faster both ways (AVX-512 CPUs: 1.5-1.9x
    alone, about 1.2x together in blocks of 32; a Zen 4 in blocks of 128: 1.91x and 1.54x) nothing changes."""
    return one >= AUTO_GAIN and one * together >= 1.0


def attach_auto(clip: Any, cache_dir: Path, threads: int = 0, memory: ChoiceMemory | None = None) -> str:
    """`auto`: `onnx-w8` where it passes its cosine floor and w8_wins from its speed-ups over `onnx` on the probes,
    timed one at a time (as a lone search runs) and all in one pass (as a micro-batch under load), the four runs
    interleaved (runtime_choice.fastest_interleaved), else `onnx` (torch where ONNX Runtime cannot serve). With a
    `memory`, the verdict an earlier start timed for this model and machine is reused (its export still checked
    against torch) and a new one is recorded."""
    if clip.info.device != "cpu":
        return "torch"
    key = None
    if memory is not None:
        key = memory.key(
            "text-runtime",
            clip.info.fingerprint,
            threads=threads,
            gain=AUTO_GAIN,
            block=w8_block(),
            w8="folded",  # not the verdicts timed on unsmoothed blocks
            graph=text_pooled.GRAPH,
            # Not the verdicts timed on single queries alone, nor those timed one runtime after the other.
            together=len(PROBES),
            timing="interleaved",
        )
        entry = memory.get(key)
        if entry is not None and entry.get("kind") in ("onnx", "onnx-w8"):
            clip.runtime_choices["text_runtime"] = described(entry)
            log.info("text runtime: %s (%s)", entry["kind"], described(entry))
            got = attach(clip, entry["kind"], cache_dir, threads)
            if got == "torch" and entry["kind"] == "onnx-w8":  # its export no longer checks out: fp32 serves
                got = attach(clip, "onnx", cache_dir, threads)
            return got
    if attach(clip, "onnx", cache_dir, threads) != "onnx":
        return "torch"  # no ONNX Runtime or no export here: nothing to time
    fp32 = clip.text_tower
    chosen, why = "onnx", "onnx-w8 failed its check"
    window = None  # nothing timed where onnx-w8 does not check out
    if attach(clip, "onnx-w8", cache_dir, threads) == "onnx-w8":
        w8 = clip.text_tower
        probes = [clip.tokenize([q], "np") for q in PROBES]
        batch = clip.tokenize(PROBES, "np")

        def one_by_one(tower: Any) -> None:
            for enc in probes:
                tower(enc["input_ids"], enc["attention_mask"])

        def together(tower: Any) -> None:
            tower(batch["input_ids"], batch["attention_mask"])

        with TimingWindow(clip.threads) as window:
            took = fastest_interleaved(
                {
                    "onnx": lambda: one_by_one(fp32),
                    "onnx-w8": lambda: one_by_one(w8),
                    "onnx together": lambda: together(fp32),
                    "onnx-w8 together": lambda: together(w8),
                }
            )
        one = took["onnx"] / took["onnx-w8"]
        many = took["onnx together"] / took["onnx-w8 together"]
        why = f"{one:.2f}x onnx on one query, {many:.2f}x on {len(PROBES)} in one pass"
        if w8_wins(one, many):
            chosen = "onnx-w8"
    if chosen == "onnx":
        clip.text_tower = fp32
        export_path(clip, cache_dir, "onnx-w8").unlink(missing_ok=True)  # not loaded again while remembered
    log.info("text runtime: %s (onnx-w8: %s)", chosen, why)
    if memory is not None and key is not None:
        memory.put(key, window=window, kind=chosen, why=why)
    clip.runtime_choices["text_runtime"] = timed(window)
    return chosen
