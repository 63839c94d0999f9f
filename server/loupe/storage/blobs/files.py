"""Originals content-addressed by SHA-256 on disk, WebP thumbnails beside them. Writes are temp file + rename."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{64}$")


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.originals = root / "originals"
        self.thumbs = root / "thumbnails"
        self.originals.mkdir(parents=True, exist_ok=True)
        self.thumbs.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _check(sha256: str) -> str:
        # Paths are built only from a validated hex digest: no user-supplied name ever reaches the filesystem.
        if not _SHA.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return sha256

    def original_path(self, sha256: str) -> Path:
        s = self._check(sha256)
        return self.originals / s[:2] / s[2:4] / s

    def thumbnail_path(self, sha256: str) -> Path:
        s = self._check(sha256)
        return self.thumbs / s[:2] / s[2:4] / f"{s}.webp"

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_original(self, sha256: str, data: bytes) -> Path:
        path = self.original_path(sha256)
        if not path.exists():
            self._atomic_write(path, data)
        return path

    def put_thumbnail(self, sha256: str, data: bytes) -> Path:
        path = self.thumbnail_path(sha256)
        self._atomic_write(path, data)
        return path

    def read_original(self, sha256: str) -> bytes:
        return self.original_path(sha256).read_bytes()

    def has_original(self, sha256: str) -> bool:
        return self.original_path(sha256).exists()

    def delete(self, sha256: str) -> None:
        for path in (self.original_path(sha256), self.thumbnail_path(sha256)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def iter_originals(self) -> Iterator[str]:
        for path in self.originals.glob("*/*/*"):
            if _SHA.match(path.name):
                yield path.name
