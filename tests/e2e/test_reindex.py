"""`loupe reindex --check/--repair` finds and fixes every kind of difference between the database and the
vector store, the mirror and the files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from loupe.ingest.reindex import check
from loupe.runtime import Runtime
from tests.fixtures import images as mk


def test_reindex_reports_and_repairs_every_kind_of_difference(make_settings, tmp_path: Path):
    settings = make_settings()
    rt = Runtime.open(settings)
    try:
        ids = [o.id for o in rt.ingest.upload([(f"{i}.png", mk.noise_png(300 + i, 48)) for i in range(6)])]
        rt.ingest.drain()
        assert check(rt).clean
        # Damage every store in a different way.
        rt.vectors.delete(rt.collection, [ids[0]])  # a ready image lost its vector
        rt.vectors.upsert(
            rt.collection, [999_999], np.ones((1, rt.clip.dim), np.float32)
        )  # a vector nobody owns
        sha1 = rt.repo.get_image(ids[1]).sha256
        rt.blobs.thumbnail_path(sha1).unlink()  # a thumbnail lost
        sha2 = rt.repo.get_image(ids[2]).sha256
        rt.blobs.original_path(sha2).unlink()  # an original lost
        rt.blobs.put_original("ab" * 32, b"stray bytes")  # a file nobody owns
        report = check(rt)
        assert not report.clean
        assert report.missing_vectors == [ids[0]]
        assert report.orphan_vectors == [999_999]
        assert report.missing_thumbnails == [ids[1]]
        assert report.missing_originals == [ids[2]]
        assert report.orphan_files == ["ab" * 32]
        assert report.mirror_mismatch
    finally:
        rt.close()
    # The CLI repairs (and exits 0); a second check is clean.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOUPE_")}
    env.update(
        LOUPE_DATA_DIR=str(settings.data_dir),
        LOUPE_CLIP_MODEL=settings.clip_model,
        LOUPE_OCR__ENABLED="false",
    )
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "reindex", "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and json.loads(out.stdout)["missing_vectors"]["count"] == 1
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "reindex", "--repair"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rt = Runtime.open(settings)
    try:
        after = check(rt)
        assert after.clean, after.to_dict()
        assert rt.repo.get_image(ids[0]).state == "ready"  # re-embedded
        assert rt.repo.get_image(ids[2]).error_code == "blob_missing"
        assert rt.blobs.thumbnail_path(sha1).exists()
        assert rt.mirror.vector(ids[0]) is not None and rt.mirror.vector(999_999) is None
    finally:
        rt.close()
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)


def test_thumbnails_keep_their_format_when_the_setting_changes(make_settings):
    """A library written with WebP thumbnails keeps serving them (as image/webp) after a switch to JPEG; new and
    regenerated thumbnails are JPEG, and a deleted image leaves neither behind."""
    from litestar.testing import TestClient

    from loupe.app import create_app

    def served(settings, image_id: int) -> tuple[str, str]:
        rt = Runtime.open(settings)
        try:
            with TestClient(create_app(settings, runtime=rt)) as client:
                res = client.get(f"/api/images/{image_id}/thumbnail")
                assert res.status_code == 200, res.text
                return res.headers["content-type"], Image.open(io.BytesIO(res.content)).format
        finally:
            rt.close()

    webp = make_settings(ingest={"thumbnail_format": "webp"})
    rt = Runtime.open(webp)
    try:
        ids = [o.id for o in rt.ingest.upload([(f"{i}.png", mk.noise_png(400 + i, 48)) for i in range(3)])]
        rt.ingest.drain()
        shas = [rt.repo.get_image(i).sha256 for i in ids]
        assert [rt.blobs.thumbnail_path(s).suffix for s in shas] == [".webp"] * 3
    finally:
        rt.close()
    assert served(webp, ids[0]) == ("image/webp", "WEBP")

    jpeg = make_settings(data_dir=webp.data_dir)  # the default format
    assert served(jpeg, ids[0]) == ("image/webp", "WEBP")  # written before the change: kept as it is
    rt = Runtime.open(jpeg)
    try:
        rt.blobs.thumbnail_path(shas[1]).unlink()
        assert check(rt, repair=True).missing_thumbnails == [ids[1]]
        assert rt.blobs.thumbnail_path(shas[1]).suffix == ".jpg"
        new = rt.ingest.upload([("new.png", mk.noise_png(500, 48))])[0].id
        rt.ingest.drain()
        assert rt.blobs.thumbnail_path(rt.repo.get_image(new).sha256).suffix == ".jpg"
        # A thumbnail rewritten in the new format replaces the old file.
        rt.blobs.put_thumbnail(shas[2], rt.blobs.thumbnail_path(shas[1]).read_bytes())
        assert sorted(p.suffix for p in rt.blobs.thumbs.rglob(f"{shas[2]}.*")) == [".jpg"]
        assert check(rt).clean
    finally:
        rt.close()
    assert served(jpeg, ids[1]) == ("image/jpeg", "JPEG")
    assert served(jpeg, ids[0]) == ("image/webp", "WEBP")

    rt = Runtime.open(jpeg)
    try:
        with TestClient(create_app(jpeg, runtime=rt)) as client:
            for image_id in ids:
                assert client.delete(f"/api/images/{image_id}").status_code == 204
        assert not any(rt.blobs.thumbs.rglob(f"{shas[0]}.*")) and not any(
            rt.blobs.thumbs.rglob(f"{shas[1]}.*")
        )
    finally:
        rt.close()
