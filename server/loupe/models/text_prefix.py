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
the byte budget (`LOUPE_MODEL__TEXT_PREFIX_CACHE_MB`). Each query of a pass is given the longest kept prefix it
starts with, whatever the others are given (the prompt templates of one query differ in their first words), and
runs only its tokens after it. The prefix's states come from the same graph as the pass (the same runtime and
quantization), so a query's vector is what the whole pass would give, to the runtime's rounding (checked in
tests/integration/test_text_prefix.py).
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
    """One pass's use of the cache. Query q is given `lengths[q]` tokens after the start token (0: none), the
    columns `columns[q]` onward of `keys` / `values` (layers, heads, C, head_dim: the distinct kept prefixes given,
    one after another); `allowed` (queries, C) is 1 where a query was given a column. `capture` lists (query, prefix
    length in tokens with the start token) to keep from this pass's states."""

    lengths: list[int]
    columns: list[int]
    keys: Any
    values: Any
    allowed: np.ndarray
    capture: list[tuple[int, int]] = field(default_factory=list)


def inputs(rows: list[tuple[int, ...]], lengths: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's input_ids, attention_mask (queries, longest) and start (queries,) for rows given `lengths`
    tokens after the start token: each query's tokens after them, right padded with 0."""
    tails = [row[1 + g :] for row, g in zip(rows, lengths, strict=True)]
    ids = np.zeros((len(rows), max(len(t) for t in tails)), np.int64)
    mask = np.zeros_like(ids)
    for q, tail in enumerate(tails):
        ids[q, : len(tail)], mask[q, : len(tail)] = tail, 1
    return ids, mask, np.asarray([1 + g for g in lengths], np.int64)


def unplanned(queries: int, empty: Any) -> Plan:
    """A pass given no kept prefix (a tower without a cache, or while its runtime is timed)."""
    return Plan([0] * queries, [0] * queries, empty, empty, np.zeros((queries, 0), np.float32))


def encode(cache: PrefixCache | None, empty: Any, input_ids: Any, attention_mask: Any, run: Any) -> Any:
    """One pass of a tower whose graph takes prefix states (models/text_pooled.py, `states`), on the padded rows
    `input_ids` / `attention_mask` (numpy or torch): each query given its longest kept prefix in `cache` (none
    without one), the new prefixes kept. `run(plan, ids, mask, start)` runs the graph on the numpy inputs and
    returns its outputs, the embedding first, each layer's keys then values after it where `plan.capture` asks
    for them. Returns the embedding output as the graph gave it."""
    lengths = attention_mask.sum(1).tolist()
    rows = [tuple(r[:n].tolist()) for r, n in zip(input_ids, lengths, strict=True)]
    plan = cache.plan(rows) if cache is not None else unplanned(len(rows), empty)
    out = run(plan, *inputs(rows, plan.lengths))
    if plan.capture and cache is not None:
        half = (len(out) - 1) // 2
        cache.learn(plan, rows, list(out[1 : 1 + half]), list(out[1 + half :]))
    return out[0]


class PrefixCache:
    """Thread-safe (passes run side by side). `empty`: (layers, heads, 0, head_dim) of the graph's dtype and kind
    (numpy for ONNX Runtime, torch for the bf16 copy), what a pass without a kept prefix is given."""

    def __init__(self, budget_bytes: int, empty: Any, min_count: int = MIN_COUNT) -> None:
        self.budget = budget_bytes
        self.empty = empty
        self.min_count = min_count
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[int, ...], tuple[Any, Any]] = OrderedDict()
        self._counts: dict[tuple[int, ...], int] = {}
        self.bytes = 0
        self.hits = 0  # passes in which a query was given a kept prefix
        self.tokens_saved = 0  # tokens those passes did not compute

    def __len__(self) -> int:
        return len(self._kept)

    def plan(self, rows: list[tuple[int, ...]]) -> Plan:
        """rows: each query's real tokens, start and end-of-text tokens included."""
        with self._lock:
            capture = self._count(rows)
            given: dict[tuple[int, ...], int] = {}  # prefix -> its first column
            parts: list[tuple[Any, Any]] = []
            lengths, columns, width = [], [], 0
            for row in rows:
                length = column = 0
                for n in range(len(row) - 1, 1, -1):  # the longest kept, leaving the end-of-text token to run
                    prefix = row[:n]
                    hit = self._kept.get(prefix)
                    if hit is None:
                        continue
                    if prefix not in given:
                        self._kept.move_to_end(prefix)
                        given[prefix], width = width, width + n - 1
                        parts.append(hit)
                    length, column = n - 1, given[prefix]
                    break
                lengths.append(length)
                columns.append(column)
            allowed = np.zeros((len(rows), width), np.float32)
            for q, (length, column) in enumerate(zip(lengths, columns, strict=True)):
                allowed[q, column : column + length] = 1
            keys = _cat([k for k, _ in parts], 2) if parts else self.empty
            values = _cat([v for _, v in parts], 2) if parts else self.empty
            if parts:
                self.hits += 1
                self.tokens_saved += sum(lengths)
            # Only what is longer than the prefix the query is given (its states are in the pass's outputs).
            capture = [(q, n) for q, n in capture if n - 1 > lengths[q]]
            return Plan(lengths, columns, keys, values, allowed, capture)

    def _count(self, rows: list[tuple[int, ...]]) -> list[tuple[int, int]]:
        """Count each query's prefixes (a pass holds each text once: models/batching.py); the longest one per query
        that reaches min_count and is not kept yet."""
        capture = []
        for q, row in enumerate(rows):
            best = 0
            for n in range(2, len(row)):
                prefix = row[:n]
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
        """Keep the prefixes `plan.capture` names from a pass's states: per layer, (1, heads, 1 + C + T, head_dim),
        the start token, the C prefix columns given, then the pass's T packed tokens."""
        if not plan.capture:
            return
        width = plan.allowed.shape[1]
        offsets = np.cumsum([0] + [len(r) - 1 - g for r, g in zip(rows, plan.lengths, strict=True)])
        with self._lock:
            for q, n in plan.capture:
                prefix = rows[q][:n]
                if prefix in self._kept:
                    continue
                g, c = plan.lengths[q], plan.columns[q]
                own = 1 + width + int(offsets[q])
                parts = (slice(1 + c, 1 + c + g), slice(own, own + n - 1 - g))
                k = _stack([_cat([t[0, :, part] for part in parts], 1) for t in keys])
                v = _stack([_cat([t[0, :, part] for part in parts], 1) for t in values])
                self._kept[prefix] = (k, v)
                self.bytes += _nbytes(k) + _nbytes(v)
            while self.bytes > self.budget and self._kept:
                _, (k, v) = self._kept.popitem(last=False)
                self.bytes -= _nbytes(k) + _nbytes(v)


def _cat(parts: list[Any], axis: int) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=axis)
    import torch

    return torch.cat(parts, axis)


def _stack(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.ascontiguousarray(np.stack(parts))
    import torch

    return torch.stack(parts).contiguous()


def _nbytes(t: Any) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else int(t.numel() * t.element_size())
