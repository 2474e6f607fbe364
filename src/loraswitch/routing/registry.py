"""Routers by name: `load_router` builds one for an engine's library."""

from __future__ import annotations

from pathlib import Path

from loraswitch.constants import DEMO_ROUTER_DIR
from loraswitch.engine import Engine
from loraswitch.routing import ROUTER_NAMES
from loraswitch.routing.base import Router


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
