"""Access control with keys required: scopes, revocation, browser sessions in an HttpOnly cookie, signed and
expiring image URLs, per-key rate limits, CORS, and the CLI for keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from litestar.testing import TestClient

from loupe.app import create_app
from loupe.runtime import Runtime
from tests.fixtures import images as mk


@pytest.fixture
def locked(make_settings):
    settings = make_settings(
        auth={"mode": "on", "burst": 5, "rate_per_minute": 60, "cors_origins": ["https://photos.example"]}
    )
    rt = Runtime.open(settings)
    with TestClient(create_app(settings, runtime=rt), timeout=120) as client:
        yield client, rt, settings
    rt.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_keys_are_required_and_scopes_are_enforced(locked):
    client, rt, _ = locked
    assert client.get("/api/health").status_code == 200  # public
    assert client.get("/").status_code == 200  # the UI loads, then asks for a key
    res = client.get("/api/images")
    assert res.status_code == 401 and res.json()["error"]["code"] == "unauthorized"
    assert client.get("/api/images", headers=bearer("loupe_deadbeef_nope")).status_code == 401
    _, reader = rt.keys.create("reader", ["read"])
    _, writer = rt.keys.create("writer", ["read", "write"])
    assert client.get("/api/images", headers=bearer(reader)).status_code == 200
    assert (
        client.post("/api/search", json={"query": [{"text": "x"}]}, headers={"X-API-Key": reader}).status_code
        == 200
    )
    res = client.post(
        "/api/images", files=[("file", ("a.png", mk.png(), "image/png"))], headers=bearer(reader)
    )
    assert res.status_code == 403 and res.json()["error"]["detail"]["scope"] == "write"
    res = client.post(
        "/api/images", files=[("file", ("a.png", mk.png(), "image/png"))], headers=bearer(writer)
    )
    assert res.status_code == 200
    assert client.get("/api/keys", headers=bearer(writer)).status_code == 403
    # Keys are stored hashed: the database never holds the secret.
    assert all(reader not in k.hash and len(k.hash) == 64 for k in rt.keys.list())


def test_admin_api_creates_and_revokes_keys(locked):
    client, rt, _ = locked
    _, admin = rt.keys.create("root", ["read", "write", "admin"])
    made = client.post("/api/keys", json={"name": "phone", "scopes": ["read"]}, headers=bearer(admin)).json()
    assert made["key"].startswith("loupe_") and made["scopes"] == ["read"]
    assert client.get("/api/images", headers=bearer(made["key"])).status_code == 200
    assert "key" not in client.get("/api/keys", headers=bearer(admin)).json()[0]
    assert client.delete(f"/api/keys/{made['id']}", headers=bearer(admin)).status_code == 204
    assert client.get("/api/images", headers=bearer(made["key"])).status_code == 401
    bad = client.post("/api/keys", json={"name": "x", "scopes": ["root"]}, headers=bearer(admin))
    assert bad.status_code == 400


def test_browser_session_cookie_is_httponly_and_ends_with_the_key(locked):
    client, rt, _ = locked
    key, token = rt.keys.create("browser", ["read"])
    assert client.post("/api/session", json={"key": "loupe_00000000_wrong"}).status_code == 401
    res = client.post("/api/session", json={"key": token})
    assert res.status_code == 204
    cookie = res.headers["set-cookie"]
    assert "loupe_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert client.get("/api/images").status_code == 200  # the cookie alone now
    assert client.get("/api/session").json()["signed_in"] is True
    rt.keys.revoke(key.id)
    assert client.get("/api/images").status_code == 401
    client.delete("/api/session")


def test_image_urls_are_signed_and_expire(locked):
    client, rt, _ = locked
    _, writer = rt.keys.create("w", ["read", "write"])
    res = client.post(
        "/api/images", files=[("file", ("p.png", mk.noise_png(1, 40), "image/png"))], headers=bearer(writer)
    )
    image_id = res.json()["files"][0]["id"]
    rt.ingest.drain()
    detail = client.get(f"/api/images/{image_id}", headers=bearer(writer)).json()
    thumb = detail["thumbnail_url"]
    assert "sig=" in thumb and "exp=" in thumb
    client.cookies.clear()
    assert client.get(thumb).status_code == 200  # no key: the signature is enough
    assert client.get(f"/api/images/{image_id}/thumbnail").status_code == 401
    tampered = thumb.replace(f"/images/{image_id}/", f"/images/{image_id + 1}/")
    assert client.get(tampered).status_code == 401
    expired = thumb.split("?")[0] + "?exp=1000&sig=" + thumb.split("sig=")[1]
    assert client.get(expired).status_code == 401


def test_rate_limits_answer_429_with_retry_after(locked):
    client, rt, _ = locked
    _, token = rt.keys.create("busy", ["read"])
    codes = [client.get("/api/images", headers=bearer(token)).status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:]
    res = client.get("/api/images", headers=bearer(token))
    assert res.status_code == 429 and int(float(res.headers["retry-after"])) >= 1
    _, other = rt.keys.create("other", ["read"])
    assert client.get("/api/images", headers=bearer(other)).status_code == 200  # per key


def test_cors_allows_only_the_configured_origin_with_credentials(locked):
    client, _, _ = locked
    ok = client.options(
        "/api/images", headers={"Origin": "https://photos.example", "Access-Control-Request-Method": "GET"}
    )
    assert ok.headers.get("access-control-allow-origin") == "https://photos.example"
    assert ok.headers.get("access-control-allow-credentials") == "true"
    bad = client.options(
        "/api/images", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert bad.headers.get("access-control-allow-origin") not in ("*", "https://evil.example")


def test_an_admin_key_is_created_and_printed_once_when_keys_become_required(make_settings):
    settings = make_settings(auth={"mode": "on"})
    rt = Runtime.open(settings)
    try:
        assert [k.name for k in rt.keys.list()] == ["admin"]
    finally:
        rt.close()
    rt = Runtime.open(settings)
    try:
        assert len(rt.keys.list()) == 1  # not again
    finally:
        rt.close()


def test_the_keys_cli(make_settings):
    settings = make_settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(LOUPE_DATA_DIR=str(settings.data_dir))

    def cli(*args: str) -> dict | list:
        out = subprocess.run(
            [sys.executable, "-m", "loupe.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)

    made = cli("create", "laptop", "--scope", "read", "--scope", "write")
    assert made["key"].startswith("loupe_") and made["scopes"] == ["read", "write"]
    listed = cli("list")
    assert [k["name"] for k in listed] == ["laptop"] and "key" not in listed[0]
    cli("revoke", str(made["id"]))
    assert cli("list")[0]["revoked_at"] is not None
