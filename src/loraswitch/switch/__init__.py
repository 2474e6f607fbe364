"""The library's front door: one object that holds the engine and its routers and answers chat
prompts with `model="auto"` (route), `"base"`, or an adapter name. The CLI, the evaluation
harness and the server all go through `Switch.chat`, so they route and generate identically.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loraswitch.base import Base, load_base
from loraswitch.constants import DEMO_ADAPTER_DIR
from loraswitch.engine import Engine
from loraswitch.generate import Generation, Policy, SamplingParams, explicit, generate
from loraswitch.routing import ROUTER_NAMES, Router, load_router
from loraswitch.routing.segments import FanOut

MAX_BATCH = 32


class Switch:
    """A base model, its adapter library and its routers."""

    def __init__(
        self,
        base: Base | str | None = None,
        adapter_dirs: list[str | Path] | None = None,
        router_dir: str | Path | None = None,
    ):
        if not isinstance(base, Base):
            base = load_base(base)
        self.base = base
        dirs = [DEMO_ADAPTER_DIR] if adapter_dirs is None else adapter_dirs
        self.engine = Engine(base, dirs)
        self.router_dir = Path(router_dir) if router_dir else None
        self._routers: dict[tuple[str, int], Router] = {}

    def router(self, name: str = "auto") -> Router:
        """A router by name ("auto", "seq", "arrow", "gate"), loaded once per library version."""
        key = (name, self.engine.version)
        if key not in self._routers:
            self._routers[key] = load_router(self.engine, name, self.router_dir)
        return self._routers[key]

    def policy(self, prompts: list[str], model: str = "auto", route: str | None = None) -> Policy:
        """`model`: "auto" routes (with router `route`, default "auto"), "base" or an adapter name."""
        if model == "auto":
            return self.router(route or "auto").policy(self.engine, prompts)
        if route not in (None, "none"):
            raise ValueError(f"route={route!r} only applies to model='auto' (model={model!r} is explicit)")
        return explicit(self.engine, [model] * len(prompts))

    def chat(
        self,
        prompts: list[str],
        model: str = "auto",
        route: str | None = None,
        params: SamplingParams | None = None,
        system: str | None = None,
    ) -> list[Generation]:
        """Answer each prompt as one chat turn; batches of up to MAX_BATCH rows. With a router
        that fans out (`auto`), a prompt of numbered parts becomes one row per part and its
        answer is assembled from theirs (`routing.segments`)."""
        router = self.router(route or "auto") if model == "auto" else None
        plan = FanOut.of(prompts, enabled=bool(router is not None and router.fans_out))
        params = params or SamplingParams()
        budgets = plan.budgets(params.max_new_tokens)
        gens: list[Generation | None] = [None] * len(plan.rows)
        for budget in sorted(set(budgets)):  # one generate() per budget: it takes one max_new_tokens
            todo = [r for r, b in enumerate(budgets) if b == budget]
            for i in range(0, len(todo), MAX_BATCH):
                chunk = todo[i : i + MAX_BATCH]
                texts = [plan.rows[r] for r in chunk]
                ids = [self.base.chat_ids(t, system=system) for t in texts]
                got = generate(self.engine, ids, self.policy(texts, model, route), replace(params, max_new_tokens=budget))
                for r, g in zip(chunk, got):
                    gens[r] = g
        composite = plan.composite
        if not any(composite):
            return gens  # type: ignore[return-value]
        prompt_ids = [self.base.chat_ids(p, system=system) if c else [] for p, c in zip(prompts, composite)]
        return plan.gather(self.base.tokenizer, gens,  # type: ignore[arg-type]
                           router.name if router else model, prompt_ids)


__all__ = ["Switch", "ROUTER_NAMES"]
