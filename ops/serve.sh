#!/usr/bin/env bash
# Set up if needed, then start Sesame TTS in the foreground (`serve run serve_config.yaml` underneath),
# honouring HOST, PORT and every other setting from the environment or .env.
set -euo pipefail
cd "$(dirname "$0")/.."
./ops/setup.sh
exec .venv/bin/python -m serve_app.launch "$@"
