"""Originals content-addressed by SHA-256 on disk, JPEG or WebP thumbnails beside them. Writes are temp file +
rename."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{64}$")
# Thumbnail formats by file suffix; a library may hold both (written before and after a format change).
THUMBNAIL_TYPES = {".jpg": "image/jpeg", ".webp": "image/webp"}
_SUFFIX = {"jpeg": ".jpg", "webp": ".webp"}


class FileBlobStore:
    def __init__(self, root: Path, thumbnail_format: str = "jpeg") -> None:
        self.root = root
        self._thumb_suffix = _SUFFIX[thumbnail_format]
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

    def _thumbnail_base(self, sha256: str) -> Path:
        """A thumbnail's path without its suffix."""
        s = self._check(sha256)
        return self.thumbs / s[:2] / s[2:4] / s

    def thumbnail_path(self, sha256: str) -> Path:
        """The stored thumbnail, in whichever format it was written; where there is none, the path a new one
        gets."""
        base = self._thumbnail_base(sha256)
        for suffix in THUMBNAIL_TYPES:
            path = base.with_suffix(suffix)
            if path.exists():
                return path
        return base.with_suffix(self._thumb_suffix)

    @staticmethod
    def thumbnail_type(path: Path) -> str:
        return THUMBNAIL_TYPES[path.suffix]

    @staticmethod
    def _atomic_write(path: Path, data: bytes, *, sync: bool = True) -> None:
        # The directory is made only for its first file (a mkdir per write cost 0.15 ms a thumbnail).
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @staticmethod
    def sync(paths: Iterable[Path]) -> None:
        """Make files written with `sync=False` durable (fsync through a new descriptor flushes the file's data)."""
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put_original(self, sha256: str, data: bytes) -> Path:
        path = self.original_path(sha256)
        if not path.exists():
            self._atomic_write(path, data)
        return path

    def put_thumbnail(self, sha256: str, data: bytes, *, sync: bool = True) -> Path:
        """Write the thumbnail in the configured format (`data` is encoded in it); one in another format goes.
        With `sync=False` it is not yet durable: `sync([path])` before anything records it as written."""
        base = self._thumbnail_base(sha256)
        path = base.with_suffix(self._thumb_suffix)
        self._atomic_write(path, data, sync=sync)
        for suffix in THUMBNAIL_TYPES:
            if suffix != self._thumb_suffix:
                with contextlib.suppress(FileNotFoundError):
                    base.with_suffix(suffix).unlink()
        return path

    def read_original(self, sha256: str) -> bytes:
        return self.original_path(sha256).read_bytes()

    def has_original(self, sha256: str) -> bool:
        return self.original_path(sha256).exists()

    def delete(self, sha256: str) -> None:
        base = self._thumbnail_base(sha256)
        for path in (self.original_path(sha256), *(base.with_suffix(x) for x in THUMBNAIL_TYPES)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def iter_originals(self) -> Iterator[str]:
        for path in self.originals.glob("*/*/*"):
            if _SHA.match(path.name):
                yield path.name
