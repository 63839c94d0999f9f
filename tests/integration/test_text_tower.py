"""The text tower encodes only a query's real tokens: CLIP's text transformer is causally masked and pools the
end-of-text token, so padding to the full context changes nothing. Checked here on the tiny model; the bench checks
the full-size ViT-B/32 with the real 49,408-token tokenizer."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from loupe.models import onnx_text
from loupe.models.clip import load_clip
from loupe.models.vectors import normalize

QUERIES = ["a red circle", "blue", "a small green triangle on a noisy background", "a star"]


def padded_to_context(clip, texts: list[str]) -> np.ndarray:
    enc = clip.tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=clip.info.max_text_tokens,
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = clip.model.get_text_features(**enc)
    return normalize(out.pooler_output.numpy())


def test_real_tokens_only_equals_full_context_padding(tiny_clip_dir: Path):
    clip = load_clip(str(tiny_clip_dir))
    full = padded_to_context(clip, QUERIES)
    one_by_one = np.stack([clip.embed_texts([q])[0] for q in QUERIES])
    batched = clip.embed_texts(QUERIES)  # padded to the longest of the batch only
    assert clip.tokenizer(["a star"], return_tensors="pt")["input_ids"].shape[1] < clip.info.max_text_tokens
    np.testing.assert_allclose(one_by_one, full, atol=2e-5)
    np.testing.assert_allclose(batched, full, atol=2e-5)


def test_a_long_list_of_queries_is_packed_in_chunks_with_each_querys_own_vector(
    tiny_clip_dir: Path, tmp_path: Path
):
    """A pass packs its queries' real tokens into one sequence (models/text_pooled.py), whose attention grows with
    the square of its length: a longer list runs in passes of at most PACK_QUERIES, and every query gets the
    vector it gets alone, wherever it falls in its chunk."""
    from loupe.models import onnx_text, text_pooled

    clip = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach(clip, "onnx", tmp_path / "onnx") == "onnx"
    tower, sizes = clip.text_tower, []

    def counted(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        sizes.append(len(input_ids))
        return tower(input_ids, attention_mask)  # type: ignore[no-any-return,misc]

    clip.text_tower = counted
    texts = [f"{q} number {k}" if k % 3 else q for k in range(40) for q in QUERIES[k % 4 : k % 4 + 1]]
    got = clip.embed_texts(texts)
    assert sizes == [16, 16, 8] and text_pooled.PACK_QUERIES == 16
    sizes.clear()
    alone = np.stack([clip.embed_texts([t])[0] for t in texts])
    assert sizes == [1] * 40
    np.testing.assert_allclose(got, alone, atol=2e-5)
    np.testing.assert_allclose(got, clip.embed_texts_torch(texts), atol=2e-5)


def test_onnx_text_tower_matches_torch_and_falls_back_when_broken(
    tiny_clip_dir: Path, tmp_path: Path, caplog
):
    from loupe.models import onnx_text

    for kind, floor in (("onnx", 0.9999), ("onnx-w8", 0.999), ("onnx-int8", 0.99)):
        clip = load_clip(str(tiny_clip_dir))
        assert onnx_text.attach(clip, kind, tmp_path / "onnx") == kind
        assert clip.text_tower is not None
        ref = clip.embed_texts_torch(QUERIES)
        batched, alone = clip.embed_texts(QUERIES), np.stack([clip.embed_texts([q])[0] for q in QUERIES])
        for got in (batched, alone):
            assert np.min(np.sum(ref * got, axis=1)) >= floor
        if kind == "onnx":  # packed into one sequence, no query sees another's tokens
            np.testing.assert_allclose(batched, alone, atol=2e-5)
    exported = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert len(exported) == 3 and all(clip.info.fingerprint in name for name in exported)
    # int8 weights carry one scale per output channel (per-tensor scales moved real-weight vectors 5x further).
    import onnx

    int8 = onnx.load(str(tmp_path / "onnx" / next(n for n in exported if "int8" in n)))
    inits = {init.name: list(init.dims) for init in int8.graph.initializer}
    weights = [n.input[1] for n in int8.graph.node if n.op_type == "MatMulInteger"]
    scales = [inits[w.replace("_quantized", "_scale")] for w in weights]
    assert weights and all(len(dims) == 1 and dims[0] > 1 for dims in scales), scales
    # onnx-w8: every weight matmul as 8-bit MatMulNBits in this CPU's blocks with int8 dot products; none left in
    # fp32.
    block = onnx_text.w8_block()
    w8 = onnx.load(str(tmp_path / "onnx" / next(n for n in exported if f"-w8s{block}" in n)))
    nbits = [n for n in w8.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert nbits and all(
        a["bits"] == 8 and a["block_size"] == block and a["accuracy_level"] == 4 for a in attrs
    )
    w8_inits = {init.name for init in w8.graph.initializer}
    assert not [n.name for n in w8.graph.node if n.op_type == "MatMul" and n.input[1] in w8_inits]

    # A damaged export: torch serves, the log says why, and the file is removed so the next start rebuilds it.
    broken = tmp_path / "onnx" / f"{onnx_text.PREFIX}-{clip.info.fingerprint}.onnx"
    broken.write_bytes(b"not an onnx model")
    clip = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach(clip, "onnx", tmp_path / "onnx") == "torch"
    assert clip.text_tower is None and "use torch" in caplog.text and not broken.exists()
    assert onnx_text.attach(clip, "onnx", tmp_path / "onnx") == "onnx"  # rebuilt
    assert onnx_text.attach(load_clip(str(tiny_clip_dir)), "torch", tmp_path / "onnx") == "torch"


def test_int8_text_tower_smooths_an_outlier_channel_that_one_activation_scale_loses(
    tiny_clip_dir: Path, tmp_path: Path
):
    """One channel of every layer's normalized input 40x the rest (outlier_channel), as trained transformers have
    them. One int8 scale per activation tensor then leaves the other channels a few steps; `onnx-int8`'s
    smoothing (models/smoothing.py) moves the outlier into the per-channel weight scales and keeps the vectors."""
    from loupe.models import smoothing

    clip = load_clip(str(tiny_clip_dir))
    ref = clip.embed_texts_torch(QUERIES)
    outlier_channel(clip)
    assert np.min(np.sum(ref * clip.embed_texts_torch(QUERIES), axis=1)) > 0.99999  # the same function

    # Smoothing alone changes nothing in fp32.
    from loupe.models import text_pooled

    parts, amax = onnx_text.calibrate_text_tower(clip)
    bos = text_pooled.bos_token_id(clip.tokenize)
    assert amax and all(
        len(v) == m.in_features for name, v in amax.items() for m in [parts.get_submodule(name)]
    )
    smooth = smoothing.smoothed(parts, amax)
    enc = clip.tokenize(QUERIES)
    with torch.inference_mode():
        fp32 = normalize(text_pooled.make(smooth["text"], smooth["projection"], bos)(**enc).numpy())
    assert np.min(np.sum(ref * fp32, axis=1)) > 0.99999

    # What onnx-int8 was before: per-channel int8 of the plain export.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def per_channel(plain: Path, out: Path) -> None:
        with onnx_text.quiet_quantizers():
            quantize_dynamic(str(plain), str(out), weight_type=QuantType.QInt8, per_channel=True)

    smoothing_keeps_vectors_closer(clip, ref, tmp_path, "onnx-int8", per_channel)


def smoothing_keeps_vectors_closer(clip, ref: np.ndarray, tmp_path: Path, kind: str, unsmoothed) -> Path:
    """`kind`'s export of `clip` (smoothed) against `unsmoothed(plain fp32 export, out)`, the same quantization
    of the plain graph: its worst cosine to torch higher and its mean distance less than half. The plain export."""
    plain = onnx_text.export(clip, onnx_text.export_path(clip, tmp_path, "onnx"), "onnx")
    unsmoothed(plain, tmp_path / "plain-quantized.onnx")
    np_enc = clip.tokenize(QUERIES, "np")
    before = np.sum(ref * onnx_text.OnnxTextTower(tmp_path / "plain-quantized.onnx")(**np_enc), axis=1)
    assert onnx_text.attach(clip, kind, tmp_path) == kind
    after = np.sum(ref * clip.embed_texts(QUERIES), axis=1)
    assert after.min() > before.min() and 1 - after.mean() < (1 - before.mean()) / 2, (before, after)
    assert not list(tmp_path.glob("*.tmp")), "the smoothed fp32 graph is not left behind"
    return plain


def outlier_channel(clip) -> None:
    """One channel of every layer's normalized input 40x the rest (the function unchanged: the layer norm's gain
    scaled up, the weights reading that channel scaled down), as trained transformers have them."""
    with torch.no_grad():
        for layer in clip.model.text_model.encoder.layers:
            a = layer.self_attn
            for norm, readers in (
                (layer.layer_norm1, (a.q_proj, a.k_proj, a.v_proj)),
                (layer.layer_norm2, (layer.mlp.fc1,)),
            ):
                norm.weight[0] *= 40
                norm.bias[0] *= 40
                for lin in readers:
                    lin.weight[:, 0] /= 40


def test_w8_text_tower_folds_its_smoothing_and_keeps_an_outlier_channel_closer(
    tiny_clip_dir: Path, tmp_path: Path
):
    """`onnx-w8` quantizes activations per block of input channels; an outlier channel leaves the rest of its
    block a few steps. Its smoothing is folded into the layer norms and the value projection (models/smoothing.py:
    folded): the same function in fp32, and the vectors closer to torch than the same blocks without it."""
    import onnx

    from loupe.models import smoothing, text_pooled

    clip = load_clip(str(tiny_clip_dir))
    ref = clip.embed_texts_torch(QUERIES)
    outlier_channel(clip)
    assert np.min(np.sum(ref * clip.embed_texts_torch(QUERIES), axis=1)) > 0.99999  # the same function

    parts, amax = onnx_text.calibrate_text_tower(clip)
    folded = smoothing.folded(parts, amax)
    enc = clip.tokenize(QUERIES)
    bos = text_pooled.bos_token_id(clip.tokenize)
    with torch.inference_mode():
        fp32 = normalize(text_pooled.make(folded["text"], folded["projection"], bos)(**enc).numpy())
    assert np.min(np.sum(ref * fp32, axis=1)) > 0.99999
    # The outlier moved into the weights.
    gain = [p["text"].encoder.layers[0].layer_norm1.weight[0] for p in (folded, parts)]
    assert gain[0] < gain[1] / 4

    block = onnx_text.w8_block()
    plain = smoothing_keeps_vectors_closer(
        clip, ref, tmp_path, "onnx-w8", lambda src, out: onnx_text.quantize_w8(src, out, block)
    )
    # Folded: the quantized graph has no operation the plain fp32 graph lacks.
    w8, fp32 = onnx.load(str(onnx_text.export_path(clip, tmp_path, "onnx-w8"))), onnx.load(str(plain))
    weights = {init.name for init in fp32.graph.initializer}
    others = Counter(n.op_type for n in fp32.graph.node if n.op_type != "MatMul" or n.input[1] not in weights)
    assert Counter(n.op_type for n in w8.graph.node if n.op_type != "MatMulNBits") == others

    # An unsmoothed export of earlier versions is deleted, not kept beside the new one.
    legacy = tmp_path / f"{onnx_text.PREFIX}-{clip.info.fingerprint}-w8b32.onnx"
    legacy.write_bytes(b"old")
    assert onnx_text.attach(load_clip(str(tiny_clip_dir)), "onnx-w8", tmp_path) == "onnx-w8"
    assert not legacy.exists()


def test_folded_smoothing_keeps_a_tower_without_layer_norm_or_value_biases_the_same(tiny_clip_dir: Path):
    """Some text towers have no bias in their layer norms or value projections: folding scales what is there."""
    from loupe.models import smoothing, text_pooled

    clip = load_clip(str(tiny_clip_dir))
    outlier_channel(clip)
    for layer in clip.model.text_model.encoder.layers:
        for module in (layer.layer_norm1, layer.layer_norm2, layer.self_attn.v_proj):
            module.register_parameter("bias", None)
    parts, amax = onnx_text.calibrate_text_tower(clip)
    enc, bos = clip.tokenize(QUERIES), text_pooled.bos_token_id(clip.tokenize)
    with torch.inference_mode():
        before = text_pooled.make(parts["text"], parts["projection"], bos)(**enc).numpy()
        folded = smoothing.folded(parts, amax)
        after = text_pooled.make(folded["text"], folded["projection"], bos)(**enc).numpy()
    assert np.min(np.sum(normalize(before) * normalize(after), axis=1)) > 0.99999


def test_w8_blocks_follow_the_cpus_vnni():
    assert onnx_text.w8_block(frozenset({"avx2", "avx512f", "avx512_vnni"})) == 128
    assert onnx_text.w8_block(frozenset({"avx2", "avx_vnni"})) == 128
    assert onnx_text.w8_block(frozenset({"avx2", "fma"})) == 32
    assert onnx_text.w8_block(frozenset()) == 32


def test_int8_weights_are_unsigned_exactly_where_signed_ones_saturate_on_this_cpu(tmp_path: Path):
    """ONNX Runtime multiplies dynamically quantized uint8 activations by int8 weights; on x86 CPUs without VNNI
    with `vpmaddubsw`, which saturates each pair of products at 32,767. A matmul of ones (activations 255, weights
    127: each pair 64,770) shows it. uint8 weights are exact on every CPU, and `onnx-int8` takes them exactly
    where this CPU saturates int8 ones."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    k = 256
    weight = helper.make_tensor("w", TensorProto.FLOAT, [k, 4], np.ones(k * 4, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ones",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    got = {}
    for weights in (QuantType.QInt8, QuantType.QUInt8):
        out = tmp_path / f"{weights.name}.onnx"
        with onnx_text.quiet_quantizers():
            quantize_dynamic(str(tmp_path / "fp32.onnx"), str(out), weight_type=weights, per_channel=True)
        got[weights] = onnx_text.cpu_session(out, 1).run(None, {"x": np.ones((1, k), np.float32)})[0]
    np.testing.assert_allclose(got[QuantType.QUInt8], k, rtol=0.01)
    signed_exact = bool(np.allclose(got[QuantType.QInt8], k, rtol=0.01))
    if onnx_text.int8_unsigned_weights():
        assert not signed_exact, "this CPU needs no unsigned weights: VNNI_FLAGS misses its flag"
    elif platform.machine().lower() in ("x86_64", "amd64"):  # with VNNI
        assert signed_exact, f"int8 weights saturate on this CPU: {got[QuantType.QInt8].ravel()} for {k}"

    assert onnx_text.int8_unsigned_weights(frozenset({"avx2", "fma"}), "x86_64")
    assert not onnx_text.int8_unsigned_weights(frozenset({"avx2", "avx512f", "avx512_vnni"}), "x86_64")
    assert not onnx_text.int8_unsigned_weights(frozenset({"avx2", "avx_vnni"}), "x86_64")
    assert not onnx_text.int8_unsigned_weights(frozenset({"asimd", "asimddp"}), "aarch64")


def test_int8_exports_with_signed_and_unsigned_weights_are_kept_apart(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch, caplog
):
    """API nodes on different CPUs may share a data directory: each kind of int8 export has its own file, and each
    stores the weights its CPU needs; the log names uint8 weights."""
    import logging

    import onnx

    names = {}
    for unsigned in (False, True):
        monkeypatch.setattr(onnx_text, "int8_unsigned_weights", lambda unsigned=unsigned: unsigned)
        clip = load_clip(str(tiny_clip_dir))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loupe.models.onnx_text"):
            assert onnx_text.attach(clip, "onnx-int8", tmp_path) == "onnx-int8"
        assert ("uint8 weights: this CPU has no VNNI" in caplog.text) == unsigned, caplog.text
        path = onnx_text.export_path(clip, tmp_path, "onnx-int8")
        graph = onnx.load(str(path))
        inits = {init.name: init.data_type for init in graph.graph.initializer}
        types = {inits[n.input[1]] for n in graph.graph.node if n.op_type == "MatMulInteger"}
        assert types == {onnx.TensorProto.UINT8 if unsigned else onnx.TensorProto.INT8}, types
        names[unsigned] = path.name
    assert names[False] != names[True] and all((tmp_path / n).exists() for n in names.values())


def test_auto_text_runtime_times_w8_once_and_remembers_it(tiny_clip_dir: Path, tmp_path: Path, monkeypatch):
    from loupe.models import runtime_choice
    from loupe.models.runtime_choice import ChoiceMemory

    # Remembered whatever else the machine runs meanwhile.
    monkeypatch.setattr(runtime_choice, "cpu_ticks", lambda *_: None)
    memory = ChoiceMemory(tmp_path / "models")
    clip = load_clip(str(tiny_clip_dir))
    chosen = onnx_text.attach_auto(clip, tmp_path / "onnx", 0, memory)
    assert chosen in ("onnx", "onnx-w8") and clip.runtime_choices["text_runtime"] == "timed at start"
    ref = clip.embed_texts_torch(QUERIES)
    assert np.min(np.sum(ref * clip.embed_texts(QUERIES), axis=1)) >= onnx_text.COSINE_FLOOR[chosen]
    (entry,) = memory._read().values()
    assert entry["kind"] == chosen and "x onnx on one query" in entry["why"] and "in one pass" in entry["why"]

    # The next start reuses the verdict without timing (the export is still checked) ...
    def untimed(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr("loupe.models.bf16_text.best_of", untimed)
    monkeypatch.setattr(onnx_text, "fastest_interleaved", untimed)
    again = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach_auto(again, tmp_path / "onnx", 0, memory) == chosen
    assert again.runtime_choices["text_runtime"].startswith("remembered from")
    # ... and a remembered onnx-w8 whose export no longer checks out falls back to onnx, not to torch.
    key = next(iter(memory._read()))
    memory.put(key, kind="onnx-w8", why="test")
    monkeypatch.setitem(onnx_text.COSINE_FLOOR, "onnx-w8", 1.01)
    third = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach_auto(third, tmp_path / "onnx", 0, memory) == "onnx"
    assert third.text_tower is not None


def test_auto_takes_w8_only_where_its_gain_alone_outweighs_its_loss_together():
    # AVX2-only AMD Zen 3 (no VNNI): one query 1.04-1.27x, the six probes in one pass 0.65-0.95x.
    for one, together in ((1.22, 0.76), (1.27, 0.76), (1.14, 0.95), (1.04, 0.65)):
        assert not onnx_text.w8_wins(one, together)
    # AVX-512 CPUs: faster both ways (Zen 5: 1.9x and 1.2x); Ice Lake: 1.26x alone, about even together.
    for one, together in ((1.9, 1.2), (1.26, 0.9), (1.2, 1.0)):
        assert onnx_text.w8_wins(one, together)
    assert not onnx_text.w8_wins(1.19, 2.0)  # a lone search's latency is what it is for


@pytest.mark.parametrize(
    ("times", "kind"), [((1.22, 1.0, 0.76, 1.0), "onnx"), ((1.9, 1.0, 1.2, 1.0), "onnx-w8")]
)
def test_auto_text_runtime_decides_on_one_query_and_on_a_pass_together(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch, times, kind
):
    from loupe.models import runtime_choice
    from loupe.models.runtime_choice import ChoiceMemory

    # What else the machine runs meanwhile is not this test's question (the verdict is remembered only on a
    # quiet one): other processes' CPU time reads as unknown.
    monkeypatch.setattr(runtime_choice, "cpu_ticks", lambda *_: None)
    # The four timings: onnx and onnx-w8 one query at a time, then the probes together.
    timed = []

    def fastest(runs, rounds=5):
        timed.append(list(runs))
        return dict(zip(runs, times, strict=True))

    monkeypatch.setattr(onnx_text, "fastest_interleaved", fastest)
    memory = ChoiceMemory(tmp_path / "models")
    clip = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach_auto(clip, tmp_path / "onnx", 0, memory) == kind
    assert timed == [["onnx", "onnx-w8", "onnx together", "onnx-w8 together"]]  # one interleaved timing
    (entry,) = memory._read().values()
    one, together = times[0] / times[1], times[2] / times[3]
    assert entry["kind"] == kind
    assert (
        entry["why"]
        == f"{one:.2f}x onnx on one query, {together:.2f}x on {len(onnx_text.PROBES)} in one pass"
    )
    # Only the runtime chosen stays on disk for later starts.
    assert onnx_text.export_path(clip, tmp_path / "onnx", "onnx-w8").exists() == (kind == "onnx-w8")


def test_bf16_copy_takes_micro_batches_only_when_asked_or_faster(tiny_clip_dir: Path, tmp_path: Path):
    from loupe.models import bf16_text, onnx_text

    clip = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach(clip, "onnx", tmp_path / "onnx") == "onnx"
    ref = clip.embed_texts_torch(QUERIES)
    single = clip.text_tower(
        **{k: v for k, v in clip.tokenize(QUERIES[:1], "np").items() if k != "token_type_ids"}
    )

    assert bf16_text.attach(clip, "off") == "" and clip.text_batch_tower is None
    # auto decides by the measured speed-up: one no runtime can reach, and one any reaches.
    assert bf16_text.attach(clip, "auto", gain_needed=1e9) == "" and clip.text_batch_tower is None
    assert bf16_text.attach(clip, "auto", gain_needed=0.0) == "bf16 from 1 query"
    assert clip.text_batch_min == 1
    assert bf16_text.attach(clip, "on") == "bf16 from 2 queries"

    batched = clip.embed_texts(QUERIES)
    cos = np.sum(ref * batched, axis=1)
    assert cos.min() >= bf16_text.COSINE_FLOOR
    assert np.abs(batched - ref).max() > 1e-6  # bf16 rounding: the batch really ran on the copy
    np.testing.assert_allclose(clip.embed_texts(QUERIES[:1]), single, atol=1e-6)  # one query: ONNX Runtime

    # The copy shares the fp32 token table; the fp32 model that embeds images and checks exports is untouched.
    table = clip.model.text_model.embeddings.token_embedding
    assert clip.text_batch_tower.text.embeddings.token_embedding.table[0] is table
    assert table.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())
    np.testing.assert_allclose(clip.embed_texts_torch(QUERIES), ref, atol=1e-6)


def test_when_the_bf16_copy_takes_every_query_the_onnx_session_is_freed(
    make_settings, runtime_factory, monkeypatch
):
    from loupe.models import bf16_text

    monkeypatch.setattr(bf16_text, "BATCH_GAIN", 0.0)  # auto: any speed-up wins, from one query
    monkeypatch.setattr(bf16_text, "cpu_has_bf16", lambda: True)  # tried on any CPU
    rt = runtime_factory(make_settings())
    model = rt.health()["model"]
    assert (model["text_runtime"], model["text_batches"]) == ("bf16", "bf16 from 1 query")
    assert rt.clip.text_tower is None and rt.clip.text_batch_min == 1
    got = rt.search.text_cache.get_many(QUERIES[:1])[0]
    ref = rt.clip.embed_texts_torch(QUERIES[:1])[0]
    assert float(got @ ref) >= bf16_text.COSINE_FLOOR and float(np.abs(got - ref).max()) > 1e-6


def test_auto_does_not_try_bf16_copies_where_torch_has_no_bf16_kernels(
    make_settings, runtime_factory, monkeypatch
):
    from loupe.models import bf16_text, image_runtime

    monkeypatch.setattr(bf16_text, "BATCH_GAIN", 0.0)  # any speed-up would win
    monkeypatch.setattr(image_runtime, "BF16_GAIN", 0.0)
    monkeypatch.setattr(bf16_text, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(image_runtime, "cpu_has_bf16", lambda: False)
    rt = runtime_factory(make_settings(model={"image_runtime": "auto"}))
    model = rt.health()["model"]
    assert model["text_batches"] is None and rt.clip.text_batch_tower is None
    assert model["image_runtime"] in ("torch", "onnx") and rt.clip.image_tower_bf16 is None
    # Asked for by name, the copies are built whatever the CPU.
    rt2 = runtime_factory(
        make_settings(
            data_dir=rt.settings.data_dir.parent / "named",
            model={"image_runtime": "bf16", "text_batches_bf16": "on"},
        )
    )
    assert rt2.health()["model"]["image_runtime"] == "bf16" and rt2.clip.text_batch_tower is not None


def test_health_names_the_bf16_batches(make_settings, runtime_factory):
    rt = runtime_factory(make_settings(model={"text_batches_bf16": "on"}))
    assert rt.health()["model"]["text_batches"] == "bf16 from 2 queries"
    assert rt.health()["model"]["text_encodes"] == {"passes": 0, "queries": 0, "side_by_side": 0}
    rt.search.text_cache.get_many(QUERIES[:3])  # new texts: one forward pass for the three
    rt.search.text_cache.get_many(QUERIES[:2])  # cached: no pass
    assert rt.health()["model"]["text_encodes"] == {"passes": 1, "queries": 3, "side_by_side": 0}
    rt2 = runtime_factory(
        make_settings(data_dir=rt.settings.data_dir.parent / "d2", model={"text_batches_bf16": "off"})
    )
    assert rt2.health()["model"]["text_batches"] is None


def test_bf16_copy_runs_as_a_trace_that_matches_eager_mode_at_other_shapes(tiny_clip_dir: Path):
    """Traced on two queries, the copy serves any batch size and length with eager mode's vectors (a trace that
    froze a shape would differ here), and stays in eager mode where tracing fails."""
    from loupe.models import bf16_text

    clip = load_clip(str(tiny_clip_dir))
    tower = bf16_text.Bf16TextTower(clip.model, clip.tokenize)
    assert tower.traced is not None
    texts = [*QUERIES, "a very small red square next to a large blue circle on a grey noisy background"]
    for batch in ([texts[1]], texts[:3], texts):
        enc = clip.tokenize(batch)
        with torch.inference_mode():
            eager = normalize(tower.tower(enc["input_ids"], enc["attention_mask"])[0].float().numpy())
        np.testing.assert_allclose(tower(enc["input_ids"], enc["attention_mask"]), eager, atol=2e-3)
    assert bf16_text.Bf16TextTower(clip.model).traced is None  # no tokenizer: eager mode only

    def broken(texts: list[str]) -> dict:
        raise RuntimeError("tokenizer gone")

    eager_only = bf16_text.Bf16TextTower(clip.model, broken)
    assert eager_only.traced is None
    enc = clip.tokenize(QUERIES)
    ref = clip.embed_texts_torch(QUERIES)
    assert np.min(np.sum(ref * eager_only(enc["input_ids"], enc["attention_mask"]), axis=1)) >= 0.9995


def test_multi_threaded_torch_passes_run_on_the_one_torch_thread(tiny_clip_dir: Path):
    """GNU OpenMP gives each thread that runs a parallel region its own team; past one team per core its workers
    sleep between operators. Passes on several torch threads therefore all run on one thread, single-threaded
    passes where they are called; errors come back to the caller."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from loupe.models import torch_thread

    clip = load_clip(str(tiny_clip_dir))

    def where() -> tuple[str, int]:
        return threading.current_thread().name, torch.get_num_threads()

    with ThreadPoolExecutor(4) as pool:
        multi = list(pool.map(lambda _: clip.torch_pass(where, 2), range(8)))
        single = list(pool.map(lambda _: clip.torch_pass(where, 1), range(8)))
    assert {name for name, _ in multi} == {name for name, _ in multi if name.startswith("loupe-torch")}
    assert len({name for name, _ in multi}) == 1 and {n for _, n in multi} == {2}
    assert not any(name.startswith("loupe-torch") for name, _ in single) and {n for _, n in single} == {1}
    # Nested calls from the torch thread run in place (no deadlock), and errors reach the caller.
    assert torch_thread.call(lambda: clip.torch_pass(where, 2))[0].startswith("loupe-torch")
    # A daemon: Ctrl-C during a long pass (the demo model's first training) still ends the process.
    assert all(t.daemon for t in threading.enumerate() if t.name == "loupe-torch")

    def fail() -> None:
        raise ValueError("bad pass")

    with pytest.raises(ValueError, match="bad pass"):
        clip.torch_pass(fail, 2)
    # The towers' own passes go the same way: vectors equal to a direct pass.
    np.testing.assert_allclose(
        clip.embed_texts_torch(QUERIES, threads=2), clip.embed_texts_torch(QUERIES, 1), atol=1e-5
    )


def test_text_passes_leave_a_core_while_other_searches_are_in_flight(make_settings, runtime_factory):
    """The text tower runs on all torch threads for a lone search, on one fewer while others are in flight (their
    HTTP and search work needs a core: a pass on all of them lost its threads at every operator's barrier)."""
    import threading

    rt = runtime_factory(make_settings())
    search = rt.search
    clip = search.clip
    seen: list[int | None] = []
    real = clip.embed_texts

    def recording(texts: list[str], threads: int | None = None) -> np.ndarray:
        seen.append(threads)
        return real(texts, threads)

    clip.embed_texts = recording
    from loupe.search.query import SearchRequest, Term

    search.search(SearchRequest(query=[Term(text="a red circle")], limit=5))
    assert seen == [None]
    inside = threading.Event()
    release = threading.Event()
    real_page = search._page

    def slow_page(*args, **kwargs):  # a search that stays in flight until released
        inside.set()
        release.wait(10)
        return real_page(*args, **kwargs)

    search._page = slow_page
    other = threading.Thread(
        target=search.search, args=(SearchRequest(query=[Term(text="a blue star")], limit=5),)
    )
    other.start()
    assert inside.wait(10)
    search._page = real_page
    search.search(SearchRequest(query=[Term(text="a green triangle")], limit=5))
    release.set()
    other.join(10)
    assert seen == [None, None, clip.threads_under_load]
    assert search._in_flight == 0


def test_the_threads_of_a_text_pass_under_load_follow_the_setting(make_settings, runtime_factory):
    """LOUPE_MODEL__TEXT_THREADS_UNDER_LOAD replaces the in-flight rule's one-fewer, capped at the model's threads."""
    rt = runtime_factory(make_settings())
    clip = rt.clip
    assert clip.text_threads_under_load == 0 and clip.threads_under_load == max(1, clip.threads - 1)
    rt2 = runtime_factory(
        make_settings(data_dir=rt.settings.data_dir.parent / "d2", model={"text_threads_under_load": 64})
    )
    assert rt2.clip.text_threads_under_load == 64 and rt2.clip.threads_under_load == rt2.clip.threads
    clip.text_threads_under_load = 1
    assert clip.threads_under_load == 1


def test_text_passes_run_side_by_side_only_where_a_pass_under_load_is_single_threaded(
    make_settings, runtime_factory
):
    from loupe.models.clip import SIDE_BY_SIDE_BATCH

    # No kept prefixes: which tower serves is read from exact vectors, and a repeat given a kept prefix differs
    # in its last bits (tests/integration/test_text_prefix.py).
    rt = runtime_factory(make_settings(model={"text_batches_bf16": "on", "text_prefix_cache_mb": 0}))
    clip = rt.clip
    assert clip.text_tower is not None and clip.text_batch_tower is not None  # ONNX Runtime and the bf16 copy
    clip.threads, clip.text_threads_under_load = 2, 0  # 2 cores: one thread per pass under load
    assert clip.text_passes() == (2, SIDE_BY_SIDE_BATCH) == (2, 4)
    clip.threads, clip.text_threads_under_load = 4, 3  # passes on 3 threads: on the torch thread, in turn
    assert clip.text_passes() == (1, 1)
    clip.text_threads_under_load = 1
    assert clip.text_passes() == (4, 4)
    # Under load a full batch runs on the bf16 copy on one thread even where the copy takes only larger batches
    # alone: ONNX Runtime would run it on all its threads, beside the other pass.
    clip.threads, clip.text_threads_under_load, clip.text_batch_min = 2, 0, 8
    texts = [*QUERIES[:3], "a blue square"]
    enc = clip.tokenize(texts)
    copy = clip.text_batch_tower(enc["input_ids"], enc["attention_mask"])
    onnx = clip.text_tower(*(clip.tokenize(texts, "np")[k] for k in ("input_ids", "attention_mask")))
    assert not np.array_equal(copy, onnx)
    np.testing.assert_array_equal(clip.embed_texts(texts, threads=1), copy)  # under load: the copy
    np.testing.assert_array_equal(clip.embed_texts(texts), onnx)  # alone: ONNX Runtime, below the copy's 8
    np.testing.assert_array_equal(clip.embed_texts(texts[:3], threads=1), onnx[:3])  # not a full batch


def test_the_traced_bf16_copy_gives_the_same_vectors_from_threads_side_by_side(tiny_clip_dir: Path):
    """Text passes under load run the trace from several threads at once (no lock): each caller gets exactly
    the vectors of a pass run alone."""
    from loupe.models.bf16_text import Bf16TextTower

    clip = load_clip(str(tiny_clip_dir))
    tower = Bf16TextTower(clip.model, clip.tokenize)
    assert tower.traced is not None
    batches = [QUERIES[i : i + 3] for i in range(len(QUERIES) - 2)] * 6
    encs = [clip.tokenize(b) for b in batches]

    def run(enc):  # one torch thread per pass, as a pass under load
        clip.use_threads(1)
        return tower(enc["input_ids"], enc["attention_mask"])

    alone = [run(e) for e in encs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, encs))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_the_pooled_tower_gives_transformers_vectors(tiny_clip_dir: Path, legacy_eos: bool, monkeypatch):
    """models/text_pooled.py skips the start token (its states are cached), packs a batch into its real tokens and
    runs all but the end-of-text rows of the last layer: transformers' own forward pass must give the same vectors,
    at any length, one query or a batch of different lengths, with the
    end-of-text token found by id or (legacy configs, eos_token_id 2) as the largest id."""
    from loupe.models import text_pooled

    clip = load_clip(str(tiny_clip_dir))
    text = clip.model.text_model
    if legacy_eos:
        monkeypatch.setattr(text, "eos_token_id", 2)
    bos = text_pooled.bos_token_id(clip.tokenize)
    assert bos == clip.tokenizer.bos_token_id
    texts = [*QUERIES, "", "a very small red square next to a large blue circle on a grey noisy background"]
    for bos_id in (bos, None):
        tower = text_pooled.make(text, clip.model.text_projection, bos_id)
        for batch in (texts, texts[1:2], texts[-1:]):
            enc = clip.tokenize(batch)
            with torch.inference_mode():
                ref = clip.model.get_text_features(**enc).pooler_output
                got = tower(enc["input_ids"], enc["attention_mask"])
            np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)


def test_exports_of_other_models_unused_for_a_month_are_deleted_at_start(make_settings, runtime_factory):
    settings = make_settings()
    cache = settings.data_dir / "models" / "onnx"
    rt = runtime_factory(settings)
    own = cache / f"{onnx_text.PREFIX}-{rt.clip.info.fingerprint}.onnx"
    assert rt.clip.text_runtime == "onnx" and own.exists()
    rt.close()
    month = time.time() - (onnx_text.UNUSED_DAYS + 1) * 86400
    old = cache / "text2-0123456789abcdef.onnx"  # another model's export, last loaded over a month ago
    recent = cache / "image1-fedcba9876543210.onnx"  # another model's, loaded last week
    unfinished = cache / "text2-0123456789abcdef.tmp"  # a process stopped while exporting
    for path, when in ((old, month), (recent, time.time() - 7 * 86400), (unfinished, time.time() - 7200)):
        path.write_bytes(b"onnx")
        os.utime(path, (when, when))
    os.utime(own, (month, month))  # this model's own: loaded again at start, so kept however old
    runtime_factory(settings)
    assert sorted(p.name for p in cache.iterdir()) == sorted([own.name, recent.name])


def test_quantizing_leaves_the_host_process_logging_as_it_was(tiny_clip_dir: Path, tmp_path: Path):
    """Importing ONNX Runtime's MatMulNBits quantizer calls logging.basicConfig(level=INFO): in a process that had
    not set up logging (an embedder, a benchmark's load generator), every library's INFO records were printed
    afterwards. A fresh interpreter, as such a process starts."""
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from loupe.models import onnx_text\n"
        "from loupe.models.clip import load_clip\n"
        "root = logging.getLogger()\n"
        "before = (root.level, list(root.handlers))\n"
        "clip = load_clip(sys.argv[1])\n"
        "assert onnx_text.attach(clip, 'onnx-w8', Path(sys.argv[2])) == 'onnx-w8'\n"
        "assert onnx_text.attach(load_clip(sys.argv[1]), 'onnx-int8', Path(sys.argv[2])) == 'onnx-int8'\n"
        "print(before == (root.level, list(root.handlers)), root.level, root.handlers)\n"
        "logging.getLogger('httpx').info('a request')\n"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script, str(tiny_clip_dir), str(tmp_path / "onnx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("True"), out.stdout
    assert "a request" not in out.stderr
    names = [p.name for p in (tmp_path / "onnx").iterdir()]
    assert any("-w8s" in n for n in names) and any("int8" in n for n in names), names  # both were quantized
