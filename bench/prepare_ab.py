"""Picture preparation with torch's resampling (this checkout) against Pillow's (before 441e994), in one process.

    python bench/prepare_ab.py [--images 192] [--rounds 8] [--write]

What 441e994 and b6fc549 changed is a few milliseconds of each picture's preparation: the thumbnail (Pillow's
bilinear thumbnail, now torch's SIMD uint8 kernel where it is one resampling step) and the model input taken from
it (Pillow's bicubic, now torch's). On a box whose speed drifts by 20% between runs, fresh-process A/Bs of the
whole pipeline (`ingest_bench.py --base`) cannot resolve that; here both ways run in one process on one model and
one runtime choice, swapped in alternately (ABBA), so drift falls on both alike:

1. preparation alone (`prepare_picture`), two threads side by side as the two model-worker lanes run it;
2. the real pipeline (Runtime, model-worker lanes, the image tower `auto` chose, SQLite, Qdrant Edge, OCR off):
   upload, then drain, timing wall and process CPU per picture. Each round's pictures are the same 1 MP JPEGs with
   a comment segment of their own (new bytes, so not duplicates; the same decoding work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_section
from fullsize import build as build_fullsize
from ingest_bench import SIZES, make_jpegs
from PIL import Image

from loupe.config import Settings
from loupe.ingest import service
from loupe.models.clip import resize_crop

TORCH = (service.thumbnail_image, service.model_input)


def pillow_thumbnail(img: Image.Image, max_px: int) -> Image.Image:
    thumb = img.copy()
    thumb.thumbnail((max_px, max_px), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return thumb


def pillow_model_input(rgb: Image.Image, thumb: Image.Image, size: int, crop: int):  # type: ignore[no-untyped-def]
    return resize_crop(thumb if min(thumb.size) >= size else rgb, size, crop)


WAYS = {"pillow": (pillow_thumbnail, pillow_model_input), "torch": TORCH}
ORDER = ("pillow", "torch", "torch", "pillow")  # ABBA


def use(way: str) -> None:
    service.thumbnail_image, service.model_input = WAYS[way]  # type: ignore[assignment]


def commented(jpeg: bytes, note: str) -> bytes:
    """The same JPEG with a COM segment after its SOI marker: other bytes, the same picture and decoding work."""
    text = note.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def preparation(
    blobs: list[bytes], rounds: int, sizes: tuple[int, int, int]
) -> dict[str, list[tuple[float, float]]]:
    """(pictures/s, CPU ms per picture) of prepare_picture on two threads side by side, per way and round, at the
    pipeline's `sizes` (decode side, model resize, model crop)."""
    import torch

    ingest = Settings().ingest

    def lane(part: list[bytes]) -> None:
        torch.set_num_threads(1)  # as a model-worker lane runs
        for b in part:
            service.prepare_picture(b, ingest, *sizes)

    def run(way: str) -> tuple[float, float]:
        use(way)
        threads = [threading.Thread(target=lane, args=(blobs[k::2],)) for k in range(2)]
        c0, t0 = time.process_time(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(blobs) / (time.perf_counter() - t0), (time.process_time() - c0) / len(blobs) * 1000

    torch_threads = torch.get_num_threads()
    run("pillow"), run("torch")  # warm-up
    got: dict[str, list[tuple[float, float]]] = {"pillow": [], "torch": []}
    for way in (ORDER * rounds)[: 2 * rounds]:
        got[way].append(run(way))
    torch.set_num_threads(torch_threads)
    return got


def pipeline(
    blobs: list[bytes], rounds: int
) -> tuple[str, tuple[int, int, int], dict[str, list[tuple[float, float]]]]:
    """(images/s, CPU ms per picture) of upload-then-drain through the real Runtime, per way and round, with the
    runtime's shape and its preparation sizes (decode side, model resize, model crop)."""
    from loupe.runtime import Runtime

    got: dict[str, list[tuple[float, float]]] = {"pillow": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "lib", clip_model=str(build_fullsize()))
        settings.ocr.enabled = False
        rt = Runtime.open(settings, start_workers=False)
        try:
            workers, each = rt.ingest._model_workers(settings.ingest.batch_size)
            shape = f"{workers} x {each} threads, image tower {rt.clip.image_runtime}"
            sizes = (rt.ingest._decode_side, *rt.clip.model_sizes)

            def drain(way: str, tag: str) -> tuple[float, float]:
                use(way)
                batch = [(f"{tag}-{k}.jpg", commented(b, f"{tag}-{k}")) for k, b in enumerate(blobs)]
                rt.ingest.upload(batch, tags=(), albums=())
                c0, t0 = time.process_time(), time.perf_counter()
                rt.ingest.drain()
                return len(blobs) / (time.perf_counter() - t0), (time.process_time() - c0) / len(blobs) * 1000

            drain("torch", "warm-up")
            for k, way in enumerate((ORDER * rounds)[: 2 * rounds]):
                got[way].append(drain(way, f"round-{k}"))
                print(f"pipeline {way}: {got[way][-1][0]:.1f} images/s", flush=True)
            assert rt.repo.counts_by_state().get("ready", 0) == len(blobs) * (2 * rounds + 1)
        finally:
            rt.close()
    return shape, sizes, got


def row(what: str, got: dict[str, list[tuple[float, float]]], unit: str) -> str:
    med = {w: (statistics.median(x[0] for x in got[w]), statistics.median(x[1] for x in got[w])) for w in got}
    pairs = [t[0] / p[0] for p, t in zip(got["pillow"], got["torch"], strict=True)]
    faster = sum(p > 1 for p in pairs)
    return (
        f"| {what} | {med['pillow'][0]:.1f} {unit} | {med['torch'][0]:.1f} {unit} | {statistics.median(pairs):.2f}x "
        f"({faster} of {len(pairs)} pairs faster) | {med['pillow'][1]:.1f} | {med['torch'][1]:.1f} |"
    )


def in_run_order(
    got: dict[str, list[tuple[float, float]]], rounds: int
) -> list[tuple[str, tuple[float, float]]]:
    """The rounds back in run order, each with its way."""
    taken = {way: iter(rows) for way, rows in got.items()}
    return [(way, next(taken[way])) for way in (ORDER * rounds)[: 2 * rounds]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=8, help="ABBA pairs of each part")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    w, h = SIZES[1]
    blobs = make_jpegs(args.images, w, h, seed=500)
    # The pipeline first: the preparation part's lane threads set torch's thread count, which the model would
    # inherit at load.
    shape, sizes, pipe = pipeline(blobs, args.rounds)
    prep = preparation(blobs[:48], args.rounds + 4, sizes)
    lines = [
        f"One process, Pillow's resampling (as before 441e994) and torch's swapped in alternately, ABBA, on 1 MP "
        f"({w}x{h}) photograph-like JPEGs; medians over the rounds, and each pair's ratio. Preparation alone: "
        f"`prepare_picture` on 48 pictures, two threads side by side as two model-worker lanes run it, "
        f"{args.rounds + 4} pairs. Pipeline: full-size ViT-B/32 (random init), the defaults with OCR off ({shape}), "
        f"{args.images} pictures uploaded then drained per round, {args.rounds} pairs; CPU is the process's, both "
        f"cores' worth.",
        "",
        "| what | Pillow | torch | ratio (median of pairs) | Pillow CPU ms/picture | torch CPU ms/picture |",
        "|---|---|---|---|---|---|",
        row("preparation alone, 2 threads", prep, "pictures/s"),
        row("pipeline end to end", pipe, "images/s"),
        "",
        "Pipeline rounds (images/s, in run order): "
        + ", ".join(f"{way} {rate:.1f}" for way, (rate, _) in in_run_order(pipe, args.rounds))
        + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = command_line()
        write_section("A/B: thumbnails and model inputs resampled by torch", text, command)


if __name__ == "__main__":
    main()
