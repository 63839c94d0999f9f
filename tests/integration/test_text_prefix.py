"""Kept query prefixes (models/text_prefix.py): a text pass given the keys and values of a prefix its queries share
runs only the tokens after it, and gives the vectors the whole pass gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loupe.models import onnx_text, text_prefix
from loupe.models.clip import load_clip

# Queries sharing "a photo of a" (and some "a photo of a red"), others sharing nothing past the start token.
SHARED = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a red triangle on a noisy background",
    "a photo of a green star",
    "a photo of a red star",
    "a photo of a",
]
OTHERS = ["red", "a small green triangle", "blue square", "star"]


@pytest.mark.parametrize("kind,tolerance", [("onnx", 2e-5), ("onnx-w8", 2e-4)])
def test_passes_on_kept_prefixes_give_the_vectors_of_whole_passes(
    tiny_clip_dir: Path, tmp_path: Path, kind: str, tolerance: float
):
    clip = load_clip(str(tiny_clip_dir))
    assert onnx_text.attach(clip, kind, tmp_path / "onnx") == kind
    tower = clip.text_tower
    assert tower.takes_prefix and tower.prefixes is None  # none while the runtime is timed and checked
    texts = SHARED + OTHERS
    whole = np.stack([clip.embed_texts([t])[0] for t in texts])  # every token computed

    onnx_text.keep_prefixes(tower, 64)
    cache = tower.prefixes
    for _ in range(3):  # alone: the prefixes are kept from the second query that shares them, then used
        alone = np.stack([clip.embed_texts([t])[0] for t in texts])
        np.testing.assert_allclose(alone, whole, atol=tolerance)
    start = tuple(clip.tokenize(["a photo of a"], "np")["input_ids"][0][:5].tolist())  # start token + 4 words
    assert start in cache._kept
    assert cache.hits >= 2 * len(SHARED) and cache.tokens_saved >= 4 * 2 * (len(SHARED) - 1)
    # In passes: the shared prefix for a pass of SHARED, the start token alone for a pass mixing in OTHERS.
    hits = cache.hits
    np.testing.assert_allclose(clip.embed_texts(SHARED), whole[: len(SHARED)], atol=tolerance)
    assert cache.hits == hits + 1
    np.testing.assert_allclose(clip.embed_texts(texts), whole, atol=tolerance)
    assert cache.hits == hits + 1
    # Within the budget: a cache of 1 MB keeps what fits and still gives the same vectors.
    onnx_text.keep_prefixes(tower, 1)
    for _ in range(3):
        np.testing.assert_allclose(np.stack([clip.embed_texts([t])[0] for t in texts]), whole, atol=tolerance)
    assert 0 < tower.prefixes.bytes <= 1 << 20 and len(tower.prefixes)


def test_the_traced_bf16_copy_runs_on_kept_prefixes_too(tiny_clip_dir: Path):
    from loupe.models import bf16_text

    clip = load_clip(str(tiny_clip_dir))
    copy16 = bf16_text.Bf16TextTower(clip.model, clip.tokenize)
    assert copy16.traced is not None and copy16.takes_prefix  # traced with a prefix, checked without one

    def embed(texts: list[str]) -> np.ndarray:
        enc = clip.tokenize(texts)
        return copy16(enc["input_ids"], enc["attention_mask"])

    texts = SHARED + OTHERS
    whole = np.stack([embed([t])[0] for t in texts])
    assert np.min(np.sum(whole * clip.embed_texts_torch(texts), 1)) > bf16_text.COSINE_FLOOR
    onnx_text.keep_prefixes(copy16, 64)
    for _ in range(3):
        np.testing.assert_allclose(np.stack([embed([t])[0] for t in texts]), whole, atol=2e-3)
    np.testing.assert_allclose(embed(SHARED), whole[: len(SHARED)], atol=2e-3)
    assert copy16.prefixes.hits >= 2 * len(SHARED) and copy16.prefixes.tokens_saved > 0


def _row(*tokens: int) -> tuple[int, ...]:
    return (0, *tokens, 99)  # start token 0, end-of-text 99


def _states(rows: list[tuple[int, ...]], plan: text_prefix.Plan) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A pass's states as the graph lays them out, each column holding (query, position) so a test can read where a
    kept prefix came from: per layer (1, heads, 1 + given + T, head_dim)."""
    cols = [(-1, 0)] + [(-1, p) for p in range(1, 1 + plan.length)]
    for q, row in enumerate(rows):
        cols += [(q, p) for p in range(1 + plan.length, len(row))]
    layer = np.array(cols, np.float32).T[None, :, :, None].repeat(2, axis=3)  # heads 2: (query, position)
    return [layer, layer + 1000], [layer, layer]


