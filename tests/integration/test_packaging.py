"""The wheel carries the migrations and the web UI, and the installed package finds both."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_ships_migrations_and_frontend(tmp_path: Path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("loupe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "loupe/migrations/env.py" in names
    assert any(n.startswith("loupe/migrations/versions/") and n.endswith(".py") for n in names)
    assert "loupe/frontend/index.html" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    probe = (
        "import loupe, pathlib;"
        "from loupe.storage.metadata.engine import migrations_dir;"
        "from loupe.app import frontend_dir;"
        "print(loupe.__file__); print(migrations_dir()); print(frontend_dir())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(line.startswith(str(target)) for line in out), out
