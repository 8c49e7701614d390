#!/usr/bin/env bash
# The whole accelerator benchmark in one call, for a lent GPU machine (no network; Python 3.12, CUDA 13; no
# MLX until the wheels that ../shared/gpu/prepare.sh readied travel with the call). Kernels and modelled
# Metal dispatches per frame (ops/bench/dispatch.py), graph build time and frames/s of the frame loop at full
# size (random weights), batch 1 and 4, compiled and not, pipelined and not, and mlx-audio's own loop on the
# same weights; results under $OUT/bench/<machine>/.
#
#   From the project's root, here:  ../shared/gpu/prepare.sh
#   device call 1, carry [".gpu/a"]:  mkdir -p /tmp/keep && cp .gpu/a/part.aa /tmp/keep/
#   device call 2, carry [".gpu/b"], at once (the machine stays warm ~30 s):  ops/gpu-bench.sh
#
# On any machine with MLX installed (CPU included) it runs as it is: `OUT=/tmp/out ops/gpu-bench.sh --tiny`
# tries it end to end on the tiny checkpoint in well under a minute. FRAMES, REPEATS, COMPILE (off,on) and
# PIPELINES (on,off) change the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/results/gpu-bench}
mkdir -p "$OUT"
log="$OUT/gpu-bench.log"
: > "$log"
say() { echo "gpu-bench: $*" | tee -a "$log"; }

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${GPU_BENCH_SYSTEM_PYTHON:-}" ] && PYTHON=.venv/bin/python
if [ -f .gpu/b/WHEEL_NAME ]; then  # the device machine: put the two halves of mlx-cuda together, install
  wheel="/tmp/$(cat .gpu/b/WHEEL_NAME)"
  cat /tmp/keep/part.aa .gpu/b/part.ab > "$wheel"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" .gpu/b/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export CACHE_DIR=${CACHE_DIR:-/tmp/sesame-tts-gpu-bench}  # the full-size checkpoint is written here once

checkpoint=full frames=${FRAMES:-32} repeats=${REPEATS:-2} batches=1,4
if [ "${1:-}" = "--tiny" ]; then
  checkpoint=tiny frames=${FRAMES:-3} repeats=${REPEATS:-1} batches=1,2
fi

"$PYTHON" - <<'PY' 2>&1 | tee -a "$log"
import mlx.core as mx
print("mlx", mx.__version__, "default device", mx.default_device(), "gpu available", mx.is_available(mx.gpu))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$log" || true

say "loop benchmark: $checkpoint checkpoint, $frames frames x $repeats repeats, batches $batches"
set -o pipefail
"$PYTHON" -m ops.bench.loop --checkpoint "$checkpoint" --frames "$frames" --repeats "$repeats" \
  --rounds 1 --batches "$batches" --compile "${COMPILE:-off,on}" --pipelines "${PIPELINES:-on,off}" \
  --skip-engine-part --out "$OUT/bench" 2>&1 | tee -a "$log"
say "done: $(find "$OUT/bench" -name 'loop-*.json' | head -1)"
