"""Merging: many LoRA adapters into one, exactly on the dense updates dW = s * B @ A.

`methods` (per-module combination rules behind a registry), `merge` (orchestration over the union
of target modules), `adamerging` (coefficients learned by entropy minimisation through the
engine), `export` (PEFT adapter by truncated SVD, or a full model), `config` (the YAML), `cli`.

Names are imported lazily, so `loraswitch --help` (which imports `merging.cli`) does not pay for
torch, peft and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "config",
    "MergeConfig": "config",
    "load_config": "config",
    "parse_config": "config",
    "MergeResult": "merge",
    "merge_deltas": "merge",
    "module_union": "merge",
    "run_merge": "merge",
    "METHODS": "methods",
    "get_method": "methods",
    "register": "methods",
    "export_adapter": "export",
    "export_model": "export",
    "adamerge": "adamerging",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loraswitch.merging' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loraswitch.merging.{_EXPORTS[name]}"), name)
