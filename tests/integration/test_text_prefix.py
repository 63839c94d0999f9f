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
    # In passes: each query given its longest kept prefix, OTHERS none.
    hits, saved = cache.hits, cache.tokens_saved
    np.testing.assert_allclose(clip.embed_texts(SHARED), whole[: len(SHARED)], atol=tolerance)
    assert cache.hits == hits + 1 and cache.tokens_saved >= saved + 4 * len(SHARED)
    np.testing.assert_allclose(clip.embed_texts(texts), whole, atol=tolerance)
    assert cache.hits == hits + 2
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
    kept prefix came from: per layer (1, heads, 1 + C + T, head_dim), the given columns' query -1, their position
    their column."""
    width = plan.allowed.shape[1]
    cols = [(-1, 0)] + [(-1, c) for c in range(width)]
    for q, row in enumerate(rows):
        cols += [(q, p) for p in range(1 + plan.lengths[q], len(row))]
    layer = np.array(cols, np.float32).T[None, :, :, None].repeat(2, axis=3)  # heads 2: (query, position)
    return [layer, layer + 1000], [layer, layer]


def _learn(cache: text_prefix.PrefixCache, rows: list[tuple[int, ...]]) -> text_prefix.Plan:
    plan = cache.plan(rows)
    cache.learn(plan, rows, *_states(rows, plan))
    return plan


def test_a_prefix_is_kept_once_two_queries_share_it_and_each_query_is_given_its_longest():
    empty = np.zeros((2, 2, 0, 2), np.float32)
    cache = text_prefix.PrefixCache(1 << 20, empty)
    a, b = _row(1, 2, 3, 4), _row(1, 2, 3, 5)
    plan = _learn(cache, [a])
    assert plan.lengths == [0] and plan.capture == [] and plan.keys is empty  # seen once: nothing kept
    assert plan.allowed.shape == (1, 0)
    plan = _learn(cache, [b])
    assert plan.lengths == [0] and plan.capture == [
        (0, 4)
    ]  # (0, 1, 2, 3): shared with a, taken from b's pass
    assert list(cache._kept) == [(0, 1, 2, 3)]
    keys, _ = cache._kept[(0, 1, 2, 3)]
    assert keys.shape == (2, 2, 3, 2)  # layers, heads, the 3 tokens after the start token, head_dim
    assert keys[1, 1, :, 0].tolist() == [1001, 1002, 1003] and keys[0, 0, :, 0].tolist() == [0, 0, 0]
    # A third query sharing it is given it; each query keeps at least its end-of-text token to run.
    c = _row(1, 2, 3, 6, 7)
    plan = cache.plan([c])
    assert plan.lengths == [3] and plan.keys.shape == (2, 2, 3, 2) and plan.allowed.tolist() == [[1, 1, 1]]
    assert cache.plan([_row(1, 2, 3)]).lengths == [3]  # all but its end-of-text token
    assert cache.plan([_row(1, 2)]).lengths == [0]
    # In one pass, each query its own: one given the kept prefix (its columns once), one given none.
    plan = cache.plan([c, _row(7, 3, 4), a])
    assert plan.lengths == [3, 0, 3] and plan.columns == [0, 0, 0] and plan.keys.shape == (2, 2, 3, 2)
    assert plan.allowed.tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1]]
    # Kept from a pass in which queries were given other prefixes: the query's given columns, then its own.
    _learn(cache, [_row(8, 9, 1), _row(8, 9, 2)])  # (0, 8, 9) kept from the second of these
    d, e = _row(8, 9, 5), _row(1, 2, 3, 6, 8)  # (0, 1, 2, 3, 6) now shared by c and e
    plan = _learn(cache, [d, e])
    assert plan.lengths == [2, 3] and plan.columns == [0, 2] and plan.capture == [(1, 5)]
    assert plan.allowed.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    keys, _ = cache._kept[(0, 1, 2, 3, 6)]  # e's given columns 2-4, then its own token at position 4
    assert keys[0, 1, :, 0].tolist() == [2, 3, 4, 4] and keys[0, 0, :, 0].tolist() == [-1, -1, -1, 1]
    assert cache.plan([_row(1, 2, 3, 6, 9)]).lengths == [4]


def test_the_graph_inputs_hold_each_querys_tokens_after_its_prefix():
    rows = [_row(1, 2, 3, 4), _row(5), _row(1, 2, 6)]
    ids, mask, start = text_prefix.inputs(rows, [2, 0, 2])
    assert ids.tolist() == [[3, 4, 99], [5, 99, 0], [6, 99, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]] and start.tolist() == [3, 1, 3]


def test_kept_prefixes_stay_within_their_budget_least_recently_used_first(monkeypatch):
    empty = np.zeros((2, 2, 0, 2), np.float32)
    per_token = 2 * 2 * 2 * 4 * 2  # layers, heads, head_dim, float32, keys and values
    cache = text_prefix.PrefixCache(5 * per_token, empty)
    for w in (10, 20):
        _learn(cache, [_row(w, 1, 2, 3)])
        _learn(cache, [_row(w, 1, 2, 4)])
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


def test_prompt_templates_run_each_on_its_own_kept_prefix_with_the_vectors_of_whole_passes(
    make_settings, runtime_factory
):
    """With prompt templates every query is encoded once per template in one pass, so the pass's queries start
    with different prefixes: each is given its own template's."""
    templates = {"search": {"prompt_templates": ["a photo of a {}", "a drawing of a {}", "{} in the snow"]}}
    on = runtime_factory(make_settings(**templates))
    off = runtime_factory(
        make_settings(
            data_dir=on.settings.data_dir.parent / "off", model={"text_prefix_cache_mb": 0}, **templates
        )
    )
    words = ["red circle", "blue square", "green star", "red triangle", "small blue circle", "yellow star"]
    for word in words:
        np.testing.assert_allclose(
            on.search.embed_query_texts([word])[0], off.search.embed_query_texts([word])[0], atol=2e-5
        )
    got = on.health()["model"]["text_prefixes"]
    # From the third word on, "a photo of a" and "a drawing of a" are given: 4 tokens each, in the same passes.
    assert got["passes"] >= len(words) - 2 and got["tokens_saved"] >= 8 * (len(words) - 2)
