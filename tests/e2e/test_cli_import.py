"""`loupe import`: recursive with globs and per-folder albums, resumable (already stored files are skipped
before they are sent), directly on the data directory or through a running server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.test_restarts import Server
from tests.fixtures import images as mk


def run_import(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loupe.cli", "import", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tree(root: Path) -> None:
    # Distinct fixed seeds: str hashes are salted per process, and hash((folder, i)) % 10_000 once gave a
    # Paris picture a Lisbon picture's seed (the same bytes, so the import rightly skipped it).
    for k, (folder, n) in enumerate((("2019/lisbon", 3), ("2020/paris", 2))):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i}.png").write_bytes(mk.noise_png(100 * k + i, 32))
    (root / "2020/paris/notes.txt").write_text("not a picture")
    (root / "2020/paris/skip-me.png").write_bytes(mk.noise_png(999, 32))
    (root / ".hidden").mkdir()
    (root / ".hidden/x.png").write_bytes(mk.noise_png(998, 32))


def test_import_directly_with_globs_albums_and_resume(tmp_path: Path, tiny_clip_dir: Path):
    root = tmp_path / "photos"
    tree(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(
        LOUPE_DATA_DIR=str(tmp_path / "data"), LOUPE_CLIP_MODEL=str(tiny_clip_dir), LOUPE_OCR__ENABLED="false"
    )
    refused = run_import(env, str(root), "--senders", "0")
    assert refused.returncode == 2 and "--senders must be at least 1" in refused.stderr
    out = run_import(
        env,
        str(root),
        "--album-per-folder",
        "--tag",
        "imported",
        "--exclude",
        "skip-*",
        "--include",
        "*.png",
        "--senders",
        "2",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "accepted": 5,
        "duplicate": 0,
        "rejected": 0,
        "skipped": 0,
    }
    again = run_import(
        env, str(root), "--include", "*.png"
    )  # resumes: what is stored is skipped, the rest added
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
        "skipped": 5,
    }

    server = Server(
        tmp_path / "data",
        {"LOUPE_CLIP_MODEL": str(tiny_clip_dir), "LOUPE_OCR__ENABLED": "false"},
        tmp_path / "s.log",
    )
    try:
        server.wait_healthy()
        facets = httpx.get(server.url + "/api/images/facets").json()
        assert {"value": "2019/lisbon", "count": 3} in facets["albums"] and facets["total"] == 6
        assert {"value": "imported", "count": 5} in facets["tags"]
        # While the server holds the data directory, a direct import is refused...
        locked = run_import(env, str(root))
        assert locked.returncode == 2 and "in use by another Loupe process" in locked.stderr
        # ...and an import through its API works.
        (root / "new").mkdir()
        (root / "new/fresh.png").write_bytes(mk.noise_png(4242, 32))
        via = run_import(env, str(root), "--server", server.url, "--include", "*.png")
        assert json.loads(via.stdout.strip().splitlines()[-1]) == {
            "accepted": 1,
            "duplicate": 0,
            "rejected": 0,
            "skipped": 6,
        }
    finally:
        server.stop()
