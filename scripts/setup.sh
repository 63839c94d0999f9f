#!/usr/bin/env bash
# Idempotent setup for a fresh machine: Debian packages, a virtual environment, Loupe and its dependencies.
#   scripts/setup.sh          what `loupe serve` needs
#   scripts/setup.sh --test   plus the test tools (and what the test suite drives: PostgreSQL client/server)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; fi
fi

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if ! command -v apt-get >/dev/null; then
    say "please install these system packages: ${missing[*]}"; return 1
  fi
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Tesseract reads the words inside images (the OCR channel); language packs follow LOUPE_OCR__LANGUAGES.
PKGS=(tesseract-ocr tesseract-ocr-eng)
for lang in $(echo "${LOUPE_OCR__LANGUAGES:-eng}" | tr '+,' '  '); do
  PKGS+=("tesseract-ocr-${lang//_/-}")
done
# A C++ compiler (and Python's headers) for the compiled image lanes on CPUs where the bf16 image copy serves
# (server/loupe/models/compiled_image.py); without them the trace serves.
PKGS+=(g++ python3-dev)
# The test suite drives the gallery in a real headless browser and renders text with DejaVu fonts.
[[ $WITH_TEST -eq 1 ]] && PKGS+=(chromium fonts-dejavu-core fonts-dejavu-extra)
apt_install "${PKGS[@]}"

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  say "creating the virtual environment in .venv"
  "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python

# Reinstall only when the dependency list changed (safe and quick to run twice).
extras=""
[[ $WITH_TEST -eq 1 ]] && extras="[test]"
stamp=.venv/.loupe-installed
want="$(sha256sum pyproject.toml | cut -c1-16)$extras"
if [[ ! -f $stamp || "$(cat $stamp)" != "$want" ]] || ! "$VPY" -c "import loupe" 2>/dev/null; then
  say "installing Loupe and its dependencies into .venv (torch is pinned to the 2.13.0 CPU build)"
  "$VPY" -m pip install -q --upgrade pip >/dev/null
  # torch first and exactly pinned: a looser request would pull a multi-GB CUDA build.
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q -e ".$extras"
  echo "$want" > $stamp
fi
say "setup done"
