#!/usr/bin/env bash
# One command from a fresh machine: set up, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f scripts/install-browser.sh ] && { bash scripts/install-browser.sh || echo "browser install failed: the /ui browser test will skip"; }
. .venv/bin/activate
ruff check src tests benchmarks
lint-imports --no-cache  # the layering contract in pyproject.toml
python -m pytest -q -p no:cacheprovider "$@"
