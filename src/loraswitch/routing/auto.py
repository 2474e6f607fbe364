"""`auto`: the router to use when you don't want to choose one.

Single-task prompts get the calibrated sequence-level selector (best routing accuracy, and the
only router that abstains reliably on prompts no adapter is for). Prompts made of numbered parts
are answered part by part (`fans_out`): each part is a row of the batch, routed by the selector on
its own words (`switch.parts`). When
the selector is missing or was trained for a different library (an adapter was added or
changed since), auto falls back to Arrow, which needs no training, and says so in each decision.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from loraswitch.engine import Engine
from loraswitch.generate import Policy
from loraswitch.routing.arrow import ArrowRouter
from loraswitch.routing.base import Decision, DecisionPolicy, Router, StaleRouterError
from loraswitch.routing.seq import SequenceRouter


class AutoRouter(Router):
    name = "auto"
    fans_out = True

    def __init__(self, inner: Router, note: str = ""):
        self.inner = inner
        self.note = note

    @classmethod
    def build(cls, engine: Engine, directory: Path) -> AutoRouter:
        try:
            return cls(SequenceRouter.load(directory, engine))
        except (FileNotFoundError, StaleRouterError) as exc:
            note = f"using arrow: {exc}"
            warnings.warn(note, stacklevel=2)
            return cls(ArrowRouter(engine), note)

    def route(self, engine: Engine, prompts: list[str]) -> list[Decision]:
        decisions = self.inner.route(engine, prompts)
        if self.note:
            for d in decisions:
                d.reason = f"{d.reason}; {self.note}" if d.reason else self.note
        return decisions

    def policy(self, engine: Engine, prompts: list[str]) -> Policy:
        if isinstance(self.inner, ArrowRouter):
            return self.inner.policy(engine, prompts)
        return DecisionPolicy(engine, self.route(engine, prompts), f"auto ({self.inner.name})")
