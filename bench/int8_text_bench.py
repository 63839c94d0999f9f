"""What 8-bit weights do to a text encoder with real weights: the evidence behind the quantized CLIP text towers'
schemes, behind `auto` serving `onnx-w8`, behind smoothing `onnx-int8`'s inputs and behind keeping it opt-in.

    python bench/int8_text_bench.py [--queries 300] [--write]

No real CLIP weights are reachable offline; the checks of the ONNX int8 text tower (cosine to torch >= 0.99 on
probe queries) were only ever run on random weights. all-MiniLM-L6-v2 ships with real weights (the OCR channel's
encoder), so it stands in: a BERT-style transformer of the same kind as CLIP's text tower. It goes through the
same path as Loupe's text tower (server/loupe/models/onnx_text.py): exported to ONNX, quantized by ONNX Runtime's
`quantize_dynamic` once with one scale per weight tensor (what `onnx-int8` did first), once with one scale per
output channel (what it did next) and after smoothing (what it does now, below), and by Loupe's `quantize_w8`
(8-bit weights in blocks of 32 and of 128 input channels, int8 dot products), unsmoothed (what `onnx-w8` did
before) and after the smoothing `onnx-w8` folds into CLIP's text tower (w8_smoothed: blocks of 128 where the CPU
has VNNI, 32 elsewhere), run one query at a time on ONNX Runtime. Short queries
(the first six words of a Debian package description) are searched against the 60k fp32 description embeddings
of bench/vectors.py. torch bf16 is measured beside them for its accuracy.

Smoothed rows: per-channel int8 after SmoothQuant-style smoothing (Xiao et al., 2023; server/loupe/models/
smoothing.py). Each weight matmul's input is divided per channel by s_j = max|x_j|^a / max|W_j|^(1-a) (max|x_j|
from calibration queries disjoint from the measured ones) and the weight's input rows multiplied by it: the same
function in fp32, but the activation outliers one scale per tensor cannot represent move into the per-channel
weight scales. `onnx-int8` does this with a = 0.8 on every matmul. Rows with `fc2 in fp32` (not used) leave the
feed-forward output matmul, whose input comes after the GELU, unquantized. Weights: int8 where the CPU has VNNI
dot products; on x86 CPUs without VNNI ONNX Runtime's uint8 x int8 products saturate in int16 pairs (`vpmaddubsw`),
so `onnx-int8` stores uint8 weights there (server/loupe/models/onnx_text.py: int8_unsigned_weights); the `7-bit
weights` row (not used) is ONNX Runtime's own remedy, `reduce_range`. On a CPU with VNNI the three rows differ
only by their rounding. The `one activation scale per token` row (not used) runs the smoothed graph with this
CPU's weights and a symmetric activation scale per token instead of one per tensor (per_token_scales).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_section
from vectors import CACHE, debian_descriptions, minilm


def export_minilm(enc: Any, out: Path) -> None:
    import torch

    class MeanPooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = enc.model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            w = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * w).sum(1) / w.sum(1)

    from loupe.models.onnx_text import export_encoder

    b = enc.tokenizer(["a photo of a cat", "two words"], padding=True, return_tensors="pt")
    export_encoder(MeanPooled().eval(), b["input_ids"], b["attention_mask"], out)


def per_token_scales(src: Path, dst: Path) -> None:
    """`quantize_dynamic`'s graph with one activation scale per token instead of one per tensor: each
    DynamicQuantizeLinear (asymmetric uint8, one scale for the whole input) becomes max|x| / 127 over each row,
    the row divided by it, rounded and offset by 128 (symmetric, so the zero point stays one scalar, which is all
    ONNX Runtime's MatMulInteger takes). The Mul of the two scales after each MatMulInteger then broadcasts one
    scale per row. ONNX Runtime's MatMulIntegerToFloat fusion assumes a scalar activation scale, so this graph runs
    with that fusion disabled (run_onnx's `disabled`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), "tok_axes"),
            numpy_helper.from_array(np.array(1e-8, np.float32), "tok_eps"),
            numpy_helper.from_array(np.array(1 / 127, np.float32), "tok_step"),
            numpy_helper.from_array(np.array(128, np.float32), "tok_offset"),
            numpy_helper.from_array(np.array(128, np.uint8), "tok_zero_point"),
        ]
    )
    nodes = []
    for n in graph.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        (x,), (xq, xs, xzp), p = n.input, n.output, n.name
        nodes += [
            helper.make_node("Abs", [x], [p + "_abs"]),
            helper.make_node("ReduceMax", [p + "_abs", "tok_axes"], [p + "_amax"], keepdims=1),
            helper.make_node("Max", [p + "_amax", "tok_eps"], [p + "_amax_eps"]),
            helper.make_node("Mul", [p + "_amax_eps", "tok_step"], [xs]),
            helper.make_node("Div", [x, xs], [p + "_scaled"]),
            helper.make_node("Round", [p + "_scaled"], [p + "_rounded"]),
            helper.make_node("Add", [p + "_rounded", "tok_offset"], [p + "_offset"]),
            helper.make_node("Cast", [p + "_offset"], [xq], to=TensorProto.UINT8),
            helper.make_node("Identity", ["tok_zero_point"], [xzp]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    for opset in model.opset_import:  # ReduceMax takes its axes as an input from opset 18
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 18)
    onnx.save(model, str(dst))


def w8_smoothed(model: Any, amax: dict[str, Any]) -> Any:
    """MiniLM with the smoothing `onnx-w8` folds into CLIP's text tower (server/loupe/models/smoothing.py:
    folded): one factor shared by the query, key and value projections, one for the attention's output projection
    and one for the first feed-forward matmul, a = FOLD_ALPHA, the second feed-forward matmul left as it is. A
    BERT's layer norms come after its residual adds, so their outputs also carry the residual and the factors
    cannot fold into them: here they run as one division before each matmul (the same function, and the same
    rounding as folded; only the time column pays for the divisions)."""
    from loupe.models import smoothing

    out = copy.deepcopy(model)
    for i, layer in enumerate(out.encoder.layer):
        at, a = f"encoder.layer.{i}.", layer.attention
        groups = [
            (at + "attention.self.query", a.self, ("query", "key", "value")),
            (at + "attention.output.dense", a.output, ("dense",)),
            (at + "intermediate.dense", layer.intermediate, ("dense",)),
        ]
        for key, parent, names in groups:
            lins = [getattr(parent, n) for n in names]
            s = smoothing.factors(amax[key], [lin.weight for lin in lins], smoothing.FOLD_ALPHA)
            for n, lin in zip(names, lins, strict=True):
                setattr(parent, n, smoothing.divided(lin, s))
    return out


def run_onnx(
    path: Path, tokenizer: Any, queries: list[str], disabled: tuple[str, ...] = ()
) -> tuple[np.ndarray, float]:
    """One query at a time, as a search runs: (unit vectors, median ms per query). `disabled`: ONNX Runtime graph
    optimizers to leave out."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
    )
    out, took = [], []
    for q in queries[:8] + queries:
        enc = tokenizer([q], return_tensors="np")
        t = time.perf_counter()
        (vec,) = session.run(
            None,
            {
                "input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64),
            },
        )
        took.append(time.perf_counter() - t)
        out.append(vec)
    vecs = np.concatenate(out[8:])
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True), float(np.median(took[8:]) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import onnx
    import onnxruntime
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from loupe.models import smoothing
    from loupe.models.onnx_text import (
        W8_BLOCK_PLAIN,
        W8_BLOCK_VNNI,
        int8_unsigned_weights,
        quantize_w8,
        w8_block,
    )
    from loupe.models.text_encoder import SentenceEncoder

    minilm()  # encodes and caches the corpus on first use
    corpus = np.load(CACHE / "minilm-debian.npy")
    texts = debian_descriptions()
    assert len(texts) == len(corpus), "the cached embeddings belong to another description list"
    pick = np.random.default_rng(3).choice(len(texts), args.queries, replace=False)
    queries = [" ".join(texts[i].split()[:6]) for i in pick]

    enc = SentenceEncoder(max_tokens=128)
    fp32 = enc.embed(queries)
    fp32 = fp32 / np.linalg.norm(fp32, axis=1, keepdims=True)
    variants: dict[str, tuple[np.ndarray, float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "minilm.onnx"
        export_minilm(enc, base)
        variants["ONNX Runtime fp32"] = run_onnx(base, enc.tokenizer, queries)
        logging.disable(logging.WARNING)  # the quantizer logs every tensor
        try:
            for label, per_channel in (
                ("int8, one scale per tensor (onnx-int8 before)", False),
                ("int8, per channel (onnx-int8 before smoothing)", True),
            ):
                path = Path(tmp) / f"minilm-{int(per_channel)}.onnx"
                quantize_dynamic(str(base), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
                variants[f"ONNX Runtime {label}"] = run_onnx(path, enc.tokenizer, queries)
            # Smoothed per-channel int8 (onnx-int8: a = ALPHA, every matmul), calibrated on other descriptions'
            # prefixes.
            rest = np.setdiff1d(np.arange(len(texts)), pick)
            calib_ids = np.random.default_rng(11).choice(rest, 256, replace=False)
            calib = [" ".join(texts[i].split()[: 3 + j % 12]) for j, i in enumerate(calib_ids)]
            fp32_model = enc.model
            amax = smoothing.calibrate(fp32_model, lambda: enc.embed(calib))
            for alpha in (0.5, smoothing.ALPHA):
                enc.model = smoothing.smoothed(fp32_model, amax, alpha)
                path = Path(tmp) / f"minilm-smooth{alpha}.onnx"
                export_minilm(enc, path)
                graph = onnx.load(str(path), load_external_data=False)
                fc2 = [
                    n.name
                    for n in graph.graph.node
                    if n.op_type == "MatMul" and "/output/dense" in n.name and "attention" not in n.name
                ]
                kinds = [("", [], QuantType.QInt8, False), (", fc2 in fp32", fc2, QuantType.QInt8, False)]
                # What CPUs without VNNI could use instead: 7-bit weights (reduce_range) or uint8 ones.
                if alpha == smoothing.ALPHA:
                    kinds += [
                        (", 7-bit weights", [], QuantType.QInt8, True),
                        (", uint8 weights", [], QuantType.QUInt8, False),
                    ]
                for suffix, exclude, weights, reduce in kinds:
                    q = Path(tmp) / f"minilm-smooth{alpha}-q{len(exclude)}-{weights.name}{int(reduce)}.onnx"
                    quantize_dynamic(
                        str(path),
                        str(q),
                        weight_type=weights,
                        per_channel=True,
                        reduce_range=reduce,
                        nodes_to_exclude=exclude,
                    )
                    used = "not used"
                    if alpha == smoothing.ALPHA and not exclude and not reduce:
                        signed = weights == QuantType.QInt8
                        used = "onnx-int8 " + ("where the CPU has VNNI" if signed else "on x86 without VNNI")
                        used += ", this CPU" if signed != int8_unsigned_weights() else ""
                    variants[f"ONNX Runtime int8 per channel, smoothed a={alpha}{suffix} ({used})"] = (
                        run_onnx(q, enc.tokenizer, queries)
                    )
                    if used.endswith("this CPU"):
                        # The same weights with one activation scale per token (not used).
                        tok = q.with_name(q.stem + "-per-token.onnx")
                        per_token_scales(q, tok)
                        variants[
                            f"ONNX Runtime int8 per channel, smoothed a={alpha}{suffix}, one activation scale per "
                            "token (not used)"
                        ] = run_onnx(tok, enc.tokenizer, queries, disabled=("MatMulIntegerToFloatFusion",))
            enc.model = fp32_model
            for block in (W8_BLOCK_PLAIN, W8_BLOCK_VNNI):
                path = Path(tmp) / f"minilm-w8b{block}.onnx"
                quantize_w8(base, path, block)
                label = "onnx-w8 before" if block == W8_BLOCK_PLAIN else "not used"
                variants[f"ONNX Runtime 8-bit weights, blocks of {block}, not smoothed ({label})"] = run_onnx(
                    path, enc.tokenizer, queries
                )
            # onnx-w8: the factors it folds into CLIP's text tower (smoothing.folded), here as divisions.
            enc.model = w8_smoothed(fp32_model, amax)
            smooth = Path(tmp) / "minilm-w8-smoothed.onnx"
            export_minilm(enc, smooth)
            enc.model = fp32_model
            for block in (W8_BLOCK_PLAIN, W8_BLOCK_VNNI):
                path = Path(tmp) / f"minilm-w8s{block}.onnx"
                quantize_w8(smooth, path, block)
                label = "onnx-w8 " + ("with VNNI" if block == W8_BLOCK_VNNI else "without VNNI")
                label += ", this CPU" if block == w8_block() else ""
                variants[f"ONNX Runtime 8-bit weights, blocks of {block}, smoothed ({label})"] = run_onnx(
                    path, enc.tokenizer, queries
                )
        finally:
            logging.disable(logging.NOTSET)
    enc.model = copy.deepcopy(enc.model).to(torch.bfloat16)
    bf16 = enc.embed(queries).astype(np.float32)
    variants["torch bf16 (for its accuracy)"] = (bf16 / np.linalg.norm(bf16, axis=1, keepdims=True), None)

    top_fp32 = np.argsort(-(fp32 @ corpus.T), axis=1)[:, :10]
    lines = [
        f"all-MiniLM-L6-v2 (real weights), {args.queries} queries of six words against {len(corpus):,} Debian "
        f"package descriptions embedded in fp32 by torch; ONNX Runtime {onnxruntime.__version__}, one query per "
        f"call; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| query encoder | cosine to torch fp32, mean | min | top-10 shared with fp32 | own description in the "
        "top 10 | ms per query (median) |",
        "|---|---|---|---|---|---|",
        f"| torch fp32 | 1 | 1 | 1 | "
        f"{np.mean([i in set(r) for i, r in zip(pick, top_fp32, strict=True)]):.3f} | |",
    ]
    for label, (vecs, ms) in variants.items():
        cos = (fp32 * vecs).sum(1)
        top = np.argsort(-(vecs @ corpus.T), axis=1)[:, :10]
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_fp32, top, strict=True)]))
        found = float(np.mean([i in set(r) for i, r in zip(pick, top, strict=True)]))
        lines.append(
            f"| {label} | {cos.mean():.4f} | {cos.min():.4f} | {overlap:.3f} | {found:.3f} | "
            f"{'' if ms is None else f'{ms:.2f}'} |"
        )
    lines += [
        "",
        "`LOUPE_MODEL__TEXT_RUNTIME=auto` (the default) serves the smoothed 8-bit blocks (`onnx-w8`: ONNX Runtime's "
        "MatMulNBits, activations quantized per block at run time; blocks of 128 where the CPU has VNNI, 32 "
        "elsewhere; in CLIP's text tower the smoothing folds into the layer norms and the value projection, so "
        "the divisions these rows' times include cost it nothing) where they time at least 1.2x faster than fp32 "
        "on one query at start and gain there more than they lose on a pass of several; `onnx-int8` (one scale "
        "per output channel and one per activation tensor, the inputs smoothed) stays opt-in: faster still, but "
        "its vectors move several times further. Real CLIP "
        "weights are not reachable here to measure their retrieval effect; each kind's cosine check against torch on probe queries (onnx-w8 "
        ">= 0.999, onnx-int8 >= 0.99, else the next runtime serves) runs on the real weights wherever it is used.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(
            "int8 text encoder on real weights",
            text,
            command_line(),
        )


if __name__ == "__main__":
    main()
