"""Evaluation harness (`loraswitch eval`) and speed/memory benchmarks (`loraswitch bench`).

`harness.run_eval` runs a registry of methods (`methods`, `peft_baselines`) on the demo suite
(`data`), scores them (`scoring`) and writes results.json / results.md / plots (`report`).
`bench` measures tokens/s and memory of loraswitch against merged weights and PEFT.
"""

from __future__ import annotations

from loraswitch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "Item": "data",
    "build_items": "data",
    "DEFAULT_METHODS": "harness",
    "EvalConfig": "harness",
    "run_eval": "harness",
    "EvalContext": "methods",
    "Method": "methods",
    "registry": "registry",
    "aggregate": "scoring",
    "chosen_adapter": "scoring",
    "part_adapters": "scoring",
    "score_item": "scoring",
})
