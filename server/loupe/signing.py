"""Signed, self-contained tokens (search cursors now; signed URLs later) with the data directory's secret key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from loupe.errors import BadRequest


def load_or_create_secret(data_dir: Path) -> bytes:
    """Generated into the data directory on first start (mode 0600); API nodes sharing a library share it."""
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.replace(tmp, path)
    return bytes.fromhex(path.read_text().strip())


class Signer:
    def __init__(self, key: bytes, purpose: str) -> None:
        self._key = hashlib.sha256(key + b"|" + purpose.encode()).digest()

    def dumps(self, payload: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()[:16]).rstrip(b"=")
        return (body + b"." + mac).decode()

    def loads(self, token: str, *, field: str = "cursor") -> dict[str, Any]:
        try:
            body, mac = token.encode().split(b".", 1)
            want = base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()[:16]).rstrip(
                b"="
            )
            if not hmac.compare_digest(mac, want):
                raise ValueError("bad signature")
            data = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
            if not isinstance(data, dict):
                raise ValueError("not an object")
            return data
        except (ValueError, UnicodeError) as exc:
            raise BadRequest(
                f"{field} is not valid (tampered with, or from another server)",
                code="bad_cursor",
                detail={"field": field},
            ) from exc


def digest(obj: Any) -> str:
    return digest_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def digest_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
