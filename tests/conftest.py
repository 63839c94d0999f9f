"""Shared fixtures: the tiny trained CLIP (cached by recipe), SQLite and PostgreSQL databases built by Alembic,
settings in temporary data directories, runtimes and HTTP clients over the real stores."""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loupe.config import Settings
from loupe.models import tiny_clip

IN_CI = bool(os.environ.get("CI"))


def _cache_root() -> Path:
    root = Path(os.environ.get("LOUPE_TEST_CACHE", Path.home() / ".cache" / "loupe"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    """The tiny CLIP trained once per recipe (a few minutes), then reused from the cache by every run."""
    recipe = tiny_clip.Recipe()
    target = _cache_root() / f"tiny-clip-{recipe.fingerprint()}"
    with open(_cache_root() / ".tiny-clip.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tiny_clip.ensure_model(target, recipe)
    return target


# ---------------------------------------------------------------- databases


def _pg_admin_url() -> str | None:
    return os.environ.get("LOUPE_TEST_POSTGRES_URL")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    url = _pg_admin_url()
    if not url:
        if IN_CI:
            pytest.fail("LOUPE_TEST_POSTGRES_URL is not set: run the suite through scripts/test.sh")
        pytest.skip("no PostgreSQL (run through scripts/test.sh, which provides one)")
    return url


def _pg_create_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"loupe_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url.render_as_string(hide_password=False), drop


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind (the schema comes from the migrations, applied by the code)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    url, drop = _pg_create_database(admin)
    try:
        yield url
    finally:
        drop()


# ---------------------------------------------------------------- settings and runtimes


@pytest.fixture
def make_settings(tmp_path: Path, tiny_clip_dir: Path) -> Callable[..., Settings]:
    def make(data_dir: Path | None = None, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "data_dir": data_dir or tmp_path / "data",
            "clip_model": str(tiny_clip_dir),
            "ocr": {"enabled": False},  # the OCR tests turn it on; elsewhere it only costs time
        }
        # torch pinned, so that no box's start-up timing (`auto`: ONNX Runtime or a bf16 copy where faster) changes
        # the image vectors that tests compare exactly; tests/integration/test_image_tower.py runs the others. The
        # text runtime likewise (`auto` times onnx-w8 at 0.98-1.18x onnx on the tiny model, around its 1.2x):
        # tests/integration/test_text_tower.py runs auto and every kind. The compiled image lanes (seconds of
        # compiling at a start on the bf16 copy) likewise: tests/integration/test_image_tower.py builds them.
        model = {
            "image_runtime": "torch",
            "text_runtime": "onnx",
            "image_compile": "off",
            **overrides.pop("model", {}),  # type: ignore[dict-item]
        }
        values.update(overrides, model=model)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def runtime_factory() -> Iterator[Callable[..., object]]:
    from loupe.runtime import Runtime

    opened: list[Runtime] = []

    def open_runtime(settings: Settings, **kwargs: object) -> Runtime:
        rt = Runtime.open(settings, **kwargs)  # type: ignore[arg-type]
        opened.append(rt)
        return rt

    yield open_runtime
    for rt in opened:
        rt.close()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "scratch"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
