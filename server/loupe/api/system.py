"""Health and version."""

from __future__ import annotations

from litestar import get

from loupe import __version__
from loupe.api.deps import RT, blocking
from loupe.api.schemas import HealthResponse


@get("/api/health", tags=["system"], summary="Status, counts by state, model and stores in use, warnings")
async def health(rt: RT) -> HealthResponse:
    data = await blocking(rt.health)
    return HealthResponse(version=__version__, **data)
