"""Request and response schemas of the HTTP API (tables are not API types)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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
    taken_at: datetime | None = None
    thumbnail_url: str
    file_url: str
    tags: list[str]
    albums: list[str] = Field(default_factory=list)
    rating: int | None = None
    starred: bool = False


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
    description: str | None = None
    camera: dict[str, str | None] = Field(default_factory=dict)
    location: dict[str, float] | None = None
    exif: dict[str, Any] | None = None
    text: ImageTextOut | None = Field(None, description="what OCR read (null until processed, or OCR off)")


class ImagePage(BaseModel):
    images: list[ImageSummary]
    next_cursor: str | None
    total: int | None = Field(None, description="exact count of images matching the filters")


class ImageChanges(BaseModel):
    """User fields. `tags`/`albums` replace the whole set; `add_*`/`remove_*` change it."""

    model_config = ConfigDict(extra="forbid")
    tags: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)]] | None
    ) = Field(None, max_length=200)
    add_tags: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)]] | None
    ) = Field(None, max_length=200)
    remove_tags: list[str] | None = Field(None, max_length=200)
    albums: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]] | None
    ) = Field(None, max_length=100)
    add_albums: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]] | None
    ) = Field(None, max_length=100)
    remove_albums: list[str] | None = Field(None, max_length=100)
    description: str | None = Field(None, max_length=10_000)
    rating: int | None = Field(None, ge=0, le=5)
    starred: bool | None = None


class BatchChanges(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(min_length=1, max_length=10_000)
    changes: ImageChanges


class BatchResult(BaseModel):
    updated: list[int]
    missing: list[int]


class ExistsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: list[Annotated[str, StringConstraints(pattern="^[0-9a-fA-F]{64}$")]] = Field(max_length=10_000)


class ExistsResponse(BaseModel):
    existing: dict[str, int] = Field(description="hash -> id of the images already stored")


class Duplicate(BaseModel):
    id: int
    distance: int = Field(description="perceptual-hash distance in bits (0: the same picture)")
    cosine: float | None = Field(None, description="CLIP cosine similarity (by=clip)")
    thumbnail_url: str


class DuplicatesResponse(BaseModel):
    duplicates: list[Duplicate]


class HealthResponse(BaseModel):
    status: str
    version: str
    counts: dict[str, int]
    model: dict[str, Any]
    stores: dict[str, Any]
    warnings: list[dict[str, str]]


def image_summary(
    image: Image, tags: list[str], albums: list[str] | None = None, url: Callable[[str], str] = str
) -> ImageSummary:
    return ImageSummary(
        id=int(image.id),  # type: ignore[arg-type]
        state=image.state,
        original_name=image.original_name,
        format=image.format,
        width=image.width,
        height=image.height,
        size_bytes=image.size_bytes,
        created_at=image.created_at,
        taken_at=image.taken_at,
        thumbnail_url=url(f"/api/images/{image.id}/thumbnail"),
        file_url=url(f"/api/images/{image.id}/file"),
        tags=tags,
        albums=albums or [],
        rating=image.rating,
        starred=image.starred,
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


def image_detail(
    image: Image,
    tags: list[str],
    text: ImageText | None = None,
    albums: list[str] | None = None,
    url: Callable[[str], str] = str,
) -> ImageDetail:
    base = image_summary(image, tags, albums, url).model_dump()
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
        description=image.description,
        camera={"make": image.camera_make, "model": image.camera_model, "lens": image.lens},
        location={"lat": image.gps_lat, "lon": image.gps_lon}
        if image.gps_lat is not None and image.gps_lon is not None
        else None,
        exif=image.exif,
    )
