"""The keyword channel: candidates from the database's full-text indexes, scored here the same way on SQLite
and Postgres (so a ranking never depends on which database holds the library).

Per query word, the best of: the same word (1.0), a stemmed form (the query word extends a stored word by at
most two letters, "cars" ~ "car": 0.9), a prefix of a stored word (0.8), a substring of three or more characters
inside a stored word (0.5). The image's score is the mean over the query words, plus 0.5 when a multi-word query
appears as a phrase.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

WORD = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return [t.lower() for t in WORD.findall(text)]


def _match(token: str, word: str) -> float:
    if word == token:
        return 1.0
    if len(word) >= 3 and token.startswith(word) and len(token) - len(word) <= 2:
        return 0.9
    if word.startswith(token):
        return 0.8
    if len(token) >= 3 and token in word:
        return 0.5
    return 0.0


@dataclass
class KeywordMatch:
    score: float
    matched: list[str] = field(default_factory=list)  # stored words (lower case) that matched


def score_text(query_tokens: list[str], content: str) -> KeywordMatch:
    words = tokens(content)
    if not query_tokens or not words:
        return KeywordMatch(0.0)
    total = 0.0
    matched: dict[str, None] = {}
    for t in query_tokens:
        best, best_words = 0.0, []
        for w in set(words):
            m = _match(t, w)
            if m > best:
                best, best_words = m, [w]
            elif m == best and m > 0:
                best_words.append(w)
        total += best
        matched.update((w, None) for w in best_words)
    score = total / len(query_tokens)
    if len(query_tokens) > 1 and f" {' '.join(query_tokens)} " in f" {' '.join(words)} ":
        score += 0.5
    return KeywordMatch(score, list(matched))


def text_evidence(data: dict[str, Any], matched: set[str], chunk: int | None = None) -> dict[str, Any]:
    """The matched words, a highlighted snippet (HTML with <mark>) and the boxes to draw, from stored OCR data.
    With `chunk` (an OCR-channel hit), the evidence is that chunk's lines."""
    words = data.get("words", [])
    lines = data.get("lines", [])
    if chunk is not None:
        chunk_lines = set(data.get("chunks", [[]])[chunk]) if chunk < len(data.get("chunks", [])) else set()
        hit_words = [w for w in words if w[7] in chunk_lines]
        line_ids = sorted(chunk_lines)
    else:
        hit_words = [w for w in words if tokens(w[0]) and set(tokens(w[0])) & matched]
        counts: dict[int, int] = {}
        for w in hit_words:
            counts[w[7]] = counts.get(w[7], 0) + 1
        line_ids = [max(counts, key=lambda k: counts[k])] if counts else []
    snippet_parts = []
    for li in line_ids:
        line_words = [w for w in words if w[7] == li]
        snippet_parts.append(
            " ".join(
                f"<mark>{html.escape(w[0])}</mark>" if w in hit_words else html.escape(w[0])
                for w in line_words
            )
        )
    if not snippet_parts and line_ids and line_ids[0] < len(lines):
        snippet_parts.append(html.escape(lines[line_ids[0]][0]))
    return {
        "matched": [w[0] for w in hit_words],
        "snippet": " … ".join(snippet_parts),
        "boxes": [[w[2], w[3], w[4], w[5]] for w in hit_words],
    }
