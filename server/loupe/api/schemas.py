"""Request and response schemas of the HTTP API (tables are not API types)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from loupe.search.query import Hit, SearchRequest, SearchResponse, Term
from loupe.storage.metadata.tables import Image, ImageText

__all__ = ["Hit", "SearchRequest", "SearchResponse", "Term"]


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class FileOutcome(BaseModel):
    filename: str
    status: str = Field(description="accepted | duplicate | rejected")
    id: int | None = Field(None, description="the image id (for duplicates: the existing image)")
    error: ErrorBody | None = None


class UploadResponse(BaseModel):
    files: list[FileOutcome]
    accepted: int
    duplicates: int
    rejected: int


class ImageSummary(BaseModel):
    id: int
    state: str
    original_name: str
    format: str
    width: int
    height: int
    size_bytes: int
    created_at: datetime
    thumbnail_url: str
    file_url: str
    tags: list[str]


class TextWord(BaseModel):
    text: str
    conf: float
    box: list[int] = Field(description="[x, y, width, height] in the (EXIF-oriented) image")
    line: int


class TextLine(BaseModel):
    text: str
    block: int
    box: list[int]


class ImageTextOut(BaseModel):
    content: str = Field(description="the text read, lines joined by newlines, blocks by blank lines")
    has_text: bool
    checked: bool = Field(description="false: the text-presence check found no text, Tesseract was skipped")
    languages: str
    ocr_ms: float
    lines: list[TextLine]
    words: list[TextWord]


class ImageDetail(ImageSummary):
    sha256: str
    mime: str
    frames: int
    attempts: int
    ready_at: datetime | None
    error: ErrorBody | None
    text: ImageTextOut | None = Field(None, description="what OCR read (null until processed, or OCR off)")


class ImagePage(BaseModel):
    images: list[ImageSummary]
    next_cursor: str | None


class HealthResponse(BaseModel):
    status: str
    version: str
    counts: dict[str, int]
    model: dict[str, Any]
    stores: dict[str, Any]
    warnings: list[dict[str, str]]


def image_summary(image: Image, tags: list[str]) -> ImageSummary:
    return ImageSummary(
        id=int(image.id),  # type: ignore[arg-type]
        state=image.state,
        original_name=image.original_name,
        format=image.format,
        width=image.width,
        height=image.height,
        size_bytes=image.size_bytes,
        created_at=image.created_at,
        thumbnail_url=f"/api/images/{image.id}/thumbnail",
        file_url=f"/api/images/{image.id}/file",
        tags=tags,
    )


def text_out(row: ImageText) -> ImageTextOut:
    data = row.data or {}
    return ImageTextOut(
        content=row.content,
        has_text=row.has_text,
        checked=row.checked,
        languages=row.languages,
        ocr_ms=row.ocr_ms,
        lines=[TextLine(text=ln[0], block=ln[1], box=list(ln[2:6])) for ln in data.get("lines", [])],
        words=[TextWord(text=w[0], conf=w[1], box=list(w[2:6]), line=w[7]) for w in data.get("words", [])],
    )


def image_detail(image: Image, tags: list[str], text: ImageText | None = None) -> ImageDetail:
    base = image_summary(image, tags).model_dump()
    error = ErrorBody(code=image.error_code, message=image.error_message or "") if image.error_code else None
    return ImageDetail(
        **base,
        sha256=image.sha256,
        mime=image.mime,
        frames=image.frames,
        attempts=image.attempts,
        ready_at=image.ready_at,
        error=error,
        text=text_out(text) if text is not None else None,
    )
