"""`loupe reindex --check/--repair` finds and fixes every kind of difference between the database and the
vector store, the mirror and the files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

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
