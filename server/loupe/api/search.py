"""Search: by text, image id and vector terms; by uploaded images (optionally mixed with text)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from litestar import Controller, Request, post
from litestar.params import JSONBody
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loupe.api.deps import RT, blocking_within
from loupe.api.images import read_files
from loupe.api.schemas import SearchRequest, SearchResponse, Term
from loupe.errors import BadRequest, InvalidQuery
from loupe.ingest.service import query_pixels
from loupe.ingest.validate import inspect_upload


class ImageSearchOptions(BaseModel):
    """The optional `query` part of POST /api/search/image (JSON)."""

    model_config = ConfigDict(extra="forbid")
    query: list[Term] = Field(default_factory=list, max_length=64, description="terms mixed with the images")
    image_weights: list[float] | None = Field(None, description="one weight per image part (default 1 each)")
    limit: int = Field(50, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=4096)
    min_score: float | None = Field(None, ge=-1, le=1)


def _field_errors(exc: ValidationError, prefix: str) -> BadRequest:
    problems = [
        {"field": ".".join([prefix, *(str(p) for p in e["loc"])]), "message": e["msg"]} for e in exc.errors()
    ]
    msg = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return InvalidQuery(
        msg, code="invalid_request", detail={"fields": [p["field"] for p in problems], "problems": problems}
    )


class SearchController(Controller):
    path = "/api/search"
    tags = ["search"]

    @post("/", status_code=200, summary="Search by weighted text, image-id and vector terms")
    async def search(self, rt: RT, data: JSONBody[SearchRequest]) -> SearchResponse:
        return await blocking_within(rt.settings.search.timeout_s, "the search", rt.search.search, data)

    @post(
        "/image",
        status_code=200,
        summary="Search by uploaded image(s), optionally mixed with text terms",
        description=(
            "multipart/form-data: one or more `image` parts and an optional `query` part holding JSON "
            '{"query": [terms], "image_weights": [..], "limit", "cursor", "min_score"}. The response carries the '
            "composed query as `query_term` (a vector term): send it to POST /api/search for later pages."
        ),
    )
    async def search_image(self, request: Request[Any, Any, Any], rt: RT) -> SearchResponse:
        images = await read_files(request, "image")
        if not images:
            raise BadRequest("no `image` part in the request", code="no_files", detail={"field": "image"})
        form = await request.form()
        raw = form.get("query") if "query" in form else None
        try:
            if raw is None:
                opts = ImageSearchOptions()
            else:
                text = raw if isinstance(raw, str) else (await raw.read()).decode("utf-8", "replace")
                opts = ImageSearchOptions.model_validate(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InvalidQuery(f"query part is not JSON: {exc.msg}", detail={"field": "query"}) from exc
        except ValidationError as exc:
            raise _field_errors(exc, "query") from exc
        weights = opts.image_weights or [1.0] * len(images)
        if len(weights) != len(images):
            raise InvalidQuery(
                f"{len(weights)} image_weights for {len(images)} images",
                detail={"field": "query.image_weights"},
            )
        return await blocking_within(
            rt.settings.search.timeout_s, "the search", self._run, rt, images, weights, opts
        )

    @staticmethod
    def _run(
        rt: RT, images: list[tuple[str | None, bytes]], weights: list[float], opts: ImageSearchOptions
    ) -> SearchResponse:
        ing = rt.settings.ingest
        search = rt.search  # one model version for the whole request, even across a model switch
        pixels = []
        for i, (_, data) in enumerate(images):
            try:
                inspect_upload(data, max_bytes=ing.max_file_mb * 1024 * 1024, max_pixels=ing.max_pixels)
                pixels.append(query_pixels(data, search.clip, ing))
            except BadRequest as exc:
                raise type(exc)(exc.message, code=exc.code, detail={"field": f"image[{i}]"}) from exc
        vecs = search.embed_query_pictures(pixels)
        scope = {
            "images": [hashlib.sha256(d).hexdigest() for _, d in images],
            "opts": opts.model_dump(mode="json", exclude={"cursor"}),
        }
        # The query terms may be empty here; SearchRequest wants one, so images go in as `extra` vectors.
        placeholder = opts.query or [Term(vector=vecs[0].tolist(), weight=0.0)]
        req = SearchRequest(query=placeholder, limit=opts.limit, cursor=opts.cursor, min_score=opts.min_score)
        extra = list(zip(vecs, weights, strict=True))
        return search.search(req, extra=extra, return_query_term=True, cursor_scope=scope)
