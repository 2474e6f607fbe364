"""Merging: many LoRA adapters into one, exactly on the dense updates dW = s * B @ A.

`methods` (per-module combination rules behind a registry), `merge` (orchestration over the union
of target modules), `adamerging` (coefficients learned by entropy minimisation through the
engine), `export` (PEFT adapter by truncated SVD, or a full model), `config` (the YAML), `cli`.

Names are imported lazily, so `loraswitch --help` (which imports `merging.cli`) does not pay for
torch, peft and transformers.
"""

from __future__ import annotations

from loraswitch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ConfigError": "config",
    "MergeConfig": "config",
    "load_config": "config",
    "parse_config": "config",
    "MergeResult": "merge",
    "merge_deltas": "merge",
    "module_union": "deltas",
    "run_merge": "merge",
    "METHODS": "methods",
    "get_method": "methods",
    "register": "methods",
    "export_adapter": "export",
    "export_model": "export",
    "adamerge": "adamerging",
})
