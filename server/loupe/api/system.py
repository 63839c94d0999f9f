"""Health and version, model versions and fine-tuning (admin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import get, post
from litestar.params import JSONBody
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loupe import __version__
from loupe.api.deps import RT, blocking
from loupe.api.schemas import HealthResponse
from loupe.config import FinetuneSettings
from loupe.errors import BadRequest


@get("/api/health", tags=["system"], summary="Status, counts by state, model and stores in use, warnings")
async def health(rt: RT) -> HealthResponse:
    data = await blocking(rt.health)
    return HealthResponse(version=__version__, **data)


class ModelUse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        min_length=1,
        max_length=500,
        description="a Hugging Face CLIP checkpoint id or a directory on the server",
    )


@get("/api/models", tags=["system"], summary="Model versions of the library and the progress of a switch")
async def models(rt: RT) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        versions = rt.repo.model_versions("clip")
        return {
            "versions": [v.model_dump(mode="json") for v in versions],
            "switch": rt.switcher.status.as_dict(),
        }

    return await blocking(read)


@post(
    "/api/models",
    tags=["system"],
    status_code=202,
    summary="Switch the library to another CLIP model (admin): re-embeds in the background, then switches atomically",
)
async def use_model(rt: RT, data: JSONBody[ModelUse]) -> dict[str, Any]:
    status = await blocking(rt.switcher.start, data.name)
    return status.as_dict()


class FinetuneStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: str | None = Field(
        None,
        max_length=4096,
        description="a JSONL of {image_id | path, caption} on the server (default: the library)",
    )
    activate: bool = Field(
        False, description="switch the library to the result when it passes the held-out guard"
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="overrides of LOUPE_FINETUNE__* (steps, lr, ...)"
    )


@get("/api/finetune", tags=["system"], summary="The current or last fine-tuning run: progress and report")
async def finetune_status(rt: RT) -> dict[str, Any]:
    return rt.finetuner.status.as_dict()


@post("/api/finetune", tags=["system"], status_code=202, summary="Fine-tune the model on the library (admin)")
async def finetune_start(rt: RT, data: JSONBody[FinetuneStart]) -> dict[str, Any]:
    unknown = sorted(set(data.settings) - set(FinetuneSettings.model_fields))
    if unknown:  # a typo must not silently train with the defaults
        raise BadRequest(
            f"settings.{unknown[0]}: no such fine-tuning setting (known: {', '.join(FinetuneSettings.model_fields)})",
            code="bad_settings",
        )
    try:
        settings = FinetuneSettings.model_validate({**rt.settings.finetune.model_dump(), **data.settings})
    except ValidationError as exc:
        e = exc.errors()[0]
        raise BadRequest(
            f"settings.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}", code="bad_settings"
        ) from exc
    pairs = Path(data.pairs) if data.pairs else None
    if pairs is not None and not pairs.is_file():
        raise BadRequest(f"{data.pairs}: no such file on the server", code="bad_pairs")
    status = await blocking(rt.finetuner.start, settings, pairs, data.activate)
    return status.as_dict()
