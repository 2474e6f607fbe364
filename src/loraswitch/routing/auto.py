"""`auto`: the router to use when you don't want to choose one.

Single-task prompts get the calibrated sequence-level selector (best routing accuracy, and the
only router that abstains reliably on prompts no adapter is for). Prompts made of numbered parts
are answered part by part (`fans_out`): each part is a row of the batch, routed by the selector on
its own words (`switch.parts`). Adapters loaded after the selector was trained get heads of their
own (`routing.added`: from their examples, else zero-shot from their weights); removed ones lose
their class. Only when the selector is missing, has no reservoir to calibrate added adapters
against, or an adapter it knows has changed weights, auto falls back to Arrow, which needs no
training, and says so in each decision.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from loraswitch.engine import Engine
from loraswitch.generate import Policy
from loraswitch.routing.arrow import ArrowRouter
from loraswitch.routing.base import Decision, DecisionPolicy, Router, StaleRouterError
from loraswitch.routing.requests import without_how
from loraswitch.routing.seq import SequenceRouter


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stamp))


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

    def route(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> list[Decision]:
        return self._noted(self.inner.route(engine, [without_how(p) for p in prompts], allowed))

    def _noted(self, decisions: list[Decision]) -> list[Decision]:
        if self.note:
            for d in decisions:
                d.reason = f"{d.reason}; {self.note}" if d.reason else self.note
        return decisions

    def describe(self, engine: Engine) -> dict[str, dict]:
        """How each loaded adapter is routed: {name: {"routed", "source", "since", "kept"}}."""
        if not isinstance(self.inner, SequenceRouter):
            return {n: {"routed": "arrow (zero-shot, per token)", "source": "arrow", "since": None, "note": self.note}
                    for n in engine.names}
        router = self.inner
        out = {}
        for name in engine.names:
            head = router.added.get(name)
            if head is not None:
                out[name] = {"routed": head.describe(), "source": head.source, "since": _iso(head.since),
                             "kept": head.where}
            else:
                since = _iso(router.trained_at)
                out[name] = {"routed": "trained" + (f", since {since.replace('T', ' ')}" if since else ""),
                             "source": "trained", "since": since}
        return out

    def policy(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> Policy:
        policy = self.inner.policy(engine, [without_how(p) for p in prompts], allowed)
        if isinstance(policy, DecisionPolicy):
            self._noted(policy.decisions)
            policy.router = f"auto ({self.inner.name})"
        return policy
