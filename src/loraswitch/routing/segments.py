"""Switching adapters across a prompt that mixes tasks, part by part.

A prompt of numbered parts ("1. ...", "2. ...") is split into its parts, and a sequence-level
router decides each part's adapter on the part's own words: a segment-level decision, made once
per part, so it cannot flicker token by token (MeteoRA needs top-2 and a hand-set temperature of
15-30 to keep its per-token gates from doing exactly that).

Generation then follows the answer's structure in one pass with one KV cache: the policy writes
the part number ("1."), lets that part's adapter write the answer, and when the adapter ends its
answer (a newline or end of turn) it writes the next part number under the next part's adapter.
Every switch is recorded as an event with the token index where it happened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraswitch.engine import Engine
from loraswitch.generate import NO_ADAPTER, Choice, Policy
from loraswitch.routing.base import Decision

_PART_RE = re.compile(r"^\s*(\d{1,2})[.)]\s+(.+?)\s*$")
MAX_PART_TOKENS = 48


def split_parts(prompt: str) -> list[str] | None:
    """The numbered parts of a multi-part prompt (numbered 1..n in order), else None."""
    parts: list[str] = []
    for line in prompt.splitlines():
        m = _PART_RE.match(line)
        if m and int(m.group(1)) == len(parts) + 1:
            parts.append(m.group(2))
    return parts if len(parts) >= 2 else None


@dataclass
class _RowState:
    decisions: list[Decision]  # one per part
    part: int = 0
    forced: list[int] = field(default_factory=list)  # tokens still to write before the answer
    part_tokens: int = 0
    done: bool = False
    trace: list[int] = field(default_factory=list)  # part index of each emitted token


class SegmentPolicy(Policy):
    """Rows with numbered parts switch adapters part by part; other rows keep one decision."""

    def __init__(self, engine: Engine, row_decisions: list[list[Decision]], router: str):
        self.engine = engine
        self.router = router
        tok = engine.base.tokenizer
        self.newline = tok("\n", add_special_tokens=False)["input_ids"]
        self.stop = engine.base.eos_ids
        self.rows = [_RowState(d) for d in row_decisions]
        for state in self.rows:
            if len(state.decisions) > 1:
                state.forced = self._number(1)

    def _number(self, k: int) -> list[int]:
        return self.engine.base.tokenizer(f"{k}.", add_special_tokens=False)["input_ids"]

    def _choice(self, state: _RowState) -> Choice:
        d = state.decisions[min(state.part, len(state.decisions) - 1)]
        return ([self.engine.slot_of(d.adapter)], [1.0]) if d.adapter is not None else NO_ADAPTER

    def prompt_choice(self, row: int, prompt: list[int]) -> Choice:
        return self._choice(self.rows[row])

    def step_choice(self, row: int, generated: list[int]) -> Choice:
        return self._choice(self.rows[row])

    def override(self, row: int, generated: list[int], token: int) -> int:
        state = self.rows[row]
        state.trace.append(state.part)
        if len(state.decisions) == 1:
            return token
        if state.forced:
            return state.forced.pop(0)
        text = self.engine.base.tokenizer.decode([token])
        state.part_tokens += 1
        ends_part = token in self.stop or "\n" in text or state.part_tokens >= MAX_PART_TOKENS
        if not ends_part:
            return token
        if state.part + 1 >= len(state.decisions):
            state.done = True
            return next(iter(self.stop)) if token not in self.stop else token
        state.part += 1
        state.part_tokens = 0
        state.forced = self._number(state.part + 1)
        # the part's answer is over: write the newline ourselves, then the next number
        return self.newline[0] if token in self.stop or "\n" not in text else token

    def trace_entry(self, engine: Engine, row: int, choice: Choice) -> dict:
        state = self.rows[row]
        part = state.trace[-1] if state.trace else 0
        d = state.decisions[min(part, len(state.decisions) - 1)]
        entry = {"adapters": {d.adapter: 1.0} if d.adapter else {}}
        if len(state.decisions) > 1:
            entry["part"] = part + 1
        return entry

    def summary(self, engine: Engine, row: int) -> dict:
        ds = self.rows[row].decisions
        if len(ds) == 1:
            return {"router": self.router, **ds[0].to_dict()}
        return {"router": self.router, "adapter": [d.adapter for d in ds],
                "confidence": round(min(d.confidence for d in ds), 4), "parts": [d.to_dict() for d in ds]}

    def events(self, row: int) -> list[dict]:
        state = self.rows[row]
        ds = state.decisions
        if len(ds) == 1:
            d = ds[0]
            return [{"token_index": 0, "event": "abstain" if d.adapter is None else "select", "adapter": d.adapter,
                     "confidence": round(d.confidence, 4), **({"reason": d.reason} if d.reason else {})}]
        out, prev = [], None
        for i, part in enumerate(state.trace):
            if part != prev:
                out.append({"token_index": i, "event": "switch", "part": part + 1, "adapter": ds[part].adapter,
                            "confidence": round(ds[part].confidence, 4)})
                prev = part
        return out
