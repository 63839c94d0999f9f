"""HTTP fixtures: a library of labelled shape pictures uploaded through the API of a real app."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from litestar.testing import TestClient

from loupe.app import create_app
from loupe.config import Settings
from loupe.runtime import Runtime
from tests.fixtures.images import Shape, shape_set

PER_CLASS = 8  # 30 classes x 8 = 240 pictures


@dataclass
class Library:
    client: TestClient
    runtime: Runtime
    settings: Settings
    shapes: dict[int, Shape]  # image id -> what it shows

    def label(self, image_id: int) -> tuple[str, str]:
        s = self.shapes[image_id]
        return s.colour, s.shape


def upload(client: TestClient, files: list[tuple[str, bytes]], **data: str):
    return client.post(
        "/api/images",
        files=[("file", (name, blob, "application/octet-stream")) for name, blob in files],
        data=data,
    )


def open_library(settings: Settings, shapes: list[Shape]) -> Iterator[Library]:
    rt = Runtime.open(settings)
    app = create_app(settings, runtime=rt)
    with TestClient(app, timeout=120) as client:
        ids: dict[int, Shape] = {}
        for start in range(0, len(shapes), 60):
            chunk = shapes[start : start + 60]
            res = upload(client, [(s.name, s.data) for s in chunk], tags="shapes")
            assert res.status_code == 200, res.text
            for s, outcome in zip(chunk, res.json()["files"], strict=True):
                assert outcome["status"] == "accepted", outcome
                ids[outcome["id"]] = s
        rt.ingest.drain()
        yield Library(client, rt, settings, ids)
    rt.close()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Iterator[Library]:
    """SQLite library (ranking does not depend on the database)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("lib"),
        clip_model=str(tiny_clip_dir),
        ocr={"enabled": False},  # type: ignore[arg-type]
        # Vectors compared exactly with the model's: fp32 runtimes (auto may take onnx-w8's 8-bit text weights).
        model={"image_runtime": "torch", "text_runtime": "onnx"},  # type: ignore[arg-type]
    )
    yield from open_library(settings, shape_set(PER_CLASS))


@pytest.fixture
def api(db_url: str, make_settings) -> Iterator[tuple[TestClient, Runtime]]:
    """A fresh app over a fresh database of each kind (SQLite and PostgreSQL), workers off: tests drain."""
    settings = make_settings(database_url=db_url)
    rt = Runtime.open(settings)
    with TestClient(create_app(settings, runtime=rt), timeout=120) as client:
        yield client, rt
    rt.close()


def perturbed_copy(src: Path, dst: Path, seed: int = 0, scale: float = 0.15) -> Path:
    """Another checkpoint: the tiny model with noise on both projections (a different embedding space that still
    knows colours and shapes)."""
    from transformers import CLIPModel

    shutil.copytree(src, dst)
    model = CLIPModel.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in (model.visual_projection, model.text_projection):
            w = proj.weight
            w.add_(torch.randn(w.shape, generator=gen) * w.std() * scale)
    model.save_pretrained(dst)
    return dst


def wait_switch(client: TestClient, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get("/api/models").json()["switch"]
        if st["state"] in ("done", "failed"):
            return st
        time.sleep(0.05)
    raise AssertionError("the switch did not finish")
