"""The filter grammar and its two compilers.

A filter reads like the question: {"tags": {"any": ["family"], "none": ["work"]}, "taken": {"from": "2019-01-01",
"to": "2019-12-31"}, "camera": {"model": "X100V"}}. Sibling keys mean AND; {"and": [...]}, {"or": [...]} and
{"not": {...}} combine. The same tree compiles to SQL (authoritative: exact scans, the mirror's id selection,
browse, facets) and to a Qdrant filter over the payload each point carries (a test checks both select the same
ids).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import and_, exists, false, func, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from loupe.storage.metadata.tables import Image, ImageAlbum, ImageState, ImageTag, ImageText

EARTH_RADIUS_M = 6_371_008.8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SetCond(_Strict):
    any: list[str] | None = Field(None, max_length=200)
    all: list[str] | None = Field(None, max_length=200)
    none: list[str] | None = Field(None, max_length=200)


class TimeRange(_Strict):
    from_: datetime | date | None = Field(None, alias="from")
    to: datetime | date | None = None

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _day(cls, v: Any) -> Any:
        # "2019-12-31" is a whole day, not its first instant (pydantic would read it as midnight).
        if isinstance(v, str) and len(v) == 10:
            return date.fromisoformat(v)
        return v

    def bounds(self) -> tuple[datetime | None, datetime | None]:
        """Dates mean whole days (UTC): "to": "2019-12-31" includes that day."""
        lo = self.from_
        hi = self.to
        lo_dt = _as_utc(lo, end=False) if lo is not None else None
        hi_dt = _as_utc(hi, end=True) if hi is not None else None
        return lo_dt, hi_dt


def _as_utc(v: datetime | date, *, end: bool) -> datetime:
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    d = datetime.combine(v, time.min, tzinfo=UTC)
    return d + timedelta(days=1) - timedelta(microseconds=1) if end else d


class NumRange(_Strict):
    min: float | None = None
    max: float | None = None


class Camera(_Strict):
    make: str | None = Field(None, max_length=100)
    model: str | None = Field(None, max_length=100)
    lens: str | None = Field(None, max_length=200)


class Near(_Strict):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    radius_m: float = Field(gt=0, le=20_000_000)


class Box(_Strict):
    min_lat: float = Field(ge=-90, le=90)
    min_lon: float = Field(ge=-180, le=180)
    max_lat: float = Field(ge=-90, le=90)
    max_lon: float = Field(ge=-180, le=180)


class Filter(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "tags": {"any": ["family"], "none": ["work"]},
                    "taken": {"from": "2019-01-01", "to": "2019-12-31"},
                    "camera": {"model": "X100V"},
                },
                {
                    "or": [
                        {"albums": {"any": ["Lisbon"]}},
                        {"near": {"lat": 38.72, "lon": -9.14, "radius_m": 5000}},
                    ]
                },
            ]
        },
    )

    tags: SetCond | None = None
    albums: SetCond | None = None
    taken: TimeRange | None = None
    added: TimeRange | None = None
    width: NumRange | None = None
    height: NumRange | None = None
    aspect: NumRange | None = None
    rating: NumRange | None = None
    format: list[str] | None = Field(None, max_length=20)
    has_text: bool | None = None
    starred: bool | None = None
    camera: Camera | None = None
    near: Near | None = None
    box: Box | None = None
    and_: list[Filter] | None = Field(None, alias="and", max_length=50)
    or_: list[Filter] | None = Field(None, alias="or", max_length=50)
    not_: Filter | None = Field(None, alias="not")

    @field_validator("format")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return [f.upper().replace("JPG", "JPEG") for f in v] if v else v

    @model_validator(mode="after")
    def _not_empty(self) -> Filter:
        if not self.model_fields_set:
            raise ValueError("an empty filter object: leave `filters` out (or null) to match everything")
        return self


# ---------------------------------------------------------------- SQL


def _in_set(table: Any, column: Any, values: list[str]) -> ColumnElement[bool]:
    sub = select(col(table.image_id)).where(column.in_(values))
    return col(Image.id).in_(sub)


def _set_sql(table: Any, column: Any, cond: SetCond) -> list[ColumnElement[bool]]:
    parts: list[ColumnElement[bool]] = []
    if cond.any:
        parts.append(_in_set(table, column, cond.any))
    for v in cond.all or []:
        parts.append(_in_set(table, column, [v]))
    if cond.none:
        parts.append(not_(_in_set(table, column, cond.none)))
    return parts


def _range_sql(expr: Any, r: NumRange) -> list[ColumnElement[bool]]:
    out = []
    if r.min is not None:
        out.append(expr >= r.min)
    if r.max is not None:
        out.append(expr <= r.max)
    return out


def _haversine_sql(lat: float, lon: float) -> Any:
    rad = math.pi / 180
    dlat = (col(Image.gps_lat) - lat) * rad / 2
    dlon = (col(Image.gps_lon) - lon) * rad / 2
    a = func.sin(dlat) * func.sin(dlat) + math.cos(lat * rad) * func.cos(col(Image.gps_lat) * rad) * func.sin(
        dlon
    ) * func.sin(dlon)
    return 2 * EARTH_RADIUS_M * func.asin(func.sqrt(a))


def to_sql(f: Filter) -> ColumnElement[bool]:
    parts: list[ColumnElement[bool]] = []
    if f.tags:
        parts += _set_sql(ImageTag, col(ImageTag.tag), f.tags)
    if f.albums:
        parts += _set_sql(ImageAlbum, col(ImageAlbum.album), f.albums)
    for rng, column in ((f.taken, col(Image.taken_at)), (f.added, col(Image.created_at))):
        if rng:
            lo, hi = rng.bounds()
            if lo:
                parts.append(column >= lo)
            if hi:
                parts.append(column <= hi)
    if f.width:
        parts += _range_sql(col(Image.width), f.width)
    if f.height:
        parts += _range_sql(col(Image.height), f.height)
    if f.aspect:
        parts += _range_sql(col(Image.width) * 1.0 / col(Image.height), f.aspect)
    if f.rating:
        parts += _range_sql(col(Image.rating), f.rating)
    if f.format:
        parts.append(col(Image.format).in_(f.format))
    if f.has_text is not None:
        has = exists().where(col(ImageText.image_id) == col(Image.id), col(ImageText.has_text))
        parts.append(has if f.has_text else not_(has))
    if f.starred is not None:
        parts.append(col(Image.starred) == f.starred)
    if f.camera:
        columns: list[tuple[str | None, Any]] = [
            (f.camera.make, col(Image.camera_make)),
            (f.camera.model, col(Image.camera_model)),
            (f.camera.lens, col(Image.lens)),
        ]
        for value, column in columns:
            if value:
                parts.append(func.lower(column) == value.lower())
    if f.near:
        parts.append(col(Image.gps_lat).is_not(None))
        parts.append(_haversine_sql(f.near.lat, f.near.lon) <= f.near.radius_m)
    if f.box:
        b = f.box
        parts.append(col(Image.gps_lat).between(b.min_lat, b.max_lat))
        if b.min_lon <= b.max_lon:
            parts.append(col(Image.gps_lon).between(b.min_lon, b.max_lon))
        else:  # across the antimeridian
            parts.append(or_(col(Image.gps_lon) >= b.min_lon, col(Image.gps_lon) <= b.max_lon))
    for sub in f.and_ or []:
        parts.append(to_sql(sub))
    if f.or_ is not None:
        parts.append(or_(*[to_sql(sub) for sub in f.or_]) if f.or_ else false())
    if f.not_ is not None:
        parts.append(not_(to_sql(f.not_)))
    return and_(*parts) if parts else true()


def ready_and(f: Filter | None) -> ColumnElement[bool]:
    base = col(Image.state) == ImageState.ready
    return and_(base, to_sql(f)) if f is not None else base


# ---------------------------------------------------------------- Qdrant (a neutral tree each store converts)


def _ts(v: datetime | None) -> float | None:
    return v.timestamp() if v is not None else None


def to_qdrant(f: Filter) -> dict[str, list[Any]]:
    """{"must": [...], "should": [...], "must_not": [...]} of conditions:
    ("any", key, values) | ("eq", key, value) | ("range", key, gte, lte) | ("radius", key, lat, lon, metres) |
    ("box", key, min_lat, min_lon, max_lat, max_lon) | ("filter", subtree)."""
    must: list[Any] = []
    must_not: list[Any] = []
    for key, cond in (("tags", f.tags), ("albums", f.albums)):
        if cond:
            if cond.any:
                must.append(("any", key, cond.any))
            for v in cond.all or []:
                must.append(("eq", key, v))
            if cond.none:
                must_not.append(("any", key, cond.none))
    for key, rng in (("taken", f.taken), ("added", f.added)):
        if rng:
            lo, hi = rng.bounds()
            must.append(("range", key, _ts(lo), _ts(hi)))
    for key, nr in (("width", f.width), ("height", f.height), ("aspect", f.aspect), ("rating", f.rating)):
        if nr:
            must.append(("range", key, nr.min, nr.max))
    if f.format:
        must.append(("any", "format", f.format))
    # Booleans travel as 0/1 integers: Qdrant Edge's Python binding reads a bool match value as an integer.
    if f.has_text is not None:
        must.append(("eq", "has_text", int(f.has_text)))
    if f.starred is not None:
        must.append(("eq", "starred", int(f.starred)))
    if f.camera:
        for key, value in (
            ("camera_make", f.camera.make),
            ("camera_model", f.camera.model),
            ("lens", f.camera.lens),
        ):
            if value:
                must.append(("eq", key, value.lower()))
    if f.near:
        must.append(("radius", "location", f.near.lat, f.near.lon, f.near.radius_m))
    if f.box:
        b = f.box
        if b.min_lon <= b.max_lon:
            must.append(("box", "location", b.min_lat, b.min_lon, b.max_lat, b.max_lon))
        else:
            must.append(
                (
                    "filter",
                    {
                        "should": [
                            ("box", "location", b.min_lat, b.min_lon, b.max_lat, 180.0),
                            ("box", "location", b.min_lat, -180.0, b.max_lat, b.max_lon),
                        ]
                    },
                )
            )
    for sub in f.and_ or []:
        must.append(("filter", to_qdrant(sub)))
    if f.or_ is not None:
        must.append(("filter", {"should": [("filter", to_qdrant(sub)) for sub in f.or_]}))
    if f.not_ is not None:
        must_not.append(("filter", to_qdrant(f.not_)))
    return {"must": must, "must_not": must_not}


def payload_for(image: Image, tags: list[str], albums: list[str], has_text: bool) -> dict[str, Any]:
    """What each clip point carries for Qdrant's filtered search (payload indexes are created on these)."""
    p: dict[str, Any] = {
        "image_id": image.id,
        "tags": tags,
        "albums": albums,
        "added": image.created_at.timestamp() if image.created_at else None,
        "width": image.width,
        "height": image.height,
        "aspect": image.width / image.height if image.height else None,
        "format": image.format,
        "has_text": int(has_text),
        "starred": int(bool(image.starred)),
    }
    if image.taken_at is not None:
        p["taken"] = image.taken_at.timestamp()
    if image.rating is not None:
        p["rating"] = image.rating
    for key in ("camera_make", "camera_model", "lens"):
        value = getattr(image, key)
        if value:
            p[key] = value.lower()
    if image.gps_lat is not None and image.gps_lon is not None:
        p["location"] = {"lat": image.gps_lat, "lon": image.gps_lon}
    return p


# Payload indexes: (key, kind) with kind in keyword | integer | float | bool | geo.
PAYLOAD_INDEXES = [
    ("tags", "keyword"),
    ("albums", "keyword"),
    ("format", "keyword"),
    ("camera_make", "keyword"),
    ("camera_model", "keyword"),
    ("lens", "keyword"),
    ("taken", "float"),
    ("added", "float"),
    ("width", "integer"),
    ("height", "integer"),
    ("aspect", "float"),
    ("rating", "integer"),
    ("has_text", "integer"),
    ("starred", "integer"),
    ("location", "geo"),
    ("image_id", "integer"),
]
