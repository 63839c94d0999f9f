#!/usr/bin/env bash
# Set up everything the suite needs on a fresh machine and run it: lint, types, then pytest
# (SQLite and PostgreSQL, Qdrant Edge and the qdrant-client stand-in, real FAISS, Tesseract, the tiny CLIP).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export LOUPE_TEST_POSTGRES_URL
LOUPE_TEST_POSTGRES_URL=$(scripts/ensure-postgres.sh)
trap 'scripts/ensure-postgres.sh --stop' EXIT
echo "==> PostgreSQL for tests: $LOUPE_TEST_POSTGRES_URL" >&2
echo "==> ruff" >&2
.venv/bin/ruff check server tests migrations bench
.venv/bin/ruff format --check server tests migrations bench
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> pytest" >&2
.venv/bin/python -m pytest "$@"
