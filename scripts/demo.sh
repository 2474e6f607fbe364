#!/usr/bin/env bash
# One command from a fresh machine: set up, then run the main job (the demo on the embedded default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/loraswitch demo "$@"
