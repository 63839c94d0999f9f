"""Ingest on the CPU: the whole pipeline against the raw image tower of the same runtime and thread count.

    python bench/ingest_bench.py [--sizes 1,4,12] [--images 96] [--write]
    python bench/ingest_bench.py --base <git rev> [--sizes 1] [--rounds 3] [--write]

Full-size ViT-B/32 (random weights, bench/fullsize.py), embedded defaults (SQLite, Qdrant Edge). For each JPEG
size the same library is ingested by `IngestService.drain()` (decode in JPEG draft mode, EXIF, perceptual hash,
JPEG thumbnail, resize, CLIP, upsert, database, mirror) four ways: one model on all threads after the decode
threads and the default model workers, both with OCR off (OCR alone is measured by bench/ocr_bench.py), the model
workers with OCR on, as the defaults have it, and the model workers with the image tower on torch (where the
default takes ONNX Runtime or a bf16 copy, models/image_runtime.py), the torch baseline in the same run. On the
bf16 copy the lanes' compiled build (models/compiled_image.py) is built before the run where `auto` keeps it, as
it would be in an import of 20,000 pictures or more. The raw image tower is timed
on pre-decoded 224x224 tensors in batches of the ingest batch size, both ways. Overhead is the pipeline's time over the faster tower's.
The upload calls that store the library first (each file checked, its original written, its row inserted: what
POST /api/images does, in requests of 32 files as `loupe import` sends them) are timed too, on their own: each
row also gives their time a picture and the rate and overhead of upload and pipeline together, what an import of
a folder costs.

With --base, the default variant (model workers) of another git revision (checked out in a temporary worktree,
run with PYTHONPATH at its `server/`) and of this checkout run in interleaved rounds, each in a fresh process, and
the section "A/B: ingest pipeline" gets the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, base_worktree, command_line, revisions, write_section
from fullsize import build as build_fullsize

from loupe.config import Settings
from loupe.ingest.importer import IMPORT_REQUEST

SIZES = {0.5: (816, 612), 1: (1152, 864), 4: (2304, 1728), 12: (4000, 3000)}  # megapixels: width, height
# Files in one upload request, as `loupe import` sends them (the web UI sends 20, a bulk job's step 16); until
# 5afec5e each file was its own transaction whatever the request's size, since then a request is one.
UPLOAD_REQUEST = IMPORT_REQUEST


def make_jpegs(n: int, width: int, height: int, seed: int) -> list[bytes]:
    """make_scene_jpegs, in processes (each chunk of 32 seeded of its own) on a machine of more than 2 cores."""
    cores = os.cpu_count() or 1
    if cores <= 2 or n <= 32:
        return make_scene_jpegs(n, width, height, seed)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(min(32, n - i), width, height, seed * 100_003 + i) for i in range(0, n, 32)]
    with ProcessPoolExecutor(cores) as pool:
        return [b for part in pool.map(make_scene_jpegs, *zip(*chunks, strict=True)) for b in part]


def make_scene_jpegs(n: int, width: int, height: int, seed: int) -> list[bytes]:
    """Photograph-like JPEGs: smooth colour fields with detail (what a camera produces), quality 90. The scene is
    the same at every size (a 72-cell-wide colour field, ellipses sized to the width), as one scene photographed
    at more megapixels; only the sensor noise is per pixel. (With 16-pixel cells at every size, the 12 MP
    pictures decoded for the model held a 2-pixel colour texture that the OCR presence check took for text.)"""
    import io

    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = (rng.random((height * 72 // width, 72, 3)) * 255).astype(np.uint8)
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


def raw_tower(clip, batch: int, n: int, workers: int = 1, threads: int | None = None) -> float:  # type: ignore[no-untyped-def]
    """Images/s of the bare image tower on pre-decoded 224x224 uint8 tensors: one model on `threads` torch threads,
    or `workers` concurrent model workers splitting each batch (as the pipeline's model workers do)."""
    x = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    shares = [x[k * batch // workers : (k + 1) * batch // workers] for k in range(workers)]

    def run(share: np.ndarray) -> None:
        clip.embed_uint8(share, threads)
        for _ in range(n // batch):
            clip.embed_uint8(share, threads)

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, shares))
    return (n // batch + 1) * batch / (time.perf_counter() - t)


def towers(clip, batch: int, workers: int, each: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The tower on pre-decoded tensors run the way a variant runs it, and as one model on all threads."""
    n = 64 if clip.info.device == "cpu" else 2048  # a GPU embeds 64 pictures in a few milliseconds
    return raw_tower(clip, batch, n, workers, each), raw_tower(clip, batch, n)


# (label, ingest settings, OCR on, model settings). The third reads the words in each picture too, as the defaults
# do: these photographs hold none, so the text-presence check decides how many reach Tesseract. The fourth keeps
# the image tower on torch where the default (LOUPE_MODEL__IMAGE_RUNTIME=auto) takes ONNX Runtime or a bf16 copy.
# The last (IMPORT) is the default ingest run as `loupe import PATH` runs it: the folder's files read, checked and
# stored while the model embeds those already stored (ingest/importer.py), timed from the first file read to the
# last picture ready.
VARIANTS = [
    ("one model on all threads, 2 decode threads", {"model_workers": 1, "decode_threads": 2}, False, {}),
    ("model workers (default)", {}, False, {}),
    ("model workers, OCR on (the defaults)", {}, True, {}),
    (
        "model workers, image tower on torch (LOUPE_MODEL__IMAGE_RUNTIME=torch)",
        {},
        False,
        {"image_runtime": "torch"},
    ),
    ("model workers, `loupe import` of a folder (uploads beside the drain)", {}, False, {}),
]
DEFAULT = 1  # the variant an A/B compares: the default ingest with OCR off
IMPORT = "`loupe import`"  # in a variant's label: uploads beside the drain, as the import runs them
IMPORT_VARIANT = next(k for k, variant in enumerate(VARIANTS) if IMPORT in variant[0])


# On a GPU (--device cuda; OCR off: the lent GPU machine has no Tesseract): the defaults, and larger batches with
# a decode thread per core.
GPU_VARIANTS = [
    ("defaults", {}, False, {}),
    (
        "pictures prepared on 16 threads of one process, as before",
        {"prepare_processes": 0, "decode_threads": 16},
        False,
        {},
    ),
    ("batches of 128", {"batch_size": 128}, False, {}),
    ("defaults, `loupe import` of a folder (uploads beside the drain)", {}, False, {}),
]


def variants(device: str) -> list[tuple[str, dict, bool, dict]]:  # type: ignore[type-arg]
    return VARIANTS if device == "cpu" else GPU_VARIANTS


def run_variant(mp: float, variant: int, images: int, device: str = "cpu") -> tuple:  # type: ignore[type-arg]
    """One pipeline run with its baselines, in a process of its own (as a server runs one runtime): a second
    runtime in the same process ran the model workers 8% slower (20.2 against 22.0 images/s)."""
    from loupe.runtime import Runtime

    model_dir = build_fullsize()
    label, ingest, ocr, model = variants(device)[variant]
    model = {**model, "device": device}
    w, h = SIZES[mp]
    n = max(8, images // (1 if mp <= 1 else 2 if mp == 4 else 3))
    blobs = make_jpegs(n, w, h, seed=int(mp) if mp == int(mp) else 1000 + int(mp * 10))
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "lib",
            clip_model=str(model_dir),
            ocr={"enabled": ocr},  # type: ignore[arg-type]
            ingest=ingest,  # type: ignore[arg-type]
            model=model,  # type: ignore[arg-type]
        )
        rt = Runtime.open(settings, start_workers=False)
        try:
            # The steady state of a library's import: the compiled image lanes where `auto` builds them for a
            # large backlog (models/compiled_image.py), built (and, with auto, timed) now. A base revision has
            # none.
            lanes = hasattr(rt, "compile_image_lanes") and rt.ingest.lane_batch()
            if lanes and rt.clip.image_runtime == "bf16" and settings.model.image_compile != "off":
                rt.compile_image_lanes()
                rt.lanes_built.join()
            rt.ingest.start_prepare_pool()  # where the settings have them (a GPU), up by the drain as in a server
            overlapped = IMPORT in label
            if overlapped:  # the files on disk, to be imported beside the drain below
                folder = Path(tmp) / "photos"
                folder.mkdir()
                paths = [folder / f"{k}.jpg" for k in range(n)]
                for path, data in zip(paths, blobs, strict=True):
                    path.write_bytes(data)
                upload_ms = 0.0  # not timed apart: the row times uploads and drain at once
            else:
                # The upload (each file checked, its original stored and its row written) is part of ingest too:
                # timed on its own, before the workers start, as a server's upload requests run.
                step = UPLOAD_REQUEST
                t = time.perf_counter()
                for start in range(0, n, step):
                    files = [(f"{k}.jpg", blobs[k]) for k in range(start, min(n, start + step))]
                    rt.ingest.upload(files, tags=(), albums=())
                upload_ms = (time.perf_counter() - t) * 1000 / n
            reads: list = []  # type: ignore[type-arg]
            indexer = rt.ingest.text_indexer
            if indexer is not None:  # observe which pictures the presence check sent to Tesseract
                read = indexer.read_async
                indexer.read_async = lambda img: reads.append(read(img)) or reads[-1]  # type: ignore[method-assign]
            batch = settings.ingest.batch_size
            workers, each = rt.ingest._model_workers(batch)
            # The tower's rate drifts on a shared box: measured right before and right after the pipeline, and
            # averaged.
            before = towers(rt.clip, batch, workers, each)
            t = time.perf_counter()
            if overlapped:
                from rich.progress import Progress

                from loupe.ingest.importer import import_direct

                with Progress(disable=True) as progress:
                    import_direct(rt, {(): paths}, (), progress)
            else:
                rt.ingest.drain()
            e2e = n / (time.perf_counter() - t)
            after = towers(rt.clip, batch, workers, each)
            ready = rt.repo.counts_by_state().get("ready", 0)
        finally:
            rt.close()
    assert ready == n, (ready, n)
    raw, plain = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    if ocr:
        label += f", Tesseract ran on {sum(f.result().checked for f in reads)}/{n}"
    runtime = getattr(rt.clip, "image_runtime", "torch")  # a base revision's model may have no such attribute
    if getattr(rt.clip, "image_lanes", "trace") == "compiled":
        runtime += ", lanes compiled"
    return (
        mp,
        w,
        h,
        f"{label}: {workers} x {each} threads, image tower {runtime}",
        n,
        e2e,
        raw,
        plain,
        upload_ms,
    )


def with_upload(row: tuple) -> float:  # type: ignore[type-arg]
    """A row's images/s over its upload and its pipeline together (an import's row timed both at once)."""
    return row[5] if IMPORT in row[3] else 1 / (1 / row[5] + row[8] / 1000)


def variant_row(
    mp: float, variant: int, images: int, server: Path | None = None, device: str = "cpu"
) -> tuple:  # type: ignore[type-arg]
    """run_variant in a process of its own, with `server` (a base revision's `server/`) first on the path."""
    env = None if server is None else {**os.environ, "PYTHONPATH": str(server)}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--variant",
            f"{mp:g}:{variant}",
            "--images",
            str(images),
            "--device",
            device,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return tuple(json.loads(out.split("ROW ", 1)[1]))


def ab(base: str | None, sizes: list[float], rounds: int, images: int) -> str:
    """The default variant of `base` and of this checkout, rounds interleaved; medians. Without `base`: this
    checkout's default variant (its upload timed, then its drain) against its `loupe import` (both at once)."""
    rev, this = revisions(base or "HEAD")
    got: dict[tuple[str, int], list[tuple]] = {}  # type: ignore[type-arg]
    with base_worktree(rev) if base else contextlib.nullcontext() as tree:
        plan = (
            (("base", tree / "server", DEFAULT), ("this", None, DEFAULT))
            if tree is not None
            else (("base", None, DEFAULT), ("this", None, IMPORT_VARIANT))
        )
        for r in range(rounds):
            for mp in sizes:
                for side, server, variant in plan:
                    got.setdefault((side, mp), []).append(variant_row(mp, variant, images, server))
                    print(
                        f"round {r + 1}/{rounds}, {mp:g} MP: {side} {got[(side, mp)][-1][5]:.1f} images/s",
                        flush=True,
                    )
    what = (
        f"The default ingest (model workers) of {rev} (base) against {this} (this)"
        if base
        else f"The default ingest (model workers) of {this}, its upload calls timed and then its drain (base), against "
        "`loupe import` of a folder of the same pictures, its uploads beside the drain, timed from the first file "
        "read to the last picture ready (this; ingest/importer.py)"
    )
    lines = [
        f"{what}: full-size ViT-B/32 (random init), OCR off, {rounds} interleaved rounds, each run in a fresh process "
        "with its own raw-tower baseline (timed before and after it); medians over the rounds.",
        "",
        "| JPEG | images | base images/s | this images/s | ratio | base overhead vs its tower | this overhead vs its tower | base upload ms a picture | this upload ms a picture | base with upload images/s | this with upload images/s | ratio with upload | base overhead with upload | this overhead with upload |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sides = ("base", "this")
    for mp in sizes:
        w, h = SIZES[mp]
        n = got[("this", mp)][0][4]
        rate = {side: statistics.median(row[5] for row in got[(side, mp)]) for side in sides}
        over = {
            side: statistics.median(max(row[6], row[7]) / row[5] - 1 for row in got[(side, mp)])
            for side in sides
        }
        up = {
            side: "beside"
            if IMPORT in got[(side, mp)][0][3]
            else f"{statistics.median(r[8] for r in got[(side, mp)]):.2f}"
            for side in sides
        }
        both = {side: statistics.median(with_upload(row) for row in got[(side, mp)]) for side in sides}
        over_both = {
            side: statistics.median(max(row[6], row[7]) / with_upload(row) - 1 for row in got[(side, mp)])
            for side in sides
        }
        lines.append(
            f"| {mp:g} MP ({w}x{h}) | {n} | {rate['base']:.1f} | {rate['this']:.1f} | "
            f"{rate['this'] / rate['base']:.2f}x | {over['base']:+.0%} | {over['this']:+.0%} | {up['base']} | "
            f"{up['this']} | {both['base']:.1f} | {both['this']:.1f} | {both['this'] / both['base']:.2f}x | "
            f"{over_both['base']:+.0%} | {over_both['this']:+.0%} |"
        )
    lines.append("")
    for mp in sizes:
        pairs = list(zip(got[("base", mp)], got[("this", mp)], strict=True))
        lines.append(
            f"Rounds at {mp:g} MP (base -> this, images/s): "
            + ", ".join(f"{b[5]:.1f} -> {t[5]:.1f}" for b, t in pairs)
            + "; with upload: "
            + ", ".join(f"{with_upload(b):.1f} -> {with_upload(t):.1f}" for b, t in pairs)
            + "."
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sizes", default=None, help="megapixels, comma-separated (default 1,4,12; 1 with --base)"
    )
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--base", help="git revision to compare this checkout's default ingest against")
    ap.add_argument(
        "--import-ab",
        action="store_true",
        help="compare this checkout's default ingest (upload, then drain) with its `loupe import` (both at once)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="A/B: ingest pipeline", help="the RESULTS.md section an A/B writes")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the GPU variants, OCR off")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # "MP:INDEX": one run, its row as JSON (internal)
    args = ap.parse_args()
    if args.variant:
        mp_text, variant_text = args.variant.split(":")
        row = run_variant(float(mp_text), int(variant_text), args.images, args.device)
        print("ROW " + json.dumps(row), flush=True)
        return
    build_fullsize()
    sizes = [float(s) for s in (args.sizes or ("1" if args.base or args.import_ab else "1,4,12")).split(",")]
    command = command_line()
    if args.base or args.import_ab:
        text = ab(args.base, sizes, args.rounds, args.images)
        print(text)
        if args.write:
            write_section(args.name, text, command)
        return
    import torch

    threads = torch.get_num_threads()
    rows = []
    for mp in sizes:
        for variant in range(len(variants(args.device))):
            rows.append(variant_row(mp, variant, args.images, device=args.device))
            print(rows[-1], flush=True)
    if args.device == "cpu":
        preface = (
            f"Full-size ViT-B/32 (random init), torch on {threads} threads, batches of {Settings().ingest.batch_size}, "
            "OCR off except in the OCR variant (the defaults: a text-presence check, then Tesseract on 2 threads beside "
            "the model). The image tower runs where each row names: ONNX Runtime or the bf16 copy where the default "
            "(LOUPE_MODEL__IMAGE_RUNTIME=auto) measured it faster at start, torch in the last variant (fp32 is torch's "
            "name for it in rows of revisions before ONNX Runtime served images). Baselines, timed just "
            "before and just after each pipeline run and averaged: the raw image tower on pre-decoded 224x224 tensors "
            "run the way the variant runs it (one model, or the model workers each "
            "embedding its share of a batch), and one model on all threads. Overhead is against the faster."
        )
    else:
        preface = (
            f"Full-size ViT-B/32 (random init), fp16 on {torch.cuda.get_device_name(0)} ({args.device}), "
            f"{os.cpu_count()} CPU cores, OCR off, JPEG thumbnails, SQLite and Qdrant Edge (the embedded defaults). "
            "Baseline, timed just before and just after each pipeline run and averaged: the raw image tower of the "
            "same runtime (ClipModel.embed_uint8: uint8 to the GPU, normalized there, vectors back) on pre-decoded "
            "224x224 tensors in batches of the variant's batch size."
        )
    preface += (
        " Pipeline: the workers' drain of the uploaded library (decode to vectors, rows and thumbnails stored). Upload:"
        " the upload calls before it (each file checked, its original stored, its row written), in requests of"
        f" {UPLOAD_REQUEST} files, per picture; with upload, the two one after the other. The `loupe import` row"
        " times both at once, as the import runs them: the files read from a folder, checked and stored while the"
        " model embeds those stored already (ingest/importer.py), from the first file read to the last picture"
        " ready; its pipeline and with-upload figures are that one rate."
    )
    lines = [
        preface,
        "",
        "| JPEG | model | images | pipeline images/s | raw tower, same shape | raw tower, one model | pipeline overhead vs the faster tower | upload ms a picture | with upload images/s | overhead with upload |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mp, w, h, label, n, e2e, raw, plain, up = row
        tower, both = max(raw, plain), with_upload(row)
        shown_up = "beside" if IMPORT in label else f"{up:.2f}"
        lines.append(
            f"| {mp:g} MP ({w}x{h}) | {label} | {n} | {e2e:.1f} | {raw:.1f} | {plain:.1f} | {tower / e2e - 1:+.0%} "
            f"| {shown_up} | {both:.1f} | {tower / both - 1:+.0%} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(
            "Ingest on the CPU" if args.device == "cpu" else f"Ingest on the GPU ({args.device})",
            text,
            command,
        )


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
