"""Routers: each turns prompts (and hidden states) into the per-token adapter weights the engine
takes. One router per module, one interface (`base.Router`); `load_router` builds one by name.

| name  | decides                          | needs training | abstains |
|-------|----------------------------------|----------------|----------|
| seq   | one adapter per prompt           | yes (minutes)  | yes      |
| arrow | per token and layer, zero-shot   | no             | no       |
| gate  | per answer part, read by learned per-token gates (`segments`; mode="token": per token and layer) | yes | yes |
| auto  | seq per prompt, and per part of a prompt that mixes tasks; adapters added after training |
|       | get heads of their own (`added`: from examples, or zero-shot); arrow if seq is stale |
"""

from __future__ import annotations

from loraswitch.lazy import lazy_exports

ROUTER_NAMES = ("auto", "seq", "arrow", "gate")  # also in `registry`, which builds them

__getattr__, __all__ = lazy_exports(__name__, {
    "Decision": "base",
    "DecisionPolicy": "base",
    "Router": "base",
    "load_router": "registry",
})
__all__ += ["ROUTER_NAMES"]
