"""GPU benchmark (run on a machine with CUDA; never part of the test suite):

* CLIP ViT-B/32 (random init, the real architecture and cost) in fp16: the raw image-tower rate on
  pre-made tensors, and the text tower (latency at 16 and 77 tokens, throughput at batch 256);
* ingest end to end on pre-resized (<= 0.5 MP) JPEGs: Loupe's own decode (`decode_rgb`, JPEG draft mode) and
  the CLIP image processor in a process pool feeding fp16 batches to the GPU, against the raw tower;
* the decode-bound rate of 1-12 MP JPEGs (per process, and with every core);
* exact search as an fp16 matrix product + top-k over 1M and 10M 512-d vectors (the faiss-gpu wheel cannot be
  installed on the lent machine; FAISS GPU indexes stay unverified).

    python3 bench/gpu_bench.py --out results.md

Prints a Markdown section; bench/RESULTS.md keeps the copy from the machine it ran on.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))


def sync() -> None:
    import torch

    torch.cuda.synchronize()


def bench(fn, warmup: int = 3, repeat: int = 10) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def make_jpegs(n: int, width: int, height: int, seed: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = (rng.random((height // 8, width // 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(20, max(21, width // 6)))
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


_processor = None


def _init_worker(size: int) -> None:
    global _processor
    from transformers import CLIPImageProcessorPil

    _processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def _decode_chunk(blobs: list[bytes]) -> np.ndarray:
    from loupe.ingest.validate import decode_rgb

    images = [decode_rgb(b, max_pixels=200_000_000, min_side=448) for b in blobs]
    return _processor(images=images, return_tensors="np")["pixel_values"].astype(np.float16)  # type: ignore[misc]


def _decode_loupe(job: tuple[list[bytes], int]) -> np.ndarray:
    """Loupe's ingest preprocessing: decode_rgb (JPEG draft to >= min_side) + resize_crop, uint8 out."""
    from loupe.ingest.validate import decode_rgb
    from loupe.models.clip import resize_crop

    blobs, min_side = job
    return np.stack(
        [resize_crop(decode_rgb(b, max_pixels=200_000_000, min_side=min_side), 224, 224) for b in blobs]
    )


def _decode_only(blobs: list[bytes]) -> int:
    from loupe.ingest.validate import decode_rgb

    for b in blobs:
        decode_rgb(b, max_pixels=200_000_000, min_side=448)
    return len(blobs)


