"""How long Loupe takes to start on the full-size ViT-B/32: `loupe serve` until its health check answers, and a
`loupe import` of a folder already imported (a start, the hashes checked, nothing embedded), each with the
`auto` runtime choices timed at start (the runtimes file deleted first: what every start paid before
models/runtime_choice.py) and remembered from an earlier start, rounds interleaved in one run.

    python bench/startup_bench.py [--rounds 3] [--write]

Random-weight ViT-B/32 with the real tokenizer (bench/fullsize.py), an empty library (the FAISS mirror's load at
1M is measured by bench/search_bench.py), OCR off, the embedded stores. The first row is a fresh data directory:
the database created, both ONNX exports written, the runtimes timed. "Imports" is the floor every start pays: a
Python process importing Loupe's runtime and transformers' CLIP classes, nothing else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, loupe_env, serve, write_section
from fullsize import build as build_fullsize

from loupe.models.runtime_choice import FILE


def env_for(data_dir: Path, model: Path) -> dict[str, str]:
    return loupe_env(data_dir, model, LOUPE_LOG_LEVEL="INFO")


def serve_start(data_dir: Path, model: Path) -> tuple[float, dict]:
    """Seconds from spawning `loupe serve` to its first healthy answer, and the health's model part."""
    with serve(env_for(data_dir, model), data_dir.parent / "serve.log") as (url, _, took):
        return took, httpx.get(url + "/api/health", timeout=10).json()["model"]


def import_start(data_dir: Path, model: Path, photos: Path) -> float:
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "loupe.cli", "import", str(photos)],
        env=env_for(data_dir, model),
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return took


def imports_alone() -> float:
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import loupe.runtime; from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel",
        ],
        check=True,
    )
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    model = build_fullsize()
    from tests.fixtures import images as mk

    with tempfile.TemporaryDirectory(prefix="loupe-startup-") as tmp:
        data_dir, photos = Path(tmp) / "data", Path(tmp) / "photos"
        photos.mkdir()
        for i in range(8):
            (photos / f"{i}.png").write_bytes(mk.noise_png(i, 256))
        first, health = serve_start(data_dir, model)
        print(f"first start {first:.1f} s: {json.dumps(health.get('runtime_choices'))}", flush=True)
        import_start(data_dir, model, photos)  # the pictures go in once: every timed import skips them
        choices = data_dir / "models" / FILE
        rows: dict[str, list[float]] = {
            k: [] for k in ("serve-timed", "serve-kept", "import-timed", "import-kept")
        }
        rows["imports"] = []
        seen: dict[str, dict] = {}
        for r in range(args.rounds):
            rows["imports"].append(imports_alone())
            for what in ("timed", "kept"):
                if what == "timed":
                    choices.unlink()
                took, health = serve_start(data_dir, model)
                assert ("remembered" in health["runtime_choices"]["image"]) == (what == "kept"), health
                rows[f"serve-{what}"].append(took)
                seen[what] = health
                if what == "timed":
                    choices.unlink()
                rows[f"import-{what}"].append(import_start(data_dir, model, photos))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows.items()), flush=True)

    med = {k: statistics.median(v) for k, v in rows.items()}

    def cell(k: str) -> str:
        return f"{med[k]:.1f} ({min(rows[k]):.1f}-{max(rows[k]):.1f})"

    kept = seen["kept"]
    body = "\n".join(
        [
            "Full-size ViT-B/32 (random weights, real tokenizer), empty library, OCR off, embedded stores. Seconds of "
            f'wall time, median (min-max) of {args.rounds} interleaved rounds; "timed": the runtimes file deleted '
            "before the start, so `auto` times the image towers, the text runtime (onnx-w8 against onnx) and the "
            "bf16 text copy, as every start did before "
            f'models/runtime_choice.py; "remembered": the choice an earlier start made, built and checked, not timed. '
            f"Chosen here: image `{kept['image_runtime']}`, text `{kept['text_runtime']}`"
            + (f", micro-batches `{kept['text_batches']}`" if kept.get("text_batches") else "")
            + ".",
            "",
            "| start | timed at start | remembered | remembered / timed |",
            "|---|---|---|---|",
            f"| `loupe serve` until healthy | {cell('serve-timed')} | {cell('serve-kept')} | "
            f"{med['serve-kept'] / med['serve-timed']:.2f}x |",
            f"| `loupe import` of a folder already imported (8 pictures) | {cell('import-timed')} | "
            f"{cell('import-kept')} | {med['import-kept'] / med['import-timed']:.2f}x |",
            "",
            f"A fresh data directory (database created, ONNX text and image exports, runtimes timed): {first:.1f} s "
            f"to healthy. Imports alone (Loupe's runtime module and transformers' CLIP classes, nothing run): "
            f"{cell('imports')} s.",
        ]
    )
    print(body)
    if args.write:
        write_section("Start-up", body, command_line())


if __name__ == "__main__":
    main()
