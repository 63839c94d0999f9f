"""Ingest on the CPU: the whole pipeline against the raw image tower of the same runtime and thread count.

    python bench/ingest_bench.py [--sizes 1,4,12] [--images 96] [--write]

Full-size ViT-B/32 (random weights, bench/fullsize.py), embedded defaults (SQLite, Qdrant Edge), OCR off (OCR is
measured by bench/ocr_bench.py). For each JPEG size the same library is ingested by `IngestService.drain()`
(decode in JPEG draft mode, EXIF, perceptual hash, WebP thumbnail, resize, CLIP, upsert, database, mirror) and the
raw image tower is timed on pre-decoded 224x224 tensors in batches of the ingest batch size. Overhead is the share
of the pipeline's time not spent in the tower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_section
from fullsize import build as build_fullsize

from loupe.config import Settings

SIZES = {1: (1152, 864), 4: (2304, 1728), 12: (4000, 3000)}


def make_jpegs(n: int, width: int, height: int, seed: int) -> list[bytes]:
    """Photograph-like JPEGs: smooth colour fields with detail (what a camera produces), quality 90."""
    import io

    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
        d = ImageDraw.Draw(img)
        for _ in range(30):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(width // 40, width // 6))
            d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        noise = rng.normal(0, 6, (height, width, 3))
        arr = np.clip(np.asarray(img.filter(ImageFilter.GaussianBlur(1)), np.float32) + noise, 0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def raw_tower(clip, batch: int, n: int) -> float:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    clip.embed_uint8(x)  # warm
    t = time.perf_counter()
    done = 0
    while done < n:
        clip.embed_uint8(x)
        done += batch
    return done / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,4,12")
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    from loupe.runtime import Runtime

    model_dir = build_fullsize()
    import torch

    threads = torch.get_num_threads()
    variants = [("1 decode thread", 1), (f"decode threads: default ({min(8, os.cpu_count() or 1)})", 0)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in (int(s) for s in args.sizes.split(",")):
            w, h = SIZES[mp]
            n = max(8, args.images // (1 if mp == 1 else 2 if mp == 4 else 3))
            blobs = make_jpegs(n, w, h, seed=mp)
            for label, decode_threads in variants:
                data = Path(tmp) / f"lib-{mp}-{decode_threads}"
                settings = Settings(
                    data_dir=data,
                    clip_model=str(model_dir),
                    ocr={"enabled": False},  # type: ignore[arg-type]
                    ingest={"decode_threads": decode_threads},  # type: ignore[arg-type]
                )
                rt = Runtime.open(settings)
                try:
                    rt.ingest.upload([(f"{k}.jpg", b) for k, b in enumerate(blobs)], tags=(), albums=())
                    # The tower's rate drifts on a shared box: measured right before and right after the
                    # pipeline, and averaged.
                    before = raw_tower(rt.clip, settings.ingest.batch_size, 64)
                    t = time.perf_counter()
                    rt.ingest.drain()
                    e2e = n / (time.perf_counter() - t)
                    raw = (before + raw_tower(rt.clip, settings.ingest.batch_size, 64)) / 2
                    ready = rt.repo.counts_by_state().get("ready", 0)
                finally:
                    rt.close()
                    shutil.rmtree(data, ignore_errors=True)
                assert ready == n, (ready, n)
                overhead = raw / e2e - 1
                rows.append((mp, w, h, label, n, e2e, raw, overhead))
                print(rows[-1], flush=True)
    lines = [
        f"Full-size ViT-B/32 (random init), torch fp32 on {threads} threads, batches of {Settings().ingest.batch_size}, "
        "OCR off; the same runtime's raw image tower on pre-decoded 224x224 tensors is the baseline (timed just "
        "before and just after each pipeline run, averaged).",
        "",
        "| JPEG | decoding | images | pipeline images/s | raw tower images/s | pipeline overhead vs tower |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {mp} MP ({w}x{h}) | {label} | {n} | {e2e:.1f} | {raw:.1f} | {ov * 100:+.0f}% |"
        for mp, w, h, label, n, e2e, raw, ov in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("Ingest on the CPU", text, "python bench/ingest_bench.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
