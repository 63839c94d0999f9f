"""The text tower encodes only a query's real tokens: CLIP's text transformer is causally masked and pools the
end-of-text token, so padding to the full context changes nothing. Checked here on the tiny model; the bench checks
the full-size ViT-B/32 with the real 49,408-token tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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


def test_onnx_text_tower_matches_torch_and_falls_back_when_broken(
    tiny_clip_dir: Path, tmp_path: Path, caplog
):
    from loupe.models import onnx_text

    for kind, floor in (("onnx", 0.9999), ("onnx-int8", 0.99)):
        clip = load_clip(str(tiny_clip_dir))
        assert onnx_text.attach(clip, kind, tmp_path / "onnx") == kind
        assert clip.text_tower is not None
        ref = clip.embed_texts_torch(QUERIES)
        for got in (clip.embed_texts(QUERIES), np.stack([clip.embed_texts([q])[0] for q in QUERIES])):
            assert np.min(np.sum(ref * got, axis=1)) >= floor
    exported = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert len(exported) == 2 and all(clip.info.fingerprint in name for name in exported)
    # int8 weights carry one scale per output channel (per-tensor scales moved real-weight vectors 5x further).
    import onnx

    int8 = onnx.load(str(tmp_path / "onnx" / next(n for n in exported if "int8" in n)))
    inits = {init.name: list(init.dims) for init in int8.graph.initializer}
    weights = [n.input[1] for n in int8.graph.node if n.op_type == "MatMulInteger"]
    scales = [inits[w.replace("_quantized", "_scale")] for w in weights]
    assert weights and all(len(dims) == 1 and dims[0] > 1 for dims in scales), scales

    # A damaged export: torch serves, the log says why, and the file is removed so the next start rebuilds it.
    broken = tmp_path / "onnx" / next(n for n in exported if "int8" not in n)
    broken.write_bytes(b"not an onnx model")
    clip = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach(clip, "onnx", tmp_path / "onnx") == "torch"
    assert clip.text_tower is None and "use torch" in caplog.text and not broken.exists()
    assert onnx_text.attach(clip, "onnx", tmp_path / "onnx") == "onnx"  # rebuilt
    assert onnx_text.attach(load_clip(str(tiny_clip_dir)), "torch", tmp_path / "onnx") == "torch"


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
    assert bf16_text.attach(clip, "auto", gain_needed=0.0) == "bf16 from 4 queries"
    assert clip.text_batch_min == 4
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


def test_health_names_the_bf16_batches(make_settings, runtime_factory):
    rt = runtime_factory(make_settings(model={"text_batches_bf16": "on"}))
    assert rt.health()["model"]["text_batches"] == "bf16 from 2 queries"
    assert rt.health()["model"]["text_encodes"] == {"passes": 0, "queries": 0}
    rt.search.text_cache.get_many(QUERIES[:3])  # new texts: one forward pass for the three
    rt.search.text_cache.get_many(QUERIES[:2])  # cached: no pass
    assert rt.health()["model"]["text_encodes"] == {"passes": 1, "queries": 3}
    rt2 = runtime_factory(
        make_settings(data_dir=rt.settings.data_dir.parent / "d2", model={"text_batches_bf16": "off"})
    )
    assert rt2.health()["model"]["text_batches"] is None
