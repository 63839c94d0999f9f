"""Fine-tuning throughput of a full-size ViT-B/32 (random weights, bench/fullsize.py) through `loupe finetune`'s
own code: LoRA on both towers, sequential method, on a small generated library. Samples/s counts image views
(two per pair in the image phase) and pairs in the text phase.

    python bench/finetune_bench.py [--images 64] [--steps 4] [--batch 16] [--write]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, scratch_runtime, write_section
from fullsize import build as build_fullsize
from ingest_bench import make_jpegs

from loupe.config import FinetuneSettings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    from loupe.models.finetune import finetune, library_pairs, split_pairs

    model_dir = build_fullsize()
    rows = []
    with (
        tempfile.TemporaryDirectory() as out,
        scratch_runtime(model_dir, model={"device": args.device}) as rt,
    ):
        blobs = make_jpegs(args.images, 640, 480, seed=3)
        rng = random.Random(0)
        for k, b in enumerate(blobs):
            rt.ingest.upload([(f"{k}.jpg", b)], albums=[f"group {rng.randrange(args.images // 4)}"])
        rt.ingest.drain()
        train, heldout = split_pairs(library_pairs(rt), 0.25)
        for mode, method in (("lora", "sequential"), ("lora", "joint"), ("last_layers", "sequential")):
            ft = FinetuneSettings(steps=args.steps, batch_size=args.batch, mode=mode, method=method)
            report = finetune(rt, train, heldout, ft, Path(out) / f"out-{mode}-{method}")
            rows.append((mode, method, report.samples_per_s, report.seconds, report.steps))
            print(rows[-1], flush=True)
    lines = [
        "Full-size ViT-B/32 (random init), "
        + (
            f"CPU, torch {torch.__version__} on {torch.get_num_threads()} threads, "
            if args.device == "cpu"
            else f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (fp32 training), "
        )
        + f"batch {args.batch} pairs, {args.steps} steps per phase, images decoded once and cached:",
        "",
        "| trainable | method | samples/s | seconds | steps |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {me} | {sps:.1f} | {sec:.0f} | {st} |" for m, me, sps, sec, st in rows]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(
            "Fine-tuning throughput" + ("" if args.device == "cpu" else f" ({args.device})"),
            text,
            command_line(),
        )


if __name__ == "__main__":
    main()
