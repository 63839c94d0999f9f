#!/usr/bin/env bash
# Set up (if needed) and run Loupe on the embedded defaults: SQLite, Qdrant Edge and FAISS in ./data.
#   scripts/run.sh [--host 0.0.0.0] [--port 8000]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/loupe serve "$@"
