"""The one router interface: a router looks at prompts (and, for token-level routers, at each
layer's hidden states) and produces the per-token adapter weights the engine takes.

A router answers two questions:
* `route(engine, prompts)` -> one `Decision` per prompt: which adapter (or None for the base
  model), how confident, and the score of every adapter. This is `loraswitch route`.
* `policy(engine, prompts)` -> a generation `Policy`: per-token routing during prefill and
  decoding, with a trace and switch events. This is `loraswitch generate --route ...`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraswitch.engine import Engine
from loraswitch.generate import NO_ADAPTER, Choice, FixedPolicy, Policy


@dataclass
class Decision:
    """A sequence-level routing decision. `adapter` None means the base model answers."""

    adapter: str | None
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why it abstained, when it did; for an added adapter, how it was routed
    source: str = ""  # which head decided: "trained", "examples" or "zero-shot" (empty: not a selector)
    # the trained selector's probability that no adapter fits (its `__none__` class), whatever it
    # decided: `confidence` is the probability of the decision, this one is always the same
    # quantity, so a client can threshold it itself. None: the router has no such class
    none_probability: float | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["confidence"] = round(float(out["confidence"]), 4)  # as the scores are
        if out["none_probability"] is None:
            del out["none_probability"]
        return out


class Router(ABC):
    """Base class of every router (one per module in this package)."""

    name: str = "router"
    # True: a prompt of numbered parts is answered part by part, one batch row per part
    # (`switch.parts`); the router then only ever sees single-task text.
    fans_out: bool = False

    @abstractmethod
    def route(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> list[Decision]:
        """Decide an adapter per prompt, choosing only among `allowed` (None: every loaded one)."""

    def policy(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> Policy:
        """Generation policy; default: the sequence-level decision for every token."""
        return DecisionPolicy(engine, self.route(engine, prompts, allowed), self.name)


class DecisionPolicy(FixedPolicy):
    """Sequence-level routing: each row keeps its decided adapter for every token."""

    def __init__(self, engine: Engine, decisions: list[Decision], router: str, features: torch.Tensor | None = None):
        self.decisions = decisions
        self.router = router
        self.features = features  # [N, D] what the router decided on, when it has them (shift detection)
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


# ---------------------------------------------------------------- trained routers on disk

NONE_CLASS = "__none__"  # the class of prompts no adapter is for (a router abstains on them)


class StaleRouterError(RuntimeError):
    """A trained router does not match the adapters now loaded."""


def library_signature(engine: Engine, names: list[str] | None = None) -> list[dict]:
    """Name and weight fingerprint of each adapter: what a trained router was trained against."""
    names = engine.names if names is None else names
    return [{"name": n, "fingerprint": engine.adapters[n].fingerprint} for n in names]


def check_library(engine: Engine, recorded: list[dict], what: str, grows: bool = False) -> None:
    """Raise StaleRouterError unless every recorded adapter is loaded with the same weights.
    `grows`: the router handles a library that changed size (adapters added since training get
    heads of their own, removed ones lose their class), so only changed weights are stale."""
    problems = []
    for item in recorded:
        adapter = engine.adapters.get(item["name"])
        if adapter is None:
            if not grows:
                problems.append(f"{item['name']} is not loaded")
        elif adapter.fingerprint != item["fingerprint"]:
            problems.append(f"{item['name']} has different weights than it was trained with")
    extra = sorted(set(engine.names) - {i["name"] for i in recorded})
    if extra and not grows:
        problems.append(f"new adapters it has never seen: {', '.join(extra)}")
    if problems:
        raise StaleRouterError(f"{what} does not match the loaded library ({'; '.join(problems)}); "
                               "retrain it with `loraswitch train-router`")


def save_router_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a trained router: its tensors as safetensors, its settings as JSON metadata (never a
    pickle, so a router file from anywhere is safe to load)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata={"loraswitch": json.dumps(meta)})
    return path


def load_router_file(path: Path, hint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, settings) of a router file written by `save_router_file`; `hint` says how to
    make one when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"no trained router at {path}; {hint}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "loraswitch" not in meta:
            raise ValueError(f"{path} is not a loraswitch router file (no 'loraswitch' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return tensors, json.loads(meta["loraswitch"])
