"""SQLModel tables: the source of truth for what exists. Schema changes go through Alembic (migrations/)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, ForeignKey, Integer, String, Text
from sqlmodel import Field, SQLModel

# 63-bit ids everywhere; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """Aware UTC (SQLModel's UTCDateTime stores UTC on SQLite and Postgres alike)."""
    return datetime.now(UTC)


class ImageState(StrEnum):
    pending = "pending"
    processing = "processing"
    ready = "ready"
    failed = "failed"


class ChangeOp(StrEnum):
    upsert = "upsert"
    delete = "delete"


class Image(SQLModel, table=True):
    __tablename__ = "images"

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    sha256: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    original_name: str = Field(default="", max_length=255)
    format: str = Field(max_length=16)
    mime: str = Field(max_length=64)
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    width: int
    height: int
    frames: int = 1
    state: str = Field(default=ImageState.pending, max_length=16, index=True)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=1000)
    attempts: int = 0
    next_attempt_at: datetime | None = None
    claimed_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)
    ready_at: datetime | None = None
    # From EXIF at ingest (all optional: many pictures carry none).
    taken_at: datetime | None = Field(default=None, index=True)
    camera_make: str | None = Field(default=None, max_length=100, index=True)
    camera_model: str | None = Field(default=None, max_length=100, index=True)
    lens: str | None = Field(default=None, max_length=200)
    gps_lat: float | None = Field(default=None, index=True)
    gps_lon: float | None = Field(default=None, index=True)
    orientation: int | None = None
    exif: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    phash: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True, index=True))
    # Set by people.
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    rating: int | None = Field(default=None, index=True)
    starred: bool = Field(default=False, index=True)


class ImageTag(SQLModel, table=True):
    __tablename__ = "image_tags"

    image_id: int = Field(
        sa_column=Column(BigId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    )
    tag: str = Field(sa_column=Column(String(100), primary_key=True, index=True))


class ImageAlbum(SQLModel, table=True):
    __tablename__ = "image_albums"

    image_id: int = Field(
        sa_column=Column(BigId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    )
    album: str = Field(sa_column=Column(String(200), primary_key=True, index=True))


class ImageText(SQLModel, table=True):
    """The words read in an image. Full-text indexes live beside it (migrations: SQLite FTS5 tables with porter
    and trigram tokenizers kept in sync by triggers; Postgres a generated tsvector with GIN and a pg_trgm index)."""

    __tablename__ = "image_text"

    image_id: int = Field(
        sa_column=Column(
            BigId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
        )
    )
    content: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    has_text: bool = Field(default=False, index=True)
    checked: bool = Field(default=True, description="False: the presence check skipped Tesseract")
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    chunks: int = 0
    languages: str = Field(default="eng", max_length=100)
    ocr_ms: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class Job(SQLModel, table=True):
    """A bulk upload: its files are staged on disk and ingested one by one; progress survives restarts."""

    __tablename__ = "jobs"

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(default="bulk", max_length=16)
    state: str = Field(default=JobState.queued, max_length=16, index=True)
    source: str = Field(default="files", max_length=16, description="zip | files")
    total: int = 0
    processed: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    albums: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    error: str | None = Field(default=None, max_length=1000)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class JobFile(SQLModel, table=True):
    __tablename__ = "job_files"

    job_id: str = Field(
        sa_column=Column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    )
    seq: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    name: str = Field(
        max_length=1000, description="the member name in the archive, or the uploaded file name"
    )
    status: str = Field(
        default="queued", max_length=16, description="queued | accepted | duplicate | rejected"
    )
    image_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=1000)


class ApiKey(SQLModel, table=True):
    """API keys are stored hashed (SHA-256 of a 192-bit random secret); the prefix finds the row."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    prefix: str = Field(sa_column=Column(String(16), nullable=False, unique=True))
    hash: str = Field(max_length=64)
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class ChangeLog(SQLModel, table=True):
    """Monotonic log of vector changes; the FAISS mirror replays it from its last applied sequence."""

    __tablename__ = "change_log"

    seq: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    image_id: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    model_version_id: int = Field(index=True)
    op: str = Field(max_length=8)
    created_at: datetime = Field(default_factory=utcnow)


class ModelVersion(SQLModel, table=True):
    """A model whose vectors live in their own Qdrant collection and FAISS mirror."""

    __tablename__ = "model_versions"

    id: int | None = Field(default=None, primary_key=True)
    channel: str = Field(max_length=16, index=True)
    name: str = Field(max_length=500, description="hub id or local path as configured")
    fingerprint: str = Field(max_length=64, description="hash of the model's config and weights")
    dim: int
    is_demo: bool = False
    active: bool = False
    created_at: datetime = Field(default_factory=utcnow)
