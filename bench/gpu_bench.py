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

    if torch.cuda.is_available():
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


def emit(lines: list[str], out: str | None) -> None:
    """Write what is measured so far (a run stopped at its time limit still returns its figures)."""
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


DEVICE = "cuda"  # --device cpu: a smoke run of every path here, at small sizes, before a GPU lease is spent
_CORPUS: list[bytes] = []
_SLOTS: np.ndarray | None = None


def _fill_slot(job: tuple[int, int, int, str]) -> tuple[int, int]:
    """A worker process: prepare pictures start..end of the corpus (inherited through fork) into a shared slot."""
    from loupe.config import IngestSettings
    from loupe.ingest.service import prepare_picture

    start, end, slot, kind = job
    assert _SLOTS is not None
    if kind != "product":
        _SLOTS[slot, : end - start] = _decode_loupe((_CORPUS[start:end], 224))
        return slot, end - start
    settings = IngestSettings()
    for k, blob in enumerate(_CORPUS[start:end]):
        _SLOTS[slot, k] = prepare_picture(blob, settings, 288, 224, 224).pixels
    return slot, end - start


def shared_memory_pipeline(model, corpus, workers, chunk, kind, mean, std) -> float:  # type: ignore[no-untyped-def]
    """Worker processes (fork) write model inputs into slots of one anonymous shared mapping and return only the
    slot's number: no picture is pickled either way. At most one job per slot in flight."""
    import mmap
    import multiprocessing
    from collections import deque

    import torch

    global _CORPUS, _SLOTS
    slots = 2 * workers
    shape = (slots, chunk, 224, 224, 3)
    buf = mmap.mmap(-1, int(np.prod(shape)))
    _CORPUS, _SLOTS = corpus, np.frombuffer(buf, dtype=np.uint8).reshape(shape)
    jobs = [(i, min(i + chunk, len(corpus)), kind) for i in range(0, len(corpus), chunk)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_fill_slot, [(0, chunk, s, kind) for s in range(workers)]))  # start the processes
        pending: deque = deque()  # type: ignore[type-arg]
        nxt = 0

        def submit(slot: int) -> None:
            nonlocal nxt
            if nxt < len(jobs):
                start, end, k = jobs[nxt]
                pending.append(pool.submit(_fill_slot, (start, end, slot, k)))
                nxt += 1

        start_t = time.perf_counter()
        for slot in range(slots):
            submit(slot)
        embedded = 0
        with torch.inference_mode():
            while pending:
                slot, count = pending.popleft().result()
                x = torch.from_numpy(_SLOTS[slot, :count]).to(DEVICE)  # pageable: the copy is done on return
                submit(slot)
                embed_pixels(model, x.permute(0, 3, 1, 2), mean, std)
                embedded += count
        sync()
        return embedded / (time.perf_counter() - start_t)


def embed_pixels(model, x, mean, std):  # type: ignore[no-untyped-def]
    """The image tower on (n, 3, H, W) pixels 0..255 (uint8 or float) on the model's device, normalized there."""
    return model.get_image_features(pixel_values=((x.float() / 255 - mean) / std).to(model.dtype))


def gpu_resize_crop(images: list, size: int = 224):  # type: ignore[no-untyped-def,type-arg]
    """(3, H, W) uint8 CUDA tensors -> (n, 3, size, size) float 0..255: shorter side to `size` (bicubic, antialiased,
    rounded and clamped as Pillow's uint8 output is), centre crop; pictures of one shape resized together."""
    import torch
    import torch.nn.functional as F

    out = torch.empty((len(images), 3, size, size), device=images[0].device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[1:]), []).append(i)
    for (h, w), idx in groups.items():
        nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
        x = torch.stack([images[i] for i in idx]).float()
        r = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out[idx] = r[:, :, top : top + size, left : left + size].round_().clamp_(0, 255)
    return out


def _jpeg_tensors(blobs: list[bytes]) -> list:  # type: ignore[type-arg]
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bytes are read-only; decode_jpeg only reads them
        return [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]


def nvjpeg_pipeline(model, corpus, chunk, mean, std) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Decode on the GPU (nvJPEG through torchvision), resize and crop there, embed. Returns images/s and the mean
    absolute pixel difference from Loupe's CPU preprocessing of the full decode."""
    import torch
    from torchvision.io import decode_jpeg

    from loupe.ingest.validate import decode_rgb
    from loupe.models.clip import resize_crop

    sample = corpus[:64]
    gpu = gpu_resize_crop(decode_jpeg(_jpeg_tensors(sample), device=DEVICE))
    cpu = np.stack([resize_crop(decode_rgb(b, max_pixels=200_000_000), 224, 224) for b in sample])
    gap = float((gpu.permute(0, 2, 3, 1).cpu() - torch.from_numpy(cpu).float()).abs().mean())
    with torch.inference_mode():
        decode_jpeg(_jpeg_tensors(corpus[:chunk]), device=DEVICE)  # warm nvJPEG
        sync()
        start = time.perf_counter()
        for i in range(0, len(corpus), chunk):
            x = gpu_resize_crop(decode_jpeg(_jpeg_tensors(corpus[i : i + chunk]), device=DEVICE))
            embed_pixels(model, x, mean, std)
        sync()
    return len(corpus) / (time.perf_counter() - start), gap


def nvjpeg_decode_rate(blobs: list[bytes], chunk: int = 32) -> float:
    from torchvision.io import decode_jpeg

    decode_jpeg(_jpeg_tensors(blobs[:chunk]), device=DEVICE)
    sync()
    t = time.perf_counter()
    for i in range(0, len(blobs), chunk):
        decode_jpeg(_jpeg_tensors(blobs[i : i + chunk]), device=DEVICE)
    sync()
    return len(blobs) / (time.perf_counter() - t)


