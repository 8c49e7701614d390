#!/usr/bin/env bash
# Set up if needed (the serving packages and the test tools), then run the whole test suite (offline: a tiny
# random-weight checkpoint, real Ray Serve, real ffmpeg). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh --test
exec .venv/bin/python -m pytest "$@"