def test_a_prefix_is_kept_once_two_queries_share_it_and_each_pass_uses_the_longest_all_share():
    empty = np.zeros((2, 2, 0, 2), np.float32)
    cache = text_prefix.PrefixCache(1 << 20, empty)
    a, b = _row(1, 2, 3, 4), _row(1, 2, 3, 5)
    plan = cache.plan([a])
    assert plan.length == 0 and plan.capture == [] and plan.keys is empty  # seen once: nothing kept
    plan = cache.plan([b])
    assert plan.length == 0 and plan.capture == [(0, 4)]  # (0, 1, 2, 3): shared with a, taken from b's pass
    cache.learn(plan, [b], *_states([b], plan))
    assert list(cache._kept) == [(0, 1, 2, 3)]
    keys, _ = cache._kept[(0, 1, 2, 3)]
    assert keys.shape == (2, 2, 3, 2)  # layers, heads, the 3 tokens after the start token, head_dim
    assert keys[1, 1, :, 0].tolist() == [1001, 1002, 1003] and keys[0, 0, :, 0].tolist() == [0, 0, 0]
    # A third query sharing it runs on it; so does a pass of two, and each query keeps its last token to run.
    c = _row(1, 2, 3, 6, 7)
    plan = cache.plan([c])
    assert plan.length == 3 and plan.keys.shape == (2, 2, 3, 2)
    assert cache.plan([c, a]).length == 3
    assert cache.plan([_row(1, 2, 3)]).length == 3  # all of it but its end-of-text token, which the pass runs
    assert cache.plan([_row(1, 2)]).length == 0
    # A pass whose queries part after the first word uses what they share: the start token alone here.
    assert cache.plan([c, _row(1, 7, 3, 4)]).length == 0
    # Kept from a pass that already ran on a prefix: the given columns, then the query's own.
    d = _row(1, 2, 3, 6, 8)
    plan = cache.plan([d])  # (0, 1, 2, 3, 6) now shared by c and d
    assert plan.length == 3 and plan.capture == [(0, 5)]
    cache.learn(plan, [d], *_states([d], plan))
    keys, _ = cache._kept[(0, 1, 2, 3, 6)]
    assert keys[0, 1, :, 0].tolist() == [1, 2, 3, 4] and keys[0, 0, :, 0].tolist() == [-1, -1, -1, 0]
    assert cache.plan([_row(1, 2, 3, 6, 9)]).length == 4


def test_kept_prefixes_stay_within_their_budget_least_recently_used_first(monkeypatch):
    empty = np.zeros((2, 2, 0, 2), np.float32)
    per_token = 2 * 2 * 2 * 4 * 2  # layers, heads, head_dim, float32, keys and values
    cache = text_prefix.PrefixCache(5 * per_token, empty)
    rows = {w: [_row(w, 1, 2, 3), _row(w, 1, 2, 4)] for w in (10, 20)}
    for w in (10, 20):
        cache.plan(rows[w][:1])
        plan = cache.plan(rows[w][1:])
        cache.learn(plan, rows[w][1:], *_states(rows[w][1:], plan))
    # Each prefix is 3 tokens after the start token: the second pushed the first out.
    assert list(cache._kept) == [(0, 20, 1, 2)] and cache.bytes == 3 * per_token
    # Counts fade: beyond MAX_COUNTED prefixes every count is halved, so one old sighting no longer counts.
    monkeypatch.setattr(text_prefix, "MAX_COUNTED", 4)
    cache.plan([_row(30, 1, 2, 3, 4, 5)])
    assert (0, 30) not in cache._counts


def test_the_runtime_keeps_prefixes_on_onnx_and_health_counts_them(make_settings, runtime_factory):
    rt = runtime_factory(make_settings())
    assert rt.health()["model"]["text_prefixes"] == {"kept": 0, "bytes": 0, "passes": 0, "tokens_saved": 0}
    for text in SHARED:
        rt.search.text_cache.get_many([text])
    got = rt.health()["model"]["text_prefixes"]
    assert (
        got["kept"] >= 1 and got["bytes"] > 0 and got["passes"] >= len(SHARED) - 2 and got["tokens_saved"] > 0
    )
    off = runtime_factory(
        make_settings(data_dir=rt.settings.data_dir.parent / "d2", model={"text_prefix_cache_mb": 0})
    )
    assert off.health()["model"]["text_prefixes"] is None