def main() -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--images", type=int, default=4096)
    args = ap.parse_args()
    dev = "cuda"
    lines: list[str] = []
    name = torch.cuda.get_device_name(0)
    lines.append(f"GPU: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores.\n")

    model = CLIPModel(CLIPConfig()).to(dev, dtype=torch.float16).eval()  # ViT-B/32 shapes, random weights
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    lines.append(f"Model: CLIP ViT-B/32 architecture, random init ({n_params:.0f} M parameters), fp16.\n")

    # ---- raw image tower
    lines.append("| image tower, fp16 | batch | images/s |\n|---|---|---|")
    best = 0.0
    with torch.inference_mode():
        for bs in (64, 256, 512, 1024):
            px = torch.randn(bs, 3, 224, 224, device=dev, dtype=torch.float16)
            t = bench(lambda px=px: model.get_image_features(pixel_values=px))
            best = max(best, bs / t)
            lines.append(f"| eager | {bs} | {bs / t:,.0f} |")
        try:
            compiled = torch.compile(model.vision_model)
            px = torch.randn(512, 3, 224, 224, device=dev, dtype=torch.float16)
            t = bench(lambda: model.visual_projection(compiled(pixel_values=px).pooler_output), warmup=3)
            lines.append(f"| torch.compile | 512 | {512 / t:,.0f} |")
        except Exception as exc:  # compile is an option, not a requirement
            lines.append(f"| torch.compile | 512 | failed: {type(exc).__name__} |")
    raw_rate = best

    # ---- text tower
    lines.append("\n| text tower, fp16 | batch | tokens | time | queries/s |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for bs, tokens in ((1, 16), (1, 77), (256, 16), (256, 77)):
            ids = torch.randint(1, 49000, (bs, tokens), device=dev)
            ids[:, -1] = 49407
            mask = torch.ones_like(ids)
            t = bench(lambda ids=ids, mask=mask: model.get_text_features(input_ids=ids, attention_mask=mask))
            lines.append(f"| | {bs} | {tokens} | {t * 1000:.2f} ms | {bs / t:,.0f} |")

    # ---- end to end on pre-resized JPEGs
    jpegs = make_jpegs(256, 816, 612, seed=1)  # 0.5 MP
    corpus = (jpegs * (args.images // len(jpegs) + 1))[: args.images]
    workers = os.cpu_count() or 4
    chunk = 64
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(224,)) as pool:
        list(pool.map(_decode_chunk, [corpus[:chunk]] * workers))  # warm the workers
        start = time.perf_counter()
        embedded = 0
        with torch.inference_mode():
            for arr in pool.map(_decode_chunk, [corpus[i : i + chunk] for i in range(0, len(corpus), chunk)]):
                px = torch.from_numpy(arr).to(dev, non_blocking=True)
                model.get_image_features(pixel_values=px)
                embedded += len(arr)
        sync()
        e2e = embedded / (time.perf_counter() - start)
    lines.append(
        f"\nEnd to end on {len(corpus)} pre-resized 0.5 MP JPEGs, {workers} decode processes feeding fp16 batches of "
        f"{chunk} to the GPU (raw tower: {raw_rate:,.0f} images/s):\n\n| preprocessing | images/s | vs. raw tower |\n|---|---|---|"
    )
    lines.append(
        f"| decode_rgb (draft >= 448) + CLIPImageProcessorPil, float16 | {e2e:,.0f} | {e2e / raw_rate:.2f}x |"
    )
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev).view(1, 3, 1, 1)
    for min_side in (448, 224):
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_decode_loupe, [(corpus[:chunk], min_side)] * workers))
            start = time.perf_counter()
            embedded = 0
            with torch.inference_mode():
                jobs = [(corpus[i : i + chunk], min_side) for i in range(0, len(corpus), chunk)]
                for arr in pool.map(_decode_loupe, jobs):
                    x = torch.from_numpy(arr).to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
                    model.get_image_features(pixel_values=((x - mean) / std).half())
                    embedded += len(arr)
            sync()
            rate = embedded / (time.perf_counter() - start)
        lines.append(
            f"| decode_rgb (draft >= {min_side}) + resize_crop, uint8, normalized on the GPU | {rate:,.0f} | {rate / raw_rate:.2f}x |"
        )

    # ---- decode-bound rates at 1-12 MP
    lines.append("\n| JPEG size | decode per process | all cores (decode only) |\n|---|---|---|")
    for mp, (w, h) in ((1, (1152, 864)), (4, (2304, 1728)), (12, (4000, 3000))):
        blobs = make_jpegs(8, w, h, seed=mp)
        t = time.perf_counter()
        _decode_only(blobs)
        one = len(blobs) / (time.perf_counter() - t)
        many = blobs * workers * 2
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_decode_only, [blobs[:1]] * workers))  # start the processes before timing
            t = time.perf_counter()
            done = sum(pool.map(_decode_only, [many[i : i + 8] for i in range(0, len(many), 8)]))
            allcores = done / (time.perf_counter() - t)
        lines.append(f"| {mp} MP | {one:,.0f} images/s | {allcores:,.0f} images/s |")

    # ---- exact search on the GPU
    lines.append(
        "\n| exact search, fp16 matmul + top-k | vectors | queries per call | latency | queries/s |\n|---|---|---|---|---|"
    )
    for n in (1_000_000, 10_000_000):
        base = torch.nn.functional.normalize(torch.randn(n, 512, device=dev, dtype=torch.float16), dim=1)
        for nq in (1, 64):
            q = torch.nn.functional.normalize(torch.randn(nq, 512, device=dev, dtype=torch.float16), dim=1)
            t = bench(lambda base=base, q=q: torch.topk(q @ base.T, 10, dim=1))
            lines.append(f"| | {n:,} | {nq} | {t * 1000:.2f} ms | {nq / t:,.0f} |")
        del base
        torch.cuda.empty_cache()

    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
