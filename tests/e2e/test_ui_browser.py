"""The gallery in a real browser (headless Chromium): it loads offline, browses, searches from the URL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_restarts import Server
from tests.fixtures.images import shape_set

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.browser


def dump_dom(url: str, profile: Path) -> str:
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup.sh --test installs it")
        pytest.skip("chromium is not installed (scripts/setup.sh --test installs it)")
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_gallery_browses_and_searches_from_the_url(tmp_path: Path, tiny_clip_dir: Path):
    server = Server(tmp_path / "data", {"LOUPE_CLIP_MODEL": str(tiny_clip_dir)}, tmp_path / "server.log")
    try:
        server.wait_healthy()
        shapes = shape_set(per_class=1, seed=31)
        res = httpx.post(
            server.url + "/api/images",
            files=[("file", (s.name, s.data, "image/png")) for s in shapes],
            timeout=60,
        )
        ids = {f["id"]: s for f, s in zip(res.json()["files"], shapes, strict=True)}
        for _ in range(100):
            if httpx.get(server.url + "/api/health").json()["counts"]["ready"] == len(shapes):
                break
            time.sleep(0.2)
        browse = dump_dom(server.url + "/", tmp_path / "p1")
        assert browse.count("<figure") == len(shapes)
        assert "Newest first" in browse
        found = dump_dom(server.url + "/?q=a%20yellow%20star", tmp_path / "p2")
        assert 'value="a yellow star"' in found or "a yellow star ×1" in found
        srcs = re.findall(r'<img[^>]*src="/api/images/(\d+)/thumbnail"', found)
        assert srcs, found[:2000]
        first = ids[int(srcs[0])]
        assert (first.colour, first.shape) == ("yellow", "star")
        scores = re.findall(r"<span>(0\.\d{3})</span>", found)
        assert scores and scores == sorted(scores, reverse=True)
        assert 'id="banner"' in found and 'id="banner" role="alert" hidden' in found  # not the demo model
    finally:
        server.stop()
