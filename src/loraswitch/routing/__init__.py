"""Routers: each turns prompts (and hidden states) into the per-token adapter weights the engine
takes. One router per module, one interface (`base.Router`); `load_router` builds one by name.

| name  | decides                          | needs training | abstains |
|-------|----------------------------------|----------------|----------|
| seq   | one adapter per prompt           | yes (minutes)  | yes      |
| arrow | per token and layer, zero-shot   | no             | no       |
| gate  | per token and layer, learned     | yes            | yes      |
| auto  | seq per prompt, and per part of a prompt that mixes tasks; arrow if seq is stale |
"""

from __future__ import annotations

from pathlib import Path

from loraswitch.constants import DEMO_ROUTER_DIR
from loraswitch.engine import Engine
from loraswitch.routing.base import Decision, DecisionPolicy, Router

ROUTER_NAMES = ("auto", "seq", "arrow", "gate")


def load_router(engine: Engine, name: str = "auto", router_dir: str | Path | None = None) -> Router:
    """Build router `name` for `engine`'s library; trained routers load from `router_dir`
    (default: the committed demo routers)."""
    directory = Path(router_dir) if router_dir else DEMO_ROUTER_DIR
    if name == "seq":
        from loraswitch.routing.seq import SequenceRouter

        return SequenceRouter.load(directory, engine)
    if name == "arrow":
        from loraswitch.routing.arrow import ArrowRouter

        return ArrowRouter(engine)
    if name == "gate":
        from loraswitch.routing.gate import GateRouter

        return GateRouter.load(directory, engine)
    if name == "auto":
        from loraswitch.routing.auto import AutoRouter

        return AutoRouter.build(engine, directory)
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTER_NAMES)}")


__all__ = ["ROUTER_NAMES", "DEMO_ROUTER_DIR", "Decision", "DecisionPolicy", "Router", "load_router"]
