"""The search request: weighted terms on channels, a limit, a cursor, a relevance cutoff.

These pydantic models are the request schema of POST /api/search (OpenAPI is generated from them) and the input
of SearchService; bounds are checked here, once, at the edge.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loupe.search.filters import Filter


class Channel(StrEnum):
    clip = "clip"
    ocr = "ocr"
    keyword = "keyword"
    auto = "auto"


class Term(BaseModel):
    """One term: exactly one of `text`, `image_id` or `vector`, with a weight (negative subtracts)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "a red bicycle", "weight": 1}]}
    )

    text: str | None = Field(
        None,
        min_length=1,
        max_length=20_000,
        description="words to search for (truncated to the model's context)",
    )
    image_id: int | None = Field(None, ge=1, le=2**63 - 1, description="an image already in the library")
    vector: list[float] | None = Field(None, min_length=1, max_length=8192, description="a raw query vector")
    weight: float = Field(1.0, ge=-100, le=100, description="negative weights move results away")
    channel: Channel = Field(
        Channel.clip, description="text terms: clip (default); image and vector terms: clip"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Term:
        given = [k for k in ("text", "image_id", "vector") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a term needs exactly one of text, image_id or vector")
        if self.text is not None and not self.text.strip():
            raise ValueError("text must not be blank")
        if self.channel != Channel.clip and self.text is None:
            raise ValueError("only text terms can use a channel other than clip")
        return self


class Fusion(BaseModel):
    """How channels are combined when a query uses several (auto, or terms on different channels)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["rrf", "weighted"] = "rrf"
    weights: dict[Literal["clip", "ocr", "keyword"], float] = Field(
        default_factory=dict, description="per-channel weights (default: the server's settings)"
    )


class SearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": [{"text": "red bicycle", "weight": 1}, {"image_id": 42, "weight": -0.5}],
                    "limit": 50,
                }
            ]
        },
    )

    query: list[Term] = Field(..., min_length=1, max_length=64)
    filters: Filter | None = Field(None, description="only images matching this (see the Filter schema)")
    limit: int = Field(50, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=4096, description="next_cursor of the previous page")
    min_score: float | None = Field(
        None, ge=-1, le=10, description="drop hits scoring below this (the score shown)"
    )
    fusion: Fusion | None = None
    collapse_duplicates: bool = Field(
        False, description="show one picture per group of near-duplicates (perceptual hash) within each page"
    )


class TextMatch(BaseModel):
    matched: list[str] = Field(description="the words in the image that matched")
    snippet: str = Field(description="the line(s) with the matched words, HTML with <mark>")
    boxes: list[list[int]] = Field(description="[x, y, width, height] of each matched word in the image")


class Hit(BaseModel):
    id: int
    score: float
    channels: dict[str, float] = Field(description="the channels that matched and each one's own score")
    text: TextMatch | None = Field(None, description="for OCR and keyword matches: what matched, and where")
    width: int
    height: int
    thumbnail_url: str
    file_url: str


class SearchResponse(BaseModel):
    hits: list[Hit]
    next_cursor: str | None
    timing_ms: dict[str, float]
    plan: dict[str, Any]
    query_term: Term | None = Field(
        None, description="the composed query as one vector term (image search): send it for later pages"
    )
