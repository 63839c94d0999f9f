"""One error vocabulary: a stable machine-readable code and a human message. No HTTP imports here."""

from __future__ import annotations

from typing import Any


class LoupeError(Exception):
    code = "error"
    status = 500  # the HTTP layer maps this; services never import Litestar

    def __init__(self, message: str, *, code: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.detail = detail


class BadRequest(LoupeError):
    code = "bad_request"
    status = 400


class InvalidQuery(BadRequest):
    code = "invalid_query"


class InvalidImage(BadRequest):
    code = "invalid_image"


class UnsupportedFormat(BadRequest):
    code = "unsupported_format"
    status = 415


class TooLarge(BadRequest):
    code = "too_large"
    status = 413


class NotFound(LoupeError):
    code = "not_found"
    status = 404


class Conflict(LoupeError):
    code = "conflict"
    status = 409


class Unavailable(LoupeError):
    code = "unavailable"
    status = 503


class Timeout(LoupeError):
    code = "timeout"
    status = 504


class Unauthorized(LoupeError):
    code = "unauthorized"
    status = 401


class Forbidden(LoupeError):
    code = "forbidden"
    status = 403


class RateLimited(LoupeError):
    code = "rate_limited"
    status = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            f"too many requests: retry in {retry_after:.0f} s", detail={"retry_after": retry_after}
        )
        self.retry_after = retry_after


class ConfigError(LoupeError):
    """A setting that cannot work; raised at start with the variable named."""

    code = "config_error"


class DataDirLocked(ConfigError):
    code = "data_dir_locked"
