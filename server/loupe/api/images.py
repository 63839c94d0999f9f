"""Images: upload, browse, detail, files, delete, similar."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.params import FromPath, QueryParameter
from litestar.response import File, Response

from loupe.api.deps import RT, blocking
from loupe.api.errors import envelope
from loupe.api.schemas import (
    ErrorBody,
    FileOutcome,
    ImageDetail,
    ImagePage,
    SearchResponse,
    UploadResponse,
    image_detail,
    image_summary,
)
from loupe.errors import BadRequest, Conflict, NotFound
from loupe.signing import Signer
from loupe.storage.metadata.tables import ImageState

TAG_MAX = 100


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
            "A request whose files are all rejected answers 4xx with the error envelope."
        ),
        responses={},
    )
    async def upload(self, request: Request[Any, Any, Any], rt: RT) -> Response[Any]:
        files = await read_files(request, "file")
        if not files:
            raise BadRequest("no `file` parts in the request", code="no_files", detail={"field": "file"})
        form = await request.form()
        tags = parse_tags([v for v in form.getall("tags") if isinstance(v, str)] if "tags" in form else [])
        outcomes = await blocking(rt.ingest.upload, files, tags)
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

    @get("/", summary="Browse the library, newest first")
    async def browse(
        self,
        rt: RT,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, QueryParameter(max_length=512)] = None,
        only: Annotated[
            ImageState | None, QueryParameter(name="state", description="only images in this state")
        ] = None,
    ) -> ImagePage:
        signer = Signer(rt.secret, "browse")
        before = int(signer.loads(cursor)["before"]) if cursor else None
        rows = await blocking(
            rt.repo.browse, before_id=before, limit=limit + 1, states=[only] if only else None
        )
        page = rows[:limit]
        tags = await blocking(rt.repo.tags_for, [int(r.id) for r in page])  # type: ignore[arg-type]
        next_cursor = signer.dumps({"before": int(page[-1].id)}) if len(rows) > limit and page else None  # type: ignore[arg-type]
        return ImagePage(
            images=[image_summary(r, tags.get(r.id or 0, [])) for r in page], next_cursor=next_cursor
        )

    @get("/{image_id:int}", summary="One image: metadata and state")
    async def detail(self, rt: RT, image_id: FromPath[int]) -> ImageDetail:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None:
            raise NotFound(f"image {image_id} does not exist")
        tags = await blocking(rt.repo.tags_for, [image_id])
        texts = await blocking(rt.repo.get_texts, [image_id])
        return image_detail(image, tags.get(image_id, []), texts.get(image_id))

    @get("/{image_id:int}/file", summary="The original file", media_type="application/octet-stream")
    async def file(self, rt: RT, image_id: FromPath[int]) -> File:
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

    @get("/{image_id:int}/thumbnail", summary="A WebP thumbnail", media_type="image/webp")
    async def thumbnail(self, rt: RT, image_id: FromPath[int]) -> File:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None or image.format == "VECTOR":
            raise NotFound(f"image {image_id} has no thumbnail")
        path = rt.blobs.thumbnail_path(image.sha256)
        if not path.exists():
            raise Conflict(f"image {image_id} is {image.state}: no thumbnail yet", code="not_ready")
        return File(
            path=path,
            media_type="image/webp",
            content_disposition_type="inline",
            headers={"Cache-Control": "private, max-age=31536000, immutable"},
        )

    @delete("/{image_id:int}", summary="Delete an image from every store", status_code=204)
    async def remove(self, rt: RT, image_id: FromPath[int]) -> None:
        await blocking(rt.ingest.delete, image_id)

    @get("/{image_id:int}/similar", summary="More like this (the image itself excluded)")
    async def similar(
        self,
        rt: RT,
        image_id: FromPath[int],
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, QueryParameter(max_length=4096)] = None,
    ) -> SearchResponse:
        image = await blocking(rt.repo.get_image, image_id)
        if image is None:
            raise NotFound(f"image {image_id} does not exist")
        return await blocking(rt.search.similar, image_id, limit, cursor)
