"""Ingest's CPU side with a model that costs nothing (a GPU's case): pictures prepared on the decode threads of one
process against worker processes (ingest.prepare_processes), and `loupe import` sending its requests from one
thread against several (importer.IMPORT_SENDERS); interleaved fresh processes.

The model is a real CLIP at ViT-B/32's input (224x224, patches of 32) with the tiny model's width and depth (random
weights, the tiny model's tokenizer): the preparation and bookkeeping are a full-size model's, the forward pass
all but free, so the rate is the ceiling of everything around a GPU's model. Each run uploads a warm-up of 32
pictures and drains them (the workers started), then times either the drain of the measured pictures uploaded
before the clock or their `loupe import` from a folder: images/s, the CPU of the process that runs the model and
bookkeeping (the one whose GIL the decode threads share) and of the workers, each a picture.

    python bench/prepare_pool_bench.py [--mp 0.5] [--images 384] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, cpu_s, tiny_model, write_section
from ingest_bench import SIZES, make_jpegs

FREE_MODEL = Path.home() / ".cache" / "loupe" / "bench" / "clip-224-free"
SECTION = "A/B: pictures prepared in worker processes"


def build_free_model(out: Path = FREE_MODEL) -> Path:
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    tiny = tiny_model()
    cfg = CLIPConfig.from_pretrained(tiny)
    cfg.vision_config.image_size, cfg.vision_config.patch_size = 224, 32
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    CLIPModel(cfg).save_pretrained(tmp)
    CLIPTokenizer.from_pretrained(tiny).save_pretrained(tmp)
    CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(tmp)
    tmp.rename(out)
    return out


def run(mp: float, images: int, processes: int, senders: int) -> dict[str, float]:
    """One run in this process: `processes` workers (0: the decode threads); with `senders`, a `loupe import` of a
    folder through that many sender threads timed from its first file read to its last picture ready, else the
    drain of pictures uploaded before the clock."""
    import multiprocessing

    from rich.progress import Progress

    from loupe.config import Settings
    from loupe.ingest.importer import import_direct
    from loupe.runtime import Runtime

    w, h = SIZES[mp]
    warm, blobs = make_jpegs(32, w, h, seed=8), make_jpegs(images, w, h, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "lib",
            clip_model=str(build_free_model()),
            ocr={"enabled": False},  # type: ignore[arg-type]
            ingest={"model_workers": 1, "prepare_processes": processes},  # type: ignore[arg-type]
            model={"image_runtime": "torch", "text_runtime": "onnx", "image_compile": "off"},  # type: ignore[arg-type]
        )
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = [folder / f"{k}.jpg" for k in range(images)]
        for path, data in zip(paths, blobs, strict=True):
            path.write_bytes(data)
        rt = Runtime.open(settings, start_workers=False)
        try:
            rt.ingest.upload([(f"w{k}.jpg", b) for k, b in enumerate(warm)])
            rt.ingest.drain()
            if not senders:
                for s in range(0, images, 32):
                    rt.ingest.upload([(f"{k}.jpg", blobs[k]) for k in range(s, min(images, s + 32))])
            workers = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
            w0 = sum(cpu_s(p) for p in workers)
            c0, t0 = time.process_time(), time.perf_counter()
            if senders:
                with Progress(disable=True) as progress:
                    import_direct(rt, {(): paths}, (), progress, senders)
            else:
                rt.ingest.drain()
            wall, parent = time.perf_counter() - t0, time.process_time() - c0
            worker_cpu = sum(cpu_s(p) for p in workers) - w0
            ready = rt.repo.counts_by_state().get("ready", 0)
        finally:
            rt.close()
    assert ready == images + 32, ready
    return {
        "rate": images / wall,
        "parent_ms": parent * 1000 / images,
        "workers_ms": worker_cpu * 1000 / images,
        "busy": (parent + worker_cpu) / wall,
    }


def table(title: str, got: dict[str, list[dict[str, float]]]) -> list[str]:
    lines = [
        f"| {title} | images/s | main process CPU ms a picture | workers' CPU ms a picture | cores busy |",
        "|---|---|---|---|---|",
    ]
    for name, rows in got.items():
        lines.append(
            f"| {name} | {statistics.median(x['rate'] for x in rows):.1f} | "
            f"{statistics.median(x['parent_ms'] for x in rows):.2f} | "
            f"{statistics.median(x['workers_ms'] for x in rows):.2f} | "
            f"{statistics.median(x['busy'] for x in rows):.2f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mp", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # "PROCESSES:SENDERS": one run (internal)
    args = ap.parse_args()
    if args.run is not None:
        processes, senders = (int(x) for x in args.run.split(":"))
        print("ROW " + json.dumps(run(args.mp, args.images, processes, senders)), flush=True)
        return
    build_free_model()
    from loupe.ingest.importer import IMPORT_SENDERS

    n = args.processes
    plan = {  # name: (processes, senders)
        "drain, decode threads of one process (before)": (0, 0),
        f"drain, {n} worker processes": (n, 0),
        "`loupe import`, decode threads, 1 sender (before)": (0, 1),
        f"`loupe import`, {n} worker processes, 1 sender": (n, 1),
        f"`loupe import`, {n} worker processes, {max(2, IMPORT_SENDERS)} senders": (
            n,
            max(2, IMPORT_SENDERS),
        ),
    }
    got: dict[str, list[dict[str, float]]] = {name: [] for name in plan}
    for r in range(args.rounds):
        for name in list(plan) if r % 2 == 0 else list(plan)[::-1]:
            processes, senders = plan[name]
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--run",
                    f"{processes}:{senders}",
                    "--mp",
                    str(args.mp),
                    "--images",
                    str(args.images),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            got[name].append(json.loads(out.split("ROW ", 1)[1]))
            print(f"round {r + 1}: {name} {got[name][-1]}", flush=True)
    w, h = SIZES[args.mp]
    drains = {k: v for k, v in got.items() if plan[k][1] == 0}
    imports = {k: v for k, v in got.items() if plan[k][1]}
    lines = [
        f"{args.images} JPEGs of {args.mp:g} MP ({w}x{h}) embedded by one model that costs next to nothing (a CLIP "
        "at ViT-B/32's 224x224 input and the tiny model's width: a GPU's case, where the CPU side bounds ingest), "
        f"OCR off, batches of 16, {args.rounds} rounds of fresh processes, interleaved; medians. The main process "
        "holds the claims, the model, the bookkeeping and the uploads (and, with threads, the preparation: its GIL "
        "is the one they share); where it holds the GIL, its CPU a picture bounds the rate on any number of cores. "
        "Drain: the pictures uploaded before the clock. `loupe import`: a folder imported straight into the data "
        "directory, its requests of 32 files sent by the sender threads while the model embeds (ingest/importer.py), "
        "timed from the first file read to the last picture ready.",
        "",
        *table("drain", drains),
        "",
        *table("import", imports),
        "",
    ]
    for name, rows in got.items():
        lines.append(f"Rounds, {name}: " + ", ".join(f"{x['rate']:.1f}" for x in rows) + " images/s.")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text, command_line())


if __name__ == "__main__":
    main()