def main() -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (a minute of compiling)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs every path at small sizes (a smoke run)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    quick = DEVICE == "cpu"
    dev = DEVICE
    lines: list[str] = []
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"none ({dev} smoke run)"
    lines.append(f"GPU: {name}; torch {torch.__version__}; {os.cpu_count()} CPU cores.\n")

    model = (
        CLIPModel(CLIPConfig()).to(dev, dtype=torch.float32 if quick else torch.float16).eval()
    )  # ViT-B/32 shapes, random weights
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    lines.append(f"Model: CLIP ViT-B/32 architecture, random init ({n_params:.0f} M parameters), fp16.\n")

    # ---- raw image tower
    lines.append("| image tower, fp16 | batch | images/s |\n|---|---|---|")
    best = 0.0
    with torch.inference_mode():
        for bs in (4,) if quick else (64, 256, 512, 1024):
            px = torch.randn(bs, 3, 224, 224, device=dev, dtype=torch.float16)
            t = bench(lambda px=px: model.get_image_features(pixel_values=px))
            best = max(best, bs / t)
            lines.append(f"| eager | {bs} | {bs / t:,.0f} |")
        try:
            if not args.compile:
                raise NotImplementedError("not run (--compile)")
            compiled = torch.compile(model.vision_model)
            px = torch.randn(512, 3, 224, 224, device=dev, dtype=torch.float16)
            t = bench(lambda: model.visual_projection(compiled(pixel_values=px).pooler_output), warmup=3)
            lines.append(f"| torch.compile | 512 | {512 / t:,.0f} |")
        except Exception as exc:  # compile is an option, not a requirement
            lines.append(
                f"| torch.compile | 512 | {exc if isinstance(exc, NotImplementedError) else 'failed: ' + type(exc).__name__} |"
            )
    raw_rate = best
    emit(lines, args.out)

    # ---- text tower
    lines.append("\n| text tower, fp16 | batch | tokens | time | queries/s |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for bs, tokens in ((1, 16), (4, 16)) if quick else ((1, 16), (1, 77), (256, 16), (256, 77)):
            ids = torch.randint(1, 49000, (bs, tokens), device=dev)
            ids[:, -1] = 49407
            mask = torch.ones_like(ids)
            t = bench(lambda ids=ids, mask=mask: model.get_text_features(input_ids=ids, attention_mask=mask))
            lines.append(f"| | {bs} | {tokens} | {t * 1000:.2f} ms | {bs / t:,.0f} |")

    # ---- end to end on pre-resized JPEGs
    jpegs = make_jpegs(16 if quick else 256, 816, 612, seed=1)  # 0.5 MP
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
                    x = torch.from_numpy(arr).to(dev, non_blocking=True).permute(0, 3, 1, 2)
                    embed_pixels(model, x, mean, std)
                    embedded += len(arr)
            sync()
            rate = embedded / (time.perf_counter() - start)
        lines.append(
            f"| decode_rgb (draft >= {min_side}) + resize_crop, uint8, normalized on the GPU | {rate:,.0f} | {rate / raw_rate:.2f}x |"
        )
    emit(lines, args.out)
    for label, fn in (
        (
            "ingest's per-picture work (prepare_picture: draft >= 288, thumbnail, EXIF, hash, resize), shared-memory slots",
            "product",
        ),
        ("decode_rgb (draft >= 224) + resize_crop, shared-memory slots", "plain"),
    ):
        try:
            rate = shared_memory_pipeline(model, corpus, workers, chunk, fn, mean, std)
            lines.append(f"| {label} | {rate:,.0f} | {rate / raw_rate:.2f}x |")
        except Exception as exc:
            lines.append(f"| {label} | failed: {type(exc).__name__}: {exc} |  |")
        emit(lines, args.out)
    try:
        rate, gap = nvjpeg_pipeline(model, corpus, 256, mean, std)
        lines.append(
            f"| nvJPEG (torchvision.io.decode_jpeg on the GPU, batches of 256) + bicubic antialiased resize on the GPU | {rate:,.0f} | {rate / raw_rate:.2f}x |"
        )
        lines.append(
            f"\nnvJPEG + GPU resize against decode_rgb + resize_crop (full decode): mean |pixel difference| {gap:.2f}/255."
        )
    except Exception as exc:
        lines.append(f"| nvJPEG + GPU resize | failed: {type(exc).__name__}: {exc} |  |")
    emit(lines, args.out)

    # ---- decode-bound rates at 1-12 MP
    lines.append(
        "\n| JPEG size | decode per process | all cores (decode only) | nvJPEG on the GPU (decode only, batches of 32) |\n|---|---|---|---|"
    )
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
        try:
            gpu = nvjpeg_decode_rate(blobs * 4)
            lines.append(
                f"| {mp} MP | {one:,.0f} images/s | {allcores:,.0f} images/s | {gpu:,.0f} images/s |"
            )
        except Exception as exc:
            lines.append(
                f"| {mp} MP | {one:,.0f} images/s | {allcores:,.0f} images/s | failed: {type(exc).__name__} |"
            )
        emit(lines, args.out)

    # ---- exact search on the GPU
    lines.append(
        "\n| exact search, fp16 matmul + top-k | vectors | queries per call | latency | queries/s |\n|---|---|---|---|---|"
    )
    for n in (10_000,) if quick else (1_000_000, 10_000_000):
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
