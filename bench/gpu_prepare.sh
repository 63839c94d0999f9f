#!/usr/bin/env bash
# Prepares what bench/gpu_run.sh carries to a lent CUDA machine (both folders git-ignored through .git/info/exclude):
#   .whl/        cp312 manylinux wheels of Loupe's dependencies that the device image lacks, at the versions of
#                this checkout's .venv (the image brings torch, transformers, numpy, Pillow, peft, onnxruntime, ...)
#   .gpu/model/  bench/fullsize.py's tokenizer and configs, without its 600 MB of weights
# Then, through the device tool: run `OUT=$OUT bash bench/gpu_run.sh` with carry [".whl", ".gpu"] (about 50 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PKGS="litestar msgspec polyfactory litestar-htmx multipart rich-click uvicorn sqlmodel sqlalchemy greenlet alembic
mako qdrant-client qdrant-edge-py faiss-cpu pytesseract pydantic pydantic-core pydantic-settings python-dotenv
annotated-types typing-inspection sniffio typing-extensions rich markdown-it-py mdurl pygments"
mkdir -p .git/info .whl .gpu/model
for d in /.whl/ /.gpu/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
for p in $PKGS; do
  v=$("$PY" -m pip show "$p" | awk '/^Version:/{print $2}')
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p==$v"
done
M=$("$PY" -c "import sys; sys.path[:0] = ['bench', 'server']; import fullsize; print(fullsize.build())")
find "$M" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} .gpu/model/ \;
du -sh .whl .gpu
