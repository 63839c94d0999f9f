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
