"""Settings: flat and nested environment variables, validation that names the variable, masked secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loupe.config import DEFAULT_CLIP_MODEL, Settings

ROOT = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}


def test_defaults_are_the_embedded_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for k in list(os.environ):
        if k.startswith("LOUPE_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.clip_model == DEFAULT_CLIP_MODEL and s.clip_model_is_default
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'data' / 'loupe.db'}"
    assert s.qdrant_url is None
    assert (s.model.text_runtime, s.model.image_runtime) == ("auto", "auto")


def test_flat_and_nested_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("LOUPE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LOUPE_INGEST__BATCH_SIZE", "7")
    monkeypatch.setenv("LOUPE_INDEX__EXACT_MAX", "123")
    monkeypatch.setenv("LOUPE_QDRANT_URL", "http://qdrant:6333")
    s = Settings()
    assert (s.data_dir, s.ingest.batch_size, s.index.exact_max, s.qdrant_url) == (
        tmp_path,
        7,
        123,
        "http://qdrant:6333",
    )


def test_loupe_config_prints_effective_settings_with_the_password_masked(tmp_path: Path):
    env = {
        **clean_env(),
        "LOUPE_DATA_DIR": str(tmp_path),
        "LOUPE_DATABASE_URL": "postgresql+psycopg://loupe:s3cret@db:5432/loupe",
        "LOUPE_SEARCH__MAX_LIMIT": "77",
    }
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "config"], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout)
    assert data["search"]["max_limit"] == 77
    assert "s3cret" not in out.stdout and data["database_url"].startswith("postgresql+psycopg://loupe:***@db")


def test_a_bad_value_is_refused_naming_the_variable(tmp_path: Path):
    env = {**clean_env(), "LOUPE_DATA_DIR": str(tmp_path), "LOUPE_INGEST__BATCH_SIZE": "zero"}
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "config"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "LOUPE_INGEST__BATCH_SIZE" in out.stderr


def test_a_misspelt_or_renamed_setting_is_named_at_start_not_ignored_in_silence(tmp_path: Path):
    (tmp_path / ".env").write_text("LOUPE_SEARCH__MAX_LIMT=9\n")
    env = {
        **clean_env(),
        "LOUPE_DATA_DIR": str(tmp_path),
        "LOUPE_INGEST__BACH_SIZE": "7",
        "LOUPE_MODEL__IMAGE_BF16": "on",
        "LOUPE_SEARCH__FUSION__METHOD": "weighted",  # three levels deep: a real setting
        "LOUPE_MODEL": '{"torch_threads": 1}',  # a whole area as JSON: a real setting
    }
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "config"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    warned = " ".join(out.stderr.split())  # rich wraps long lines
    for name in ("LOUPE_INGEST__BACH_SIZE", "LOUPE_SEARCH__MAX_LIMT", "now LOUPE_MODEL__IMAGE_RUNTIME"):
        assert name in warned
    assert "FUSION__METHOD" not in warned and "LOUPE_MODEL " not in warned
    data = json.loads(out.stdout)
    assert (data["search"]["fusion"]["method"], data["model"]["torch_threads"]) == ("weighted", 1)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOUPE_INGEST__THUMBNAIL_FORMAT", "gif"),
        ("LOUPE_MODEL__TEXT_THREADS_UNDER_LOAD", "-1"),
        ("LOUPE_MODEL__IMAGE_RUNTIME", "fast"),
        ("LOUPE_MODEL__TEXT_RUNTIME", "onnx-w4"),
    ],
)
def test_the_thumbnail_format_the_text_threads_and_the_image_tower_refuse_bad_values(
    tmp_path: Path, variable: str, value: str
):
    env = {**clean_env(), "LOUPE_DATA_DIR": str(tmp_path), variable: value}
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "config"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and variable in out.stderr


def test_docker_compose_wires_loupe_to_postgres_and_qdrant_with_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "qdrant", "loupe"} <= set(services)
    loupe = services["loupe"]
    assert loupe["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "qdrant": {"condition": "service_healthy"},
    }
    env = loupe["environment"]
    for k in list(os.environ):
        if k.startswith("LOUPE_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    s = Settings()
    pg = services["postgres"]["environment"]
    assert s.effective_database_url == (
        f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert s.qdrant_url == "http://qdrant:6333"
    assert f"{s.server.port}:{s.server.port}" in loupe["ports"]
    # Every LOUPE_ variable the compose file sets is one Settings knows (nothing silently ignored).
    known = {"LOUPE_" + name.upper() for name in Settings.model_fields}
    for key in env:
        if key.startswith("LOUPE_"):
            head = key.split("__")[0]
            assert head in known or head.removeprefix("LOUPE_").lower() in Settings.model_fields, key
            if "__" in key:
                area, name = key.removeprefix("LOUPE_").lower().split("__")
                assert name in type(getattr(s, area)).model_fields, key
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and 'CMD ["loupe", "serve"]' in dockerfile
    assert " g++ " in dockerfile  # the compiled image lanes' compiler (models/compiled_image.py)
