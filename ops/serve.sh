#!/usr/bin/env bash
# Set up if needed, then start Sesame TTS in the foreground (`serve run serve_config.yaml` underneath),
# honouring HOST, PORT and every other setting from the environment or .env.
# `--tiny DIR`: serve a tiny random-weight checkpoint (written into DIR once), offline, to try the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
if [ "${1:-}" = "--tiny" ]; then
  [ -n "${2:-}" ] || { echo "usage: ./ops/serve.sh --tiny DIR" >&2; exit 2; }
  [ -f "$2/config.json" ] || .venv/bin/python -m serve_app.tools.tiny_checkpoint "$2"
  export MODEL_ID="$2"
  shift 2
fi
exec .venv/bin/python -m serve_app.launch "$@"
