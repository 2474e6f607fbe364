"""Token-level routing inside the forward pass: every targeted layer scores the adapters from its
own input and mixes the top-k. Arrow and the learned gates differ only in how a layer scores
(`TokenRouter.scores`); selection, the sparse `Routing` they hand the kernels, the per-token
trace and the sequence-level summary are shared here.

Only the selected experts are computed (the kernels gather or group by the chosen slots), unlike
PEFT's Arrow, which evaluates every adapter densely and then weights them.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from loraswitch.engine import Engine
from loraswitch.generate import Choice, Policy
from loraswitch.kernels import Routing
from loraswitch.padding import left_pad
from loraswitch.routing.base import Decision, Router

PAGED_OUT = -2  # slot id of a scored adapter that is not in the layers now (`Engine.max_resident`)


class TokenRouter(Router):
    """Per-layer top-k routing; subclasses say how a layer scores slots for its input."""

    # the inputs the scores were made for, and so the forward `read` runs: "routed", each layer
    # routing each token by its own scores; "base", no adapter applied (scorers trained on the
    # base model's inputs)
    reads = "routed"

    def __init__(self, engine: Engine, top_k: int = 2, temperature: float = 1.0):
        self.engine = engine
        self.top_k = top_k
        self.temperature = temperature

    @abstractmethod
    def scores(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scores [T, n], slot ids [n]) over the candidates for layer `key`; slot -1 = no adapter."""

    def select(self, key: str, x: torch.Tensor, allowed: torch.Tensor | None = None) -> Routing | None:
        """Top-k of the layer's scores; `allowed` (slot ids) keeps the others out of the running."""
        scored = self.scores(key, x)
        if scored is None:
            return None
        s, slots = scored
        slots = slots.to(s.device)  # scores are computed where the layer runs (a GPU)
        if bool((slots == PAGED_OUT).any()):  # a token router picks among the adapters in the layers
            s, slots = s[:, slots != PAGED_OUT], slots[slots != PAGED_OUT]
        if allowed is not None:
            ok = torch.isin(slots, allowed.to(s.device)) | (slots < 0)
            if not bool(ok.any()):
                return None
            s, slots = s[:, ok], slots[ok]
        k = min(self.top_k, s.shape[1])
        top, idx = s.topk(k, dim=-1)
        weights = torch.softmax(top / self.temperature, dim=-1)
        return Routing(slots[idx], weights)

    def policy(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> TokenPolicy:
        return TokenPolicy(self, engine, allowed)

    def route(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> list[Decision]:
        """Sequence-level view: average the per-token, per-layer weights over the prompt."""
        out = []
        for prompt, mass in zip(prompts, self.read(engine, [engine.base.chat_ids(p) for p in prompts], allowed)):
            n_user = len(engine.base.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            # the user's words and the few template tokens after them, not the system preamble
            out.append(self._decision(engine, mass[-n_user - 5 :].mean(0) if mass is not None else None))
        return out

    def read(self, engine: Engine, prompts: list[list[int]], allowed: frozenset[str] | None = None) -> list[torch.Tensor | None]:
        """Per prompt (token ids), each token's routing mass summed over layers [len, slots + 1]
        (column 0 = no adapter), from one forward of the batch in which every layer routes every
        token itself (`reads` "base": the layers only score, no adapter is applied); None where no
        adapter targets the routed layers."""
        policy = TokenPolicy(self, engine, allowed)
        batch = left_pad(prompts, engine.base.tokenizer.pad_token_id or 0)
        policy.on_forward(list(range(len(prompts))), batch.width)

        def observe(key: str, x: torch.Tensor) -> None:
            policy.dynamic(key, x)  # scored and recorded; no adapter applied

        route = policy.dynamic if self.reads == "routed" else observe
        with torch.inference_mode(), engine.routed(None, route):
            engine.model(**batch.model_inputs(engine.device), use_cache=False, logits_to_keep=1)
        if policy.mass is None:
            return [None] * len(prompts)
        mass = policy.mass.view(len(prompts), batch.width, -1).cpu()
        return [mass[i, batch.width - len(p) :] for i, p in enumerate(prompts)]

    def _decision(self, engine: Engine, totals: torch.Tensor | None) -> Decision:
        if totals is None or totals.sum() <= 0:
            return Decision(None, 1.0, {}, "no adapter targets the routed layers")
        share = totals / totals.sum()
        scores = {n: round(float(share[1 + s]), 4) for n, s in engine.slots.items()}
        base_share = float(share[0])
        best = max(scores, key=scores.get) if scores else None
        if best is None or base_share >= scores[best]:
            return Decision(None, base_share, scores, f"the layers route most weight ({base_share:.2f}) to no adapter")
        return Decision(best, scores[best], scores)


class TokenPolicy(Policy):
    """Generation policy of a token-level router: the layers decide (`dynamic`); this object
    accumulates each token's routing mass over layers for the trace and switch events."""

    def __init__(self, router: TokenRouter, engine: Engine, allowed: frozenset[str] | None = None):
        self.router = router
        self.engine = engine
        self.allowed = None if allowed is None else torch.tensor([engine.slots[n] for n in sorted(allowed) if n in engine.slots],
                                                                 dtype=torch.long)
        self.n_slots = max(engine.slots.values(), default=-1) + 2  # index 0 = no adapter
        self.rows: list[int] = []
        self.width = 1
        self.mass: torch.Tensor | None = None  # [T, n_slots + 1] summed weights this forward
        self.traces: dict[int, list[dict[str, float]]] = {}
        self.dynamic = self._route

    def on_forward(self, rows: list[int], tokens_per_row: int) -> None:
        self.rows, self.width, self.mass = rows, tokens_per_row, None

    def _route(self, key: str, x: torch.Tensor) -> Routing | None:
        routing = self.router.select(key, x, self.allowed)
        if routing is None:
            return None
        if self.mass is None:
            self.mass = torch.zeros(routing.n_tokens, self.n_slots, device=routing.ids.device)
        self.mass.scatter_add_(1, (routing.ids + 1).clamp(min=0), routing.weights.float())
        return routing

    def trace_entry(self, engine: Engine, row: int, choice: Choice) -> dict:
        if self.mass is None:
            return {"adapters": {}}
        b = self.rows.index(row)
        m = self.mass[b * self.width + self.width - 1]
        share = m / m.sum().clamp(min=1e-9)
        adapters = {engine.name_of(s - 1) or f"slot{s - 1}": round(float(share[s]), 4)
                    for s in range(1, len(share)) if share[s] >= 0.05}
        self.traces.setdefault(row, []).append(adapters)
        return {"adapters": adapters}

    def summary(self, engine: Engine, row: int) -> dict:
        totals: dict[str, float] = {}
        for step in self.traces.get(row, []):
            for name, w in step.items():
                totals[name] = totals.get(name, 0.0) + w
        best = max(totals, key=totals.get) if totals else None
        n = max(1, len(self.traces.get(row, [])))
        return {"router": self.router.name, "adapter": best, "confidence": round(totals.get(best, 0.0) / n, 4) if best else 0.0,
                "scores": {k: round(v / n, 4) for k, v in totals.items()}}

    def events(self, row: int) -> list[dict]:
        out, prev = [], None
        for i, step in enumerate(self.traces.get(row, [])):
            top = max(step, key=step.get) if step else None
            if top != prev:
                out.append({"token_index": i, "event": "switch", "adapter": top})
                prev = top
        return out
