"""LoupeError -> HTTP: one envelope {"error": {"code", "message", "detail"}} for every failure."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from loupe.errors import LoupeError

log = logging.getLogger("loupe.api")


def envelope(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    return Response(
        {"error": {"code": code, "message": message, "detail": detail}},
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def loupe_error_handler(_: Request[Any, Any, Any], exc: LoupeError) -> Response[dict[str, Any]]:
    if exc.status == 503:  # a dependency is down: expected, no traceback
        log.warning("%s", exc.message)
        return envelope(exc.status, exc.code, exc.message, exc.detail)
    if exc.status >= 500:
        request_id = uuid.uuid4().hex[:12]
        log.error("request %s failed: %s", request_id, exc.message, exc_info=exc)
        return envelope(exc.status, exc.code, f"{exc.message} (request {request_id})")
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return envelope(exc.status, exc.code, exc.message, exc.detail, headers)


def validation_error_handler(_: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    problems = exc.extra if isinstance(exc.extra, list) else []
    fields = [p.get("key") or p.get("source") for p in problems if isinstance(p, dict)]
    msgs = [f"{p.get('key') or 'body'}: {p.get('message')}" for p in problems if isinstance(p, dict)]
    message = "; ".join(msgs) if msgs else (exc.detail or "invalid request")
    return envelope(
        400, "invalid_request", message, {"fields": [f for f in fields if f], "problems": problems}
    )


def http_error_handler(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    code = (
        "not_found"
        if isinstance(exc, NotFoundException)
        else {
            405: "method_not_allowed",
            413: "request_too_large",
            415: "unsupported_media_type",
            429: "rate_limited",
        }.get(exc.status_code, "http_error")
    )
    return envelope(exc.status_code, code, exc.detail or "request failed", exc.extra or None)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    request_id = uuid.uuid4().hex[:12]
    log.error("request %s %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
    return envelope(
        HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", f"internal error (request {request_id})"
    )


EXCEPTION_HANDLERS = {
    LoupeError: loupe_error_handler,
    ValidationException: validation_error_handler,
    HTTPException: http_error_handler,
    Exception: internal_error_handler,
}
