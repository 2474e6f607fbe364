"""The one router interface: a router looks at prompts (and, for token-level routers, at each
layer's hidden states) and produces the per-token adapter weights the engine takes.

A router answers two questions:
* `route(engine, prompts)` -> one `Decision` per prompt: which adapter (or None for the base
  model), how confident, and the score of every adapter. This is `loraswitch route`.
* `policy(engine, prompts)` -> a generation `Policy`: per-token routing during prefill and
  decoding, with a trace and switch events. This is `loraswitch generate --route ...`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

from loraswitch.engine import Engine
from loraswitch.generate import NO_ADAPTER, Choice, FixedPolicy, Policy


@dataclass
class Decision:
    """A sequence-level routing decision. `adapter` None means the base model answers."""

    adapter: str | None
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why it abstained, when it did

    def to_dict(self) -> dict:
        return asdict(self)


class Router(ABC):
    """Base class of every router (one per module in this package)."""

    name: str = "router"
    # True: a prompt of numbered parts is answered part by part, one batch row per part
    # (`routing.segments`); the router then only ever sees single-task text.
    fans_out: bool = False

    @abstractmethod
    def route(self, engine: Engine, prompts: list[str]) -> list[Decision]:
        """Decide an adapter per prompt."""

    def policy(self, engine: Engine, prompts: list[str]) -> Policy:
        """Generation policy; default: the sequence-level decision for every token."""
        return DecisionPolicy(engine, self.route(engine, prompts), self.name)


class DecisionPolicy(FixedPolicy):
    """Sequence-level routing: each row keeps its decided adapter for every token."""

    def __init__(self, engine: Engine, decisions: list[Decision], router: str):
        self.decisions = decisions
        self.router = router
        choices: list[Choice] = [
            ([engine.slot_of(d.adapter)], [1.0]) if d.adapter is not None else NO_ADAPTER for d in decisions
        ]
        super().__init__(choices)

    def summary(self, engine: Engine, row: int) -> dict:
        return {"router": self.router, **self.decisions[row].to_dict()}

    def events(self, row: int) -> list[dict]:
        d = self.decisions[row]
        return [{"token_index": 0, "event": "abstain" if d.adapter is None else "select", "adapter": d.adapter,
                 "confidence": round(d.confidence, 4), **({"reason": d.reason} if d.reason else {})}]
