"""Fusing ranked lists from several channels into one ranking.

Reciprocal-rank fusion (default): score = sum_c w_c / (k + rank_c), rank from 1; robust to channels whose scores
live on different scales (cosines of two models, keyword coverage). Weighted: score = sum_c w_c * s_c on the raw
channel scores, for callers who know their scales. Ties break on the smaller image id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def fuse(
    lists: Mapping[str, Sequence[tuple[int, float]]],
    weights: Mapping[str, float],
    *,
    method: str = "rrf",
    k: int = 60,
) -> list[tuple[int, float, dict[str, float]]]:
    fused: dict[int, float] = {}
    evidence: dict[int, dict[str, float]] = {}
    for channel, ranked in lists.items():
        w = float(weights.get(channel, 1.0))
        for rank, (image_id, score) in enumerate(ranked, start=1):
            contribution = w / (k + rank) if method == "rrf" else w * score
            fused[image_id] = fused.get(image_id, 0.0) + contribution
            evidence.setdefault(image_id, {})[channel] = score
    order = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(i, s, evidence[i]) for i, s in order]
