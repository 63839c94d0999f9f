"""Truncated and bit-flipped files of every supported format never crash the worker or leave partial state:
each upload is rejected, or becomes `ready` (with its vector), or `failed` with a code (without one)."""

from __future__ import annotations

import random

from PIL import Image

from loupe.runtime import Runtime
from tests.fixtures import images as mk


def originals() -> dict[str, bytes]:
    base = Image.new("RGB", (96, 64))
    base.putdata([((x * 7) % 256, (y * 11) % 256, (x * y) % 256) for y in range(64) for x in range(96)])
    return {
        "jpg": mk.encode(base, "JPEG", quality=90),
        "png": mk.encode(base, "PNG"),
        "webp": mk.encode(base, "WEBP"),
        "gif": mk.animated_gif(3),
        "bmp": mk.encode(base, "BMP"),
        "tiff": mk.encode(base, "TIFF"),
    }


def test_fuzzed_files_of_every_format_leave_no_partial_state(make_settings):
    rt = Runtime.open(make_settings())
    try:
        rng = random.Random(2024)
        files = []
        for fmt, data in originals().items():
            for k in range(12):
                if k % 3 == 0:
                    blob = mk.truncated(data, rng.uniform(0.2, 0.95))
                else:
                    blob = mk.bit_flipped(data, seed=rng.randrange(10**6), flips=rng.randint(1, 40))
                files.append((f"{fmt}-{k}.{fmt}", blob))
        outcomes = rt.ingest.upload(files)
        assert {o.status for o in outcomes} <= {"accepted", "rejected", "duplicate"}
        assert all(o.error and o.error["code"] for o in outcomes if o.status == "rejected")
        rt.ingest.drain()
        counts = rt.repo.counts_by_state()
        assert counts["pending"] == 0 and counts["processing"] == 0
        accepted = [o.id for o in outcomes if o.status == "accepted"]
        rows = rt.repo.get_images(accepted)
        vectors = rt.vectors.retrieve(rt.collection, accepted)
        for image_id, row in rows.items():
            if row.state == "ready":
                assert image_id in vectors and rt.blobs.thumbnail_path(row.sha256).exists()
            else:
                assert row.state == "failed" and row.error_code, (row.state, row.error_code)
                assert image_id not in vectors
        print(
            f"\n{len(files)} fuzzed files: {sum(o.status == 'rejected' for o in outcomes)} rejected at upload, {counts}"
        )
    finally:
        rt.close()
