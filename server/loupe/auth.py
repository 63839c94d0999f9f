"""Access: API keys with scopes (stored hashed, compared in constant time), browser sessions in an HttpOnly
cookie, signed expiring image URLs, and a token-bucket rate limit per key (or per client address).

Scopes: `read` (browse, search, view), `write` (upload, edit, delete), `admin` (keys). On loopback the embedded
default may run open (LOUPE_AUTH__MODE=auto); bound to any other address, keys are required.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlmodel import col

from loupe.config import AuthSettings
from loupe.errors import BadRequest, LoupeError, NotFound, RateLimited
from loupe.signing import Signer
from loupe.storage.metadata.repo import MetadataRepo
from loupe.storage.metadata.tables import ApiKey, utcnow

SCOPES = ("read", "write", "admin")
SESSION_COOKIE = "loupe_session"


@dataclass(frozen=True)
class Principal:
    key_id: int | None  # None: open mode (no keys required)
    name: str
    scopes: frozenset[str]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyService:
    def __init__(self, repo: MetadataRepo, secret: bytes, settings: AuthSettings) -> None:
        self.repo = repo
        self.settings = settings
        self.sessions = Signer(secret, "session")
        self.urls = Signer(secret, "image-url")
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ keys

    def create(self, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise BadRequest(
                f"scopes must be some of {', '.join(SCOPES)}", code="bad_scope", detail={"field": "scopes"}
            )
        prefix = secrets.token_hex(4)
        token = f"loupe_{prefix}_{secrets.token_urlsafe(24)}"
        key = ApiKey(name=name[:100], prefix=prefix, hash=_hash(token), scopes=sorted(set(scopes)))
        with self.repo.session() as s:
            s.add(key)
            s.commit()
            s.refresh(key)
        return key, token

    def list(self) -> list[ApiKey]:
        with self.repo.session() as s:
            return list(s.execute(select(ApiKey).order_by(col(ApiKey.id))).scalars().all())

    def revoke(self, key_id: int) -> None:
        with self.repo.session() as s:
            res = s.execute(update(ApiKey).where(col(ApiKey.id) == key_id).values(revoked_at=utcnow()))
            s.commit()
            if not getattr(res, "rowcount", 0):
                raise NotFound(f"key {key_id} does not exist")

    def active_count(self) -> int:
        return sum(1 for k in self.list() if k.revoked_at is None)

    def verify(self, token: str) -> Principal | None:
        """The key's principal, or None. Lookup by the public prefix, then a constant-time hash comparison."""
        parts = token.split("_")
        if len(parts) < 3 or parts[0] != "loupe":
            return None
        with self.repo.session() as s:
            key = s.execute(select(ApiKey).where(col(ApiKey.prefix) == parts[1])).scalars().first()
        if key is None:
            hmac.compare_digest(_hash(token), "0" * 64)  # same work whether or not the prefix exists
            return None
        if not hmac.compare_digest(_hash(token), key.hash) or key.revoked_at is not None:
            return None
        return Principal(key.id, key.name, frozenset(key.scopes))

    # ------------------------------------------------------------ sessions and signed URLs

    def session_cookie(self, principal: Principal) -> str:
        exp = time.time() + self.settings.session_hours * 3600
        return self.sessions.dumps({"k": principal.key_id, "e": exp})

    def verify_session(self, cookie: str) -> Principal | None:
        try:
            data = self.sessions.loads(cookie, field="session")
        except LoupeError:
            return None
        if float(data.get("e", 0)) < time.time():
            return None
        with self.repo.session() as s:
            key = s.get(ApiKey, int(data.get("k") or 0))
        if key is None or key.revoked_at is not None:
            return None  # revoking a key ends its browser sessions too
        return Principal(key.id, key.name, frozenset(key.scopes))

    def sign_url(self, path: str) -> str:
        exp = int(time.time()) + self.settings.url_ttl_s
        exp -= exp % 60  # stable for a minute: browsers can cache the thumbnails
        sig = self.urls.dumps({"p": path, "e": exp}).split(".")[1]
        return f"{path}?exp={exp}&sig={sig}"

    def verify_url(self, path: str, exp: str | None, sig: str | None) -> bool:
        if not exp or not sig or not exp.isdigit() or int(exp) < time.time():
            return False
        want = self.urls.dumps({"p": path, "e": int(exp)}).split(".")[1]
        return hmac.compare_digest(want, sig)

    # ------------------------------------------------------------ rate limit

    def take(self, who: str) -> None:
        """Token bucket: `burst` requests at once, refilled at rate_per_minute."""
        rate = self.settings.rate_per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.settings.burst), now))
            tokens = min(float(self.settings.burst), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[who] = (tokens, now)
                raise RateLimited(retry_after=max(1.0, (1.0 - tokens) / rate))
            self._buckets[who] = (tokens - 1.0, now)


def required_scope(method: str, path: str) -> str | None:
    """None: public. The scope a request needs otherwise."""
    if path in ("/api/health", "/api/session") or not path.startswith("/api/"):
        return None
    if path.startswith("/api/keys") or (
        path.startswith(("/api/models", "/api/finetune")) and method not in ("GET", "HEAD")
    ):
        return "admin"
    if method in ("GET", "HEAD") or path.startswith("/api/search"):
        return "read"
    return "write"


def describe(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "scopes": key.scopes,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }
