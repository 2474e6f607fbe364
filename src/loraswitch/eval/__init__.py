"""Evaluation harness (`loraswitch eval`) and speed/memory benchmarks (`loraswitch bench`).

`harness.run_eval` runs a registry of methods (`methods`, `peft_baselines`) on the demo suite
(`data`), scores them (`scoring`) and writes results.json / results.md / plots (`report`).
`bench` measures tokens/s and memory of loraswitch against merged weights and PEFT.
"""

from loraswitch.eval.data import Item, build_items
from loraswitch.eval.harness import DEFAULT_METHODS, EvalConfig, run_eval
from loraswitch.eval.methods import EvalContext, Method, register, registry
from loraswitch.eval.scoring import Answer, aggregate, chosen_adapter, part_adapters, score_item

__all__ = [
    "DEFAULT_METHODS",
    "Answer",
    "EvalConfig",
    "EvalContext",
    "Item",
    "Method",
    "aggregate",
    "build_items",
    "chosen_adapter",
    "part_adapters",
    "register",
    "registry",
    "run_eval",
    "score_item",
]
