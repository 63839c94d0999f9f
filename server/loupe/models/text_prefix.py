"""Keys and values of shared query prefixes, kept so that a text pass runs only the tokens after them.

CLIP's text tower is causally masked: a token's keys and values in every layer depend only on the tokens before
it. Queries that begin with the same tokens ("a photo of a ...", the prompt templates of `prompt_templates`, a
client that adds its own template, the same words typed again with more after them) therefore share those tokens'
keys and values exactly, and a pass that is given them computes only the rest (models/text_pooled.py, `states`).
For the start token alone (every query's first) the pooled tower has always done this; this cache extends it to
any prefix that queries share.

What is kept: every pass counts the token prefixes of its queries (from the second token to all but the
end-of-text token). A prefix seen in MIN_COUNT queries is taken from the pass that sees it so (the graph returns
each layer's keys and values, so taking them costs no extra pass) and kept, the least recently used dropped beyond
the byte budget (`LOUPE_MODEL__TEXT_PREFIX_CACHE_MB`). A pass uses the longest kept prefix that all its queries
share. The prefix's states come from the same graph as the pass (the same runtime and quantization), so a query's
vector is what the whole pass would give, to the runtime's rounding (checked in tests/integration/test_text_tower.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Queries that must share a prefix before its states are kept: one repeat shows it is shared.
MIN_COUNT = 2
# Prefixes counted at most; beyond, every count is halved and those at zero forgotten (old queries fade).
MAX_COUNTED = 1 << 14


@dataclass
class Plan:
    """One pass's use of the cache: `length` tokens after the start token come from `keys` / `values` (layers,
    heads, length, head_dim), and `capture` lists (query, prefix length in tokens with the start token) to keep
    from this pass's states."""

    length: int
    keys: Any
    values: Any
    capture: list[tuple[int, int]] = field(default_factory=list)


class PrefixCache:
    """Thread-safe (passes run side by side). `empty`: (layers, heads, 0, head_dim) arrays of the graph's dtype,
    what a pass without a kept prefix is given."""

    def __init__(self, budget_bytes: int, empty: Any, min_count: int = MIN_COUNT) -> None:
        self.budget = budget_bytes
        self.empty = empty
        self.min_count = min_count
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[int, ...], tuple[Any, Any]] = OrderedDict()
        self._counts: dict[tuple[int, ...], int] = {}
        self.bytes = 0
        self.hits = 0  # passes that used a kept prefix
        self.tokens_saved = 0  # tokens those passes did not compute

    def __len__(self) -> int:
        return len(self._kept)

    def plan(self, rows: list[tuple[int, ...]]) -> Plan:
        """rows: each query's real tokens, start and end-of-text tokens included."""
        with self._lock:
            capture = self._count(rows)
            length, keys, values = 0, self.empty, self.empty
            # The longest kept prefix of the first query that every query shares, leaving each its last token.
            common = min(len(r) for r in rows) - 1
            first = rows[0]
            for other in rows[1:]:
                common = next((i for i in range(common) if other[i] != first[i]), common)
            for n in range(common, 1, -1):
                hit = self._kept.get(first[:n])
                if hit is not None:
                    self._kept.move_to_end(first[:n])
                    length, (keys, values) = n - 1, hit
                    self.hits += 1
                    self.tokens_saved += length * len(rows)
                    break
            # Only what is longer than the prefix this pass is given (its states are in the pass's outputs).
            capture = [(q, n) for q, n in capture if n - 1 > length]
            return Plan(length, keys, values, capture)

    def _count(self, rows: list[tuple[int, ...]]) -> list[tuple[int, int]]:
        """Count each query's prefixes once (a pass's duplicates are one query); the longest one per query that
        reaches min_count and is not kept yet."""
        seen: set[tuple[int, ...]] = set()
        capture = []
        for q, row in enumerate(rows):
            best = 0
            for n in range(2, len(row)):
                prefix = row[:n]
                if prefix in seen:
                    continue
                seen.add(prefix)
                c = self._counts.get(prefix, 0) + 1
                self._counts[prefix] = c
                if c >= self.min_count and prefix not in self._kept:
                    best = n
            if best:
                capture.append((q, best))
        if len(self._counts) > MAX_COUNTED:
            self._counts = {p: c // 2 for p, c in self._counts.items() if c // 2}
        return capture

    def learn(self, plan: Plan, rows: list[tuple[int, ...]], keys: list[Any], values: list[Any]) -> None:
        """Keep the prefixes `plan.capture` names from a pass's states: per layer, (1, heads, 1 + plan.length +
        T, head_dim), the start token, the prefix given, then the pass's T packed tokens after it."""
        if not plan.capture:
            return
        offsets = np.cumsum([0] + [len(r) - 1 - plan.length for r in rows])
        lead = 1 + plan.length
        with self._lock:
            for q, n in plan.capture:
                prefix = rows[q][:n]
                if prefix in self._kept:
                    continue
                own = slice(lead + int(offsets[q]), lead + int(offsets[q]) + n - lead)
                k = _stack([_cat(t[0, :, 1:lead], t[0, :, own]) for t in keys])
                v = _stack([_cat(t[0, :, 1:lead], t[0, :, own]) for t in values])
                self._kept[prefix] = (k, v)
                self.bytes += _nbytes(k) + _nbytes(v)
            while self.bytes > self.budget and self._kept:
                _, (k, v) = self._kept.popitem(last=False)
                self.bytes -= _nbytes(k) + _nbytes(v)


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np.concatenate([a, b], axis=1)
    import torch

    return torch.cat([a, b], 1)


def _stack(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.ascontiguousarray(np.stack(parts))
    import torch

    return torch.stack(parts).contiguous()


def _nbytes(t: Any) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else int(t.numel() * t.element_size())
