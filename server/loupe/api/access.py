"""The access guard (every route), browser sessions and the admin API for keys."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from litestar import Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody, PathParameter
from pydantic import BaseModel, ConfigDict, Field

from loupe.api.deps import RT, blocking
from loupe.auth import SESSION_COOKIE, Principal, describe, required_scope
from loupe.errors import Forbidden, Unauthorized


async def access_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    rt = connection.app.state.runtime
    path, method = connection.scope["path"], str(connection.scope.get("method", "GET"))
    need = required_scope(method, path)
    if not rt.settings.auth_required:  # open on loopback: one local user, no keys and no rate limit
        connection.state.principal = Principal(None, "open", frozenset({"read", "write", "admin"}))
        return
    if need is None:
        return
    # Image URLs in responses are signed: <img> tags and shared links work without a key until they expire.
    if method in ("GET", "HEAD") and (path.endswith("/thumbnail") or path.endswith("/file")):
        q = connection.query_params
        if await anyio.to_thread.run_sync(rt.keys.verify_url, path, q.get("exp"), q.get("sig")):
            return
    principal = None
    header = connection.headers.get("authorization", "")
    token = (
        header[7:].strip() if header.lower().startswith("bearer ") else connection.headers.get("x-api-key")
    )
    if token:
        principal = await anyio.to_thread.run_sync(rt.keys.verify, token)
    elif SESSION_COOKIE in connection.cookies:
        principal = await anyio.to_thread.run_sync(rt.keys.verify_session, connection.cookies[SESSION_COOKIE])
    if principal is None:
        raise Unauthorized("an API key is required (Authorization: Bearer ..., or sign in)")
    await anyio.to_thread.run_sync(rt.keys.take, f"key:{principal.key_id}")
    if need not in principal.scopes:
        raise Forbidden(f"this key lacks the {need!r} scope", detail={"scope": need})
    connection.state.principal = principal


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=8, max_length=200)


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(min_length=1, max_length=3)


@post(
    "/api/session",
    tags=["access"],
    summary="Sign in with a key: sets an HttpOnly session cookie",
    status_code=204,
)
async def sign_in(request: Request[Any, Any, Any], rt: RT, data: JSONBody[SignIn]) -> Response[None]:
    principal = await blocking(rt.keys.verify, data.key)
    if principal is None:
        raise Unauthorized("that key is not valid")
    cookie = rt.keys.session_cookie(principal)
    response: Response[None] = Response(None, status_code=204)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=int(rt.settings.auth.session_hours * 3600),
        path="/",
    )
    return response


@delete("/api/session", tags=["access"], summary="Sign out", status_code=204)
async def sign_out() -> Response[None]:
    response: Response[None] = Response(None, status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@get("/api/session", tags=["access"], summary="Whether keys are required, and who is signed in")
async def whoami(request: Request[Any, Any, Any], rt: RT) -> dict[str, Any]:
    principal = None
    if SESSION_COOKIE in request.cookies:
        principal = await blocking(rt.keys.verify_session, request.cookies[SESSION_COOKIE])
    return {
        "required": rt.settings.auth_required,
        "signed_in": principal is not None,
        "name": principal.name if principal else None,
        "scopes": sorted(principal.scopes) if principal else [],
    }


@get("/api/keys", tags=["access"], summary="List API keys (admin)")
async def list_keys(rt: RT) -> list[dict[str, Any]]:
    return [describe(k) for k in await blocking(rt.keys.list)]


@post(
    "/api/keys", tags=["access"], summary="Create an API key (admin); the key is shown once", status_code=201
)
async def create_key(rt: RT, data: JSONBody[NewKey]) -> dict[str, Any]:
    key, token = await blocking(rt.keys.create, data.name, data.scopes)
    return {**describe(key), "key": token}


@delete("/api/keys/{key_id:int}", tags=["access"], summary="Revoke an API key (admin)", status_code=204)
async def revoke_key(rt: RT, key_id: Annotated[int, PathParameter(ge=1, le=2**31)]) -> None:
    await blocking(rt.keys.revoke, key_id)


ACCESS_HANDLERS = [sign_in, sign_out, whoami, list_keys, create_key, revoke_key]
__all__ = ["ACCESS_HANDLERS", "FromPath", "access_guard"]
