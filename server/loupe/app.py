"""The Litestar application: routes, dependency wiring and the lifespan that opens stores and models."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import anyio.to_thread
from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.static_files import create_static_files_router

from loupe import __version__, heap
from loupe.api.access import ACCESS_HANDLERS, access_guard
from loupe.api.deps import provide_runtime
from loupe.api.errors import EXCEPTION_HANDLERS
from loupe.api.images import ImageController, duplicate_groups, job_status
from loupe.api.search import SearchController
from loupe.api.system import finetune_start, finetune_status, health, models, use_model
from loupe.config import Settings
from loupe.runtime import Runtime

log = logging.getLogger(__name__)


def frontend_dir() -> Path | None:
    packaged = Path(str(resources.files("loupe"))) / "frontend"
    source = Path(__file__).resolve().parents[2] / "frontend"
    for d in (packaged, source):
        if (d / "index.html").exists():
            return d
    return None


def cors(settings: Settings) -> CORSConfig | None:
    """Only the configured origins, with credentials; a wildcard never goes with credentials."""
    origins = settings.auth.cors_origins
    if not origins:
        return None
    wildcard = "*" in origins
    return CORSConfig(
        allow_origins=origins,
        allow_credentials=not wildcard,
        allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        allow_headers=["authorization", "content-type", "x-api-key"],
    )


def create_app(settings: Settings, runtime: Runtime | None = None, *, owns_runtime: bool = False) -> Litestar:
    """Build the app. Without `runtime` the lifespan opens the stores; with one, the caller opened them (the CLI,
    to report a bad setting in one line before the server starts; tests) and `owns_runtime` says whether the app
    starts its workers and closes it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = settings.server.threads
        own = runtime is None or owns_runtime
        rt = (
            runtime
            if runtime is not None
            else await anyio.to_thread.run_sync(lambda: Runtime.open(settings, start_workers=True))
        )
        if owns_runtime and not rt.workers:
            rt.start_workers()
        app.state.runtime = rt
        if rt.clip.info.is_demo:
            log.warning("Loupe is serving with the OFFLINE DEMO MODEL (see /api/health)")
        heap.settle()  # the start-up's objects out of full collections (heap.py)
        try:
            yield
        finally:
            heap.release()
            if own:
                await anyio.to_thread.run_sync(rt.close)

    handlers: list = [
        ImageController,
        SearchController,
        health,
        models,
        use_model,
        finetune_status,
        finetune_start,
        job_status,
        duplicate_groups,
        *ACCESS_HANDLERS,
    ]
    ui = frontend_dir()
    if ui is not None:
        handlers.append(create_static_files_router(path="/", directories=[ui], html_mode=True, name="ui"))
    return Litestar(
        route_handlers=handlers,
        lifespan=[lifespan],
        dependencies={"rt": Provide(provide_runtime, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        guards=[access_guard],
        cors_config=cors(settings),
        request_max_body_size=settings.server.max_request_mb * 1024 * 1024,
        multipart_form_part_limit=settings.ingest.max_files_per_request + 16,
        openapi_config=OpenAPIConfig(
            title="Loupe",
            version=__version__,
            description="Semantic image search: by words, by example, by the text inside pictures.",
            path="/api/docs",
            render_plugins=[ScalarRenderPlugin()],
        ),
        debug=False,
        logging_config=None,  # the CLI configures logging; tests and embedders keep theirs
    )
