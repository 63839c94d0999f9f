#!/usr/bin/env bash
# Every GPU benchmark in one command, for a lent CUDA machine whose python3 has torch and transformers but not the
# rest of Loupe's dependencies (the device tool's image). Prepare here (bench/gpu_prepare.sh), then run there from
# the repository root:
#   .whl/         cp312 wheels of the dependencies that image lacks (bench/gpu_prepare.sh names them)
#   .gpu/model/   the full-size tokenizer and configs of bench/fullsize.py's model, without its weights
#                 (random weights are drawn there: the same cost, 600 MB less to carry)
# Writes gpu.md (bench/gpu_bench.py), ingest.log (bench/ingest_bench.py on cuda) and finetune.log under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/loupe-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/server PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
M=$HOME/.cache/loupe/bench/clip-vit-b-32-random
mkdir -p "$M" && cp .gpu/model/* "$M"/
python3 -c "import sys; from transformers import CLIPConfig, CLIPModel; CLIPModel(CLIPConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])" "$M" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia-smi.txt" 2>&1
date -u >"$OUT/date.txt"
timeout "${GPU_BENCH_S:-180}" python3 bench/gpu_bench.py --out "$OUT/gpu.md" >"$OUT/gpu.log" 2>&1
echo "gpu_bench: $?"
timeout "${INGEST_S:-240}" python3 bench/ingest_bench.py --device cuda --sizes 0.5 --images 1024 >"$OUT/ingest.log" 2>&1
echo "ingest_bench: $?"
timeout "${FINETUNE_S:-90}" python3 bench/finetune_bench.py --device cuda --images 256 --batch 64 --steps 8 >"$OUT/finetune.log" 2>&1
echo "finetune_bench: $?"
tail -n 3 "$OUT"/*.log
