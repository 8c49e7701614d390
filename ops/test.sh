#!/usr/bin/env bash
# Set up if needed (the serving packages and the test tools), then run the whole test suite (offline: a tiny
# random-weight checkpoint, real Ray Serve, real ffmpeg). Extra arguments go to pytest.
# Two workers (pytest-xdist) run the suite's groups side by side: a module, or the modules sharing one server
# (tests/conftest.py). TEST_WORKERS sets how many; `-n 0` among the arguments runs it in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh --test
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "$@"
