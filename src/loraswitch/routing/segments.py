"""Answering a prompt that mixes tasks, part by part (`auto` on a numbered multi-part prompt).

A prompt of numbered parts ("1. ...", "2. ...") is split into its parts and each part becomes a
row of the same batch: its own prompt (the conversation with the user turn replaced by the part),
its own routing decision made on the part's own words, its own adapter. All rows decode together
in one batched forward; the answers are then assembled in order into one numbered answer
("1. ...\\n2. ..."), with a trace that labels every token with its part and adapter and one
switch event per part.

Why rows and not one pass with one KV cache: a decision per part cannot flicker token by token
(MeteoRA needs top-2 and a hand-set temperature of 15-30 to keep per-token gates from doing
exactly that), and an adapter trained on single requests answers a part correctly only when the
part is all it reads. In one pass every part's adapter reads the whole multi-part prompt and
tends to answer another part; measured on the demo suite that cost most of the per-part accuracy.
The oracle of `loraswitch eval` answers composites the same way (each part alone with its own
adapter) and assembles them with `assemble` below, so the two are compared like for like.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from loraswitch.generate import Generation

_DECISION_KEYS = ("adapter", "confidence", "scores", "reason")
_PART_RE = re.compile(r"^\s*(\d{1,2})[.)]\s+(.+?)\s*$")


def split_parts(prompt: str) -> list[str] | None:
    """The numbered parts of a multi-part prompt (numbered 1..n in order), else None."""
    parts: list[str] = []
    for line in prompt.splitlines():
        m = _PART_RE.match(line)
        if m and int(m.group(1)) == len(parts) + 1:
            parts.append(m.group(2))
    return parts if len(parts) >= 2 else None


def part_budget(max_new_tokens: int, n_parts: int) -> int:
    """New tokens each part may write: the request's budget shared equally (at least 8)."""
    return max(8, max_new_tokens // n_parts)


def separator(k: int) -> str:
    """The text written before part k's answer (1-based): "1. ", then "\\n2. ", ..."""
    return f"{k}. " if k == 1 else f"\n{k}. "


def separator_ids(tokenizer, k: int) -> list[int]:
    """Token ids of `separator(k)`: what the assembled answer holds before part k's tokens."""
    return tokenizer(separator(k), add_special_tokens=False)["input_ids"]


@dataclass
class PartAnswer:
    """One part's answer as its row produced it."""

    text: str
    token_ids: list[int]
    trace: list[dict] = field(default_factory=list)  # one entry per token (may be empty: no trace asked)
    routing: dict = field(default_factory=dict)  # the part's decision: adapter, confidence, reason...
    finish_reason: str = "stop"

    @classmethod
    def of(cls, gen: Generation) -> PartAnswer:
        return cls(gen.text, list(gen.token_ids), gen.trace[: len(gen.token_ids)], gen.routing, gen.finish_reason)


def assemble(tokenizer, parts: list[PartAnswer], router: str, prompt_ids: list[int] | None = None) -> Generation:
    """One numbered answer from the parts' answers: text, token ids (separators included, so the
    ids decode to the text), a per-token trace with `part`, and a switch event per part. Part
    texts are kept as written (not stripped) so a stream of the parts adds up to the answer."""
    out = Generation(prompt_ids=list(prompt_ids or []), finish_reason="stop")
    texts: list[str] = []
    for k, part in enumerate(parts, 1):
        sep, sep_ids = separator(k), separator_ids(tokenizer, k)
        d = part.routing
        out.events.append({"token_index": len(out.token_ids), "event": "switch", "part": k,
                           "adapter": d.get("adapter"), "confidence": round(float(d.get("confidence", 1.0)), 4),
                           **({"reason": d["reason"]} if d.get("reason") else {})})
        for t in sep_ids:
            out.trace.append({"token_id": t, "token": tokenizer.decode([t]), "adapters": {}, "part": k, "separator": True})
        out.trace += [{**e, "part": k} for e in part.trace]
        out.token_ids += sep_ids + part.token_ids
        texts.append(sep + part.text)
        if part.finish_reason != "stop":
            out.finish_reason = part.finish_reason
    out.text = "".join(texts)
    decisions = [p.routing for p in parts]
    out.routing = {"router": decisions[0].get("router", router) if decisions else router, "adapter": [d.get("adapter") for d in decisions],
                   "confidence": round(min(float(d.get("confidence", 1.0)) for d in decisions), 4),
                   "parts": [{k: d[k] for k in _DECISION_KEYS if k in d} for d in decisions], "fan_out": len(parts)}
    return out


@dataclass
class FanOut:
    """Prompts expanded into rows: a multi-part prompt becomes one row per part."""

    rows: list[str]  # the text each row answers
    groups: list[list[int]]  # per prompt: its rows (several: it is answered part by part)

    @property
    def composite(self) -> list[bool]:
        """Per prompt: answered part by part (a multi-part prompt has at least two parts)."""
        return [len(g) > 1 for g in self.groups]

    def budgets(self, max_new_tokens: int) -> list[int]:
        """Each row's max new tokens: a part gets its share of its prompt's budget."""
        out = [max_new_tokens] * len(self.rows)
        for rows in self.groups:
            for r in rows:
                out[r] = part_budget(max_new_tokens, len(rows)) if len(rows) > 1 else max_new_tokens
        return out

    @classmethod
    def of(cls, prompts: list[str], enabled: bool = True) -> FanOut:
        rows: list[str] = []
        groups: list[list[int]] = []
        for p in prompts:
            todo = (split_parts(p) if enabled else None) or [p]
            groups.append(list(range(len(rows), len(rows) + len(todo))))
            rows += todo
        return cls(rows, groups)

    def gather(self, tokenizer, gens: list[Generation], router: str, prompt_ids: list[list[int]]) -> list[Generation]:
        """The rows' generations folded back into one per prompt."""
        out = []
        for rows, ids in zip(self.groups, prompt_ids):
            if len(rows) > 1:
                out.append(assemble(tokenizer, [PartAnswer.of(gens[r]) for r in rows], router, ids))
            else:
                out.append(gens[rows[0]])
        return out
