#!/usr/bin/env bash
# Every CPU benchmark, each rewriting its own section of bench/RESULTS.md (stamped with the machine, the date and
# the command). About 30 minutes on 2 cores at the default scales; SCALES=10k,100k,1m adds the million-image run.
# The GPU benchmark runs separately on a CUDA machine: python3 bench/gpu_bench.py
# A/B of two revisions (not run here: it needs a base): bench/ab_serve.py --base <rev> --write
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" bench/search_bench.py --scales "${SCALES:-10k,100k}" --write
"$PY" bench/ingest_bench.py --write
"$PY" bench/prepare_ab.py --write
"$PY" bench/finetune_bench.py --write
"$PY" bench/ocr_bench.py
"$PY" bench/int8_text_bench.py --write
"$PY" bench/text_tower_bench.py --write
"$PY" bench/startup_bench.py --write
"$PY" bench/quality_bench.py --debian --write
