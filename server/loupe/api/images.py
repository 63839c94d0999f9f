"""Images: upload, browse, detail, files, delete, similar."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, patch, post
from litestar.datastructures import UploadFile
from litestar.params import FromPath, JSONBody, PathParameter, QueryParameter
from litestar.response import File, Response
from pydantic import ValidationError
from sqlalchemy import and_, true
from sqlmodel import col

from loupe.api.deps import RT, blocking
from loupe.api.errors import envelope
from loupe.api.schemas import (
    BatchChanges,
    BatchResult,
    Duplicate,
    DuplicatesResponse,
    ErrorBody,
    ExistsRequest,
    ExistsResponse,
    FileOutcome,
    ImageChanges,
    ImageDetail,
    ImagePage,
    SearchResponse,
    UploadResponse,
    image_detail,
    image_summary,
)
from loupe.errors import BadRequest, Conflict, NotFound
from loupe.ingest.bulk import job_dict
from loupe.runtime import Runtime
from loupe.search.filters import Filter, ready_and, to_sql
from loupe.signing import Signer, digest
from loupe.storage.metadata.tables import Image, ImageState

TAG_MAX = 100
MAX_ID = 2**63 - 1  # ids are 63-bit everywhere (database, Qdrant, FAISS)
ImageId = Annotated[int, PathParameter(ge=1, le=MAX_ID)]


def parse_filter(raw: str | None) -> Filter | None:
    """The `filters` query parameter: JSON in the filter grammar; errors name the field."""
    if raw is None or not raw.strip():
        return None
    try:
        return Filter.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"filters is not JSON: {exc.msg}", code="bad_filter", detail={"field": "filters"}
        ) from exc
    except ValidationError as exc:
        problems = [
            {"field": ".".join(["filters", *(str(p) for p in e["loc"])]), "message": e["msg"]}
            for e in exc.errors()
        ]
        raise BadRequest(
            "; ".join(f"{p['field']}: {p['message']}" for p in problems),
            code="bad_filter",
            detail={"fields": [p["field"] for p in problems], "problems": problems},
        ) from exc


def parse_tags(values: list[str]) -> list[str]:
    tags: list[str] = []
    for value in values:
        for tag in value.split(","):
            tag = tag.strip()
            if not tag:
                continue
            if len(tag) > TAG_MAX:
                raise BadRequest(
                    f"tag longer than {TAG_MAX} characters", code="bad_tag", detail={"field": "tags"}
                )
            tags.append(tag)
    return list(dict.fromkeys(tags))


async def read_files(request: Request[Any, Any, Any], field: str) -> list[tuple[str | None, bytes]]:
    if not (request.content_type[0] or "").startswith("multipart/form-data"):
        raise BadRequest("send the files as multipart/form-data", code="not_multipart")
    form = await request.form()
    files: list[tuple[str | None, bytes]] = []
    for value in form.getall(field) if field in form else []:
        if isinstance(value, UploadFile):
            files.append((value.filename, await value.read()))
        else:
            raise BadRequest(f"the {field!r} part must be a file", code="not_a_file", detail={"field": field})
    return files


async def load_detail(rt: Runtime, image_id: int) -> ImageDetail:
    image = await blocking(rt.repo.get_image, image_id)
    if image is None:
        raise NotFound(f"image {image_id} does not exist")
    tags = await blocking(rt.repo.tags_for, [image_id])
    albums = await blocking(rt.repo.albums_for, [image_id])
    texts = await blocking(rt.repo.get_texts, [image_id])
    return image_detail(image, tags.get(image_id, []), texts.get(image_id), albums.get(image_id, []), rt.url)


@get("/api/duplicates", tags=["images"], summary="Groups of near-duplicate images across the library")
async def duplicate_groups(
    rt: RT,
    max_distance: Annotated[int, QueryParameter(ge=0, le=16)] = 4,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    groups = await blocking(rt.repo.duplicate_groups, max_distance, limit)
    return {
        "groups": [
            [{"id": i, "distance": d, "thumbnail_url": f"/api/images/{i}/thumbnail"} for i, d in g]
            for g in groups
        ]
    }


@get("/api/jobs/{job_id:str}", tags=["images"], summary="A bulk job's progress and per-file outcomes")
async def job_status(
    rt: RT,
    job_id: FromPath[str],
    offset: Annotated[int, QueryParameter(ge=0)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    job, files = await blocking(rt.bulk.get, job_id, offset, limit)
    return job_dict(job, files)


class ImageController(Controller):
    path = "/api/images"
    tags = ["images"]

    @post(
        "/",
        status_code=200,
        summary="Upload one or many images",
        description=(
            "multipart/form-data with one or more `file` parts and optional `tags` (comma-separated, repeatable). "
            "Answers per file: accepted, duplicate (with the existing id) or rejected (with a code). "
            "A request whose files are all rejected answers 4xx with the error envelope. The accepted files are "
            "recorded in one transaction: after a 5xx none of them is, and the request can be sent again."
        ),
        responses={},
    )
    async def upload(self, request: Request[Any, Any, Any], rt: RT) -> Response[Any]:
        files = await read_files(request, "file")
        if not files:
            raise BadRequest("no `file` parts in the request", code="no_files", detail={"field": "file"})
        form = await request.form()
        tags = parse_tags([v for v in form.getall("tags") if isinstance(v, str)] if "tags" in form else [])
        albums = parse_tags(
            [v for v in form.getall("albums") if isinstance(v, str)] if "albums" in form else []
        )
        outcomes = await blocking(rt.ingest.upload, files, tags, albums)
        body = UploadResponse(
            files=[
                FileOutcome(
                    filename=o.filename,
                    status=o.status,
                    id=o.id,
                    error=ErrorBody(**o.error) if o.error else None,
                )
                for o in outcomes
            ],
            accepted=sum(o.status == "accepted" for o in outcomes),
            duplicates=sum(o.status == "duplicate" for o in outcomes),
            rejected=sum(o.status == "rejected" for o in outcomes),
        )
        if body.rejected == len(outcomes):
            first = outcomes[0].error or {"code": "rejected", "message": "rejected"}
            status = {"unsupported_format": 415, "file_too_large": 413, "too_many_pixels": 413}.get(
                first["code"], 400
            )
            if len(outcomes) == 1:
                return envelope(status, first["code"], first["message"], body.model_dump(mode="json"))
            return envelope(400, "all_rejected", "every file was rejected", body.model_dump(mode="json"))
        return Response(body)

    @post(
        "/bulk",
        status_code=202,
        summary="Bulk upload: a zip (`archive` part) or many `file` parts, processed as a job",
        description="Answers at once with a job id; follow progress at GET /api/jobs/{id}. Optional `tags` and "
        "`albums` apply to every file. Archives are streamed to disk; zip-slip names, zip bombs, encrypted and "
        "truncated archives are refused with a clear error.",
    )
    async def bulk(self, request: Request[Any, Any, Any], rt: RT) -> dict[str, Any]:
        if not (request.content_type[0] or "").startswith("multipart/form-data"):
            raise BadRequest("send the archive or files as multipart/form-data", code="not_multipart")
        form = await request.form()
        tags = parse_tags([v for v in form.getall("tags") if isinstance(v, str)] if "tags" in form else [])
        albums = parse_tags(
            [v for v in form.getall("albums") if isinstance(v, str)] if "albums" in form else []
        )
        archives = (
            [v for v in form.getall("archive") if isinstance(v, UploadFile)] if "archive" in form else []
        )
        files = [v for v in form.getall("file") if isinstance(v, UploadFile)] if "file" in form else []
        if (archives and files) or len(archives) > 1:
            raise BadRequest("send one `archive` or many `file` parts, not both", code="bad_bulk_request")
        if archives:
            job = await blocking(rt.bulk.from_zip, archives[0].file, tags, albums)
        elif files:
            job = await blocking(rt.bulk.from_files, [(f.filename, f.file) for f in files], tags, albums)
        else:
            raise BadRequest("no `archive` or `file` parts in the request", code="no_files")
        return {"job_id": job.id, "total": job.total, "status_url": f"/api/jobs/{job.id}"}

    @get(
        "/",
        summary="Browse the library (newest first, or by capture time or name), optionally filtered",
        description="`filters` is the search filter grammar as JSON, e.g. "
        '`{"tags": {"any": ["family"]}, "taken": {"from": "2019-01-01"}}`.',
    )
    async def browse(
        self,
        rt: RT,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, QueryParameter(max_length=512)] = None,
        only: Annotated[
            ImageState | None, QueryParameter(name="state", description="only images in this state")
        ] = None,
        filters: Annotated[str | None, QueryParameter(max_length=20_000, description="filter JSON")] = None,
        sort: Annotated[Literal["added", "taken", "name"], QueryParameter()] = "added",
    ) -> ImagePage:
        flt = parse_filter(filters)
        if flt is None and sort == "added":
            signer = Signer(rt.secret, "browse")
            before = int(signer.loads(cursor)["before"]) if cursor else None
            rows = await blocking(
                rt.repo.browse, before_id=before, limit=limit + 1, states=[only] if only else None
            )
            page = rows[:limit]
            next_cursor = signer.dumps({"before": page[-1].id}) if len(rows) > limit and page else None
            total = None
        else:
            signer = Signer(rt.secret, "browse-filtered")
            scope = digest({"f": filters, "s": sort, "st": only})
            offset = 0
            if cursor:
                data = signer.loads(cursor)
                if data.get("h") != scope:
                    raise BadRequest(
                        "cursor belongs to other filters", code="bad_cursor", detail={"field": "cursor"}
                    )
                offset = int(data["o"])
            where = to_sql(flt) if flt is not None else true()
            if only:
                where = and_(where, col(Image.state) == only)
            rows = await blocking(rt.repo.browse_where, where, sort=sort, offset=offset, limit=limit + 1)
            page = rows[:limit]
            next_cursor = signer.dumps({"h": scope, "o": offset + limit}) if len(rows) > limit else None
            total = await blocking(rt.repo.count_where, where)
        ids = [r.id or 0 for r in page]
        tags = await blocking(rt.repo.tags_for, ids)
        albums = await blocking(rt.repo.albums_for, ids)
        return ImagePage(
            images=[
                image_summary(r, tags.get(r.id or 0, []), albums.get(r.id or 0, []), rt.url) for r in page
            ],
            next_cursor=next_cursor,
            total=total,
        )

    @get("/facets", summary="Counts of tags, albums, years, cameras and formats among matching images")
    async def facets(
        self,
        rt: RT,
        filters: Annotated[str | None, QueryParameter(max_length=20_000, description="filter JSON")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 20,
    ) -> dict[str, Any]:
        flt = parse_filter(filters)
        where = ready_and(flt)
        facets = await blocking(rt.repo.facets, where, limit)
        total = await blocking(rt.repo.count_where, where)
        return {"total": total, "exact": True, **facets}

    @patch("/{image_id:int}", summary="Change an image's tags, albums, description, rating or star")
    async def edit(self, rt: RT, image_id: ImageId, data: JSONBody[ImageChanges]) -> ImageDetail:
        changes = data.model_dump(exclude_unset=True)
        found = await blocking(rt.ingest.edit, [image_id], changes)
        if not found:
            raise NotFound(f"image {image_id} does not exist")
        return await load_detail(rt, image_id)

    @post("/batch", status_code=200, summary="Apply the same changes to many images")
    async def batch(self, rt: RT, data: JSONBody[BatchChanges]) -> BatchResult:
        found = await blocking(rt.ingest.edit, data.ids, data.changes.model_dump(exclude_unset=True))
        return BatchResult(updated=sorted(found), missing=sorted(set(data.ids) - set(found)))

    @post("/exists", status_code=200, summary="Which of these SHA-256 hashes are stored already")
    async def exists(self, rt: RT, data: JSONBody[ExistsRequest]) -> ExistsResponse:
        found = await blocking(rt.repo.existing_hashes, [h.lower() for h in data.sha256])
        return ExistsResponse(existing=found)

    @get(
        "/{image_id:int}/duplicates",
        summary="Near-duplicates: by perceptual-hash distance (default) or by CLIP cosine above a threshold",
    )
    async def duplicates(
        self,
        rt: RT,
        image_id: ImageId,
        by: Annotated[Literal["phash", "clip"], QueryParameter()] = "phash",
        max_distance: Annotated[int, QueryParameter(ge=0, le=32)] = 6,
        min_cosine: Annotated[float, QueryParameter(ge=0.5, le=1.0)] = 0.95,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    ) -> DuplicatesResponse:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None:
            raise NotFound(f"image {image_id} does not exist")
        if by == "clip":
            res = await blocking(rt.search.similar, image_id, limit, None)
            return DuplicatesResponse(
                duplicates=[
                    Duplicate(id=h.id, distance=0, cosine=h.score, thumbnail_url=h.thumbnail_url)
                    for h in res.hits
                    if h.score >= min_cosine
                ]
            )
        if image.phash is None:
            return DuplicatesResponse(duplicates=[])
        near = await blocking(rt.repo.near_duplicates, image.phash, image_id, max_distance, limit)
        return DuplicatesResponse(
            duplicates=[
                Duplicate(id=i, distance=d, thumbnail_url=rt.url(f"/api/images/{i}/thumbnail"))
                for i, d in near
            ]
        )

    @get("/{image_id:int}", summary="One image: metadata, state, EXIF, user fields and the text read in it")
    async def detail(self, rt: RT, image_id: ImageId) -> ImageDetail:
        return await load_detail(rt, image_id)

    @get("/{image_id:int}/file", summary="The original file", media_type="application/octet-stream")
    async def file(self, rt: RT, image_id: ImageId) -> File:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None or image.format == "VECTOR":
            raise NotFound(f"image {image_id} has no file")
        path = rt.blobs.original_path(image.sha256)
        ext = {"JPEG": "jpg"}.get(image.format, image.format.lower())
        name = image.original_name or f"{image_id}.{ext}"
        return File(
            path=path,
            media_type=image.mime,
            filename=name,
            content_disposition_type="inline",
            headers={"Cache-Control": "private, max-age=31536000, immutable"},
        )

    @get(
        "/{image_id:int}/thumbnail",
        summary="A thumbnail (JPEG, or WebP with ingest.thumbnail_format webp)",
        media_type="image/jpeg",
    )
    async def thumbnail(self, rt: RT, image_id: ImageId) -> File:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None or image.format == "VECTOR":
            raise NotFound(f"image {image_id} has no thumbnail")
        path = rt.blobs.thumbnail_path(image.sha256)
        if not path.exists():
            raise Conflict(f"image {image_id} is {image.state}: no thumbnail yet", code="not_ready")
        return File(
            path=path,
            media_type=rt.blobs.thumbnail_type(path),
            content_disposition_type="inline",
            headers={"Cache-Control": "private, max-age=31536000, immutable"},
        )

    @delete("/{image_id:int}", summary="Delete an image from every store", status_code=204)
    async def remove(self, rt: RT, image_id: ImageId) -> None:
        await blocking(rt.ingest.delete, image_id)

    @get("/{image_id:int}/similar", summary="More like this (the image itself excluded)")
    async def similar(
        self,
        rt: RT,
        image_id: ImageId,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, QueryParameter(max_length=4096)] = None,
    ) -> SearchResponse:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None:
            raise NotFound(f"image {image_id} does not exist")
        return await blocking(rt.search.similar, image_id, limit, cursor)
