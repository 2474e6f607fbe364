"""Batched generation with the KV cache kept, where every row routes its own way.

A `Policy` (explicit choice or any router) says, per row, which adapters and weights apply to
each prompt token and then to each new token; the loop packs those into one `Routing` per
forward pass, so rows of one batch can use different adapters, or switch adapters mid-answer,
and still share every matmul. Finished rows leave the batch (the cache shrinks with them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.layers import DynamicRouter

Choice = tuple[list[int], list[float]]  # adapter slots and their weights for one token; -1 = none
NO_ADAPTER: Choice = ([-1], [1.0])


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] | None = None  # default: the model's end-of-turn / eos tokens


@dataclass
class Generation:
    """One row's result. `trace` has one entry per generated token: which adapters produced it."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" when a stop token ended it
    trace: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # routing decisions and switches
    routing: dict = field(default_factory=dict)  # the policy's summary (router, confidence...)


class Policy:
    """How a batch routes. Subclasses (routers) override `start`, `prompt_choice`, `step_choice`.

    `dynamic`, when set, is consulted by every layer with its own input instead (Arrow, gates);
    then the static choices only label the trace.
    """

    dynamic: DynamicRouter | None = None

    def start(self, engine: Engine, prompts: list[list[int]]) -> None:
        """Called once before prefill (a sequence-level router decides here)."""

    def prompt_choice(self, row: int, prompt: list[int]) -> Choice | tuple[torch.Tensor, torch.Tensor]:
        """Routing for row `row`'s prompt tokens: one Choice for all, or per-token [S, k] tensors."""
        return NO_ADAPTER

    def step_choice(self, row: int, generated: list[int]) -> Choice:
        """Routing for the forward pass that consumes `generated[-1]` and predicts the next token."""
        return NO_ADAPTER

    def override(self, row: int, generated: list[int], token: int) -> int:
        """The token row `row` actually emits given the sampled `token`: structured policies
        (answering a multi-part prompt part by part) force separators and part numbers here."""
        return token

    def on_forward(self, rows: list[int], tokens_per_row: int) -> None:
        """Called before each forward pass with the rows in batch order (token-level routers
        use it to map their per-token records back to rows)."""

    def trace_entry(self, engine: Engine, row: int, choice: Choice) -> dict:
        return {"adapters": _named(engine, choice)}

    def summary(self, engine: Engine, row: int) -> dict:
        return {}

    def events(self, row: int) -> list[dict]:
        return []


class FixedPolicy(Policy):
    """Every token of row i uses `choices[i]`: explicit adapter choice, or a sequence-level pick."""

    def __init__(self, choices: list[Choice]):
        self.choices = choices

    def prompt_choice(self, row: int, prompt: list[int]) -> Choice:
        return self.choices[row]

    def step_choice(self, row: int, generated: list[int]) -> Choice:
        return self.choices[row]


def explicit(engine: Engine, names: list[str | None]) -> FixedPolicy:
    """One adapter per row by name (None / "base" = no adapter)."""
    return FixedPolicy([NO_ADAPTER if n in (None, "base") else ([engine.slot_of(n)], [1.0]) for n in names])


def _named(engine: Engine, choice: Choice) -> dict[str, float]:
    out: dict[str, float] = {}
    for slot, w in zip(*choice):
        if slot >= 0 and w != 0:
            name = engine.name_of(slot) or f"slot{slot}"
            out[name] = round(out.get(name, 0.0) + float(w), 4)
    return out


def _pack(choices: list[Choice], lengths: list[int]) -> Routing:
    """Rows' choices -> one Routing over the flattened [rows, length] tokens."""
    k = max(len(c[0]) for c in choices)
    ids, ws = [], []
    for (slots, weights), n in zip(choices, lengths):
        pad = k - len(slots)
        ids.append(torch.tensor(slots + [-1] * pad, dtype=torch.long).expand(n, k))
        ws.append(torch.tensor(weights + [0.0] * pad).expand(n, k))
    return Routing(torch.cat(ids), torch.cat(ws))


def _prefill_routing(policy: Policy, prompts: list[list[int]], width: int) -> Routing:
    ids, ws = [], []
    per_token = []
    for i, p in enumerate(prompts):
        c = policy.prompt_choice(i, p)
        if isinstance(c[0], torch.Tensor):
            per_token.append((c[0], c[1]))
        else:
            n = len(p)
            per_token.append((torch.tensor(c[0], dtype=torch.long).expand(n, len(c[0])), torch.tensor(c[1]).expand(n, len(c[1]))))
    k = max(t[0].shape[1] for t in per_token)
    for (pid, pw), p in zip(per_token, prompts):
        pad = width - len(p)
        i = torch.full((width, k), -1, dtype=torch.long)
        w = torch.zeros(width, k)
        i[pad:, : pid.shape[1]] = pid
        w[pad:, : pw.shape[1]] = pw.to(w.dtype)
        ids.append(i)
        ws.append(w)
    return Routing(torch.cat(ids), torch.cat(ws))


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    if params.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


TokenCallback = Callable[[int, int, dict], None]  # (row, token id, trace entry) as each token lands


@torch.inference_mode()
def generate(
    engine: Engine,
    prompts: list[list[int]],
    policy: Policy | None = None,
    params: SamplingParams | None = None,
    on_token: TokenCallback | None = None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts under `policy` (default: base model only).
    `on_token` is called for every generated (non-stop) token, for streaming."""
    policy = policy or Policy()
    params = params or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stop = params.stop_ids if params.stop_ids is not None else engine.base.eos_ids
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    results = [Generation(prompt_ids=list(p)) for p in prompts]
    pad_id = engine.base.tokenizer.pad_token_id or 0
    device = next(engine.model.parameters()).device

    with engine.pin():
        policy.start(engine, prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        live = list(range(len(prompts)))  # batch position -> row
        routing = _prefill_routing(policy, prompts, width)
        last_choice = [policy.prompt_choice(i, p) for i, p in enumerate(prompts)]
        policy.on_forward(list(live), width)
        with engine.routed(routing, policy.dynamic):
            out = engine.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
        next_pos = positions[:, -1] + 1
        for _ in range(params.max_new_tokens):
            tokens = _sample(out.logits[:, -1], params, gen).tolist()
            keep = []
            for b, row in enumerate(live):
                res = results[row]
                tok = tokens[b] = policy.override(row, res.token_ids, tokens[b])
                choice = last_choice[row]
                if isinstance(choice[0], torch.Tensor):  # per-token prompt routing: label by last token
                    choice = (choice[0][-1].tolist(), choice[1][-1].tolist())
                entry = {"token_id": tok, **policy.trace_entry(engine, row, choice)}
                res.trace.append(entry)
                if tok in stop:
                    res.finish_reason = "stop"
                    continue
                res.token_ids.append(tok)
                if on_token is not None:
                    on_token(row, tok, entry)
                if len(res.token_ids) < params.max_new_tokens:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(live):
                idx = torch.tensor(keep)
                cache.batch_select_indices(idx.to(device))
                mask, next_pos = mask[idx], next_pos[idx]
                live = [live[b] for b in keep]
                tokens = [tokens[b] for b in keep]
            choices = [policy.step_choice(row, results[row].token_ids) for row in live]
            for row, c in zip(live, choices):
                last_choice[row] = c
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=torch.long)], dim=1)
            policy.on_forward(list(live), 1)
            with engine.routed(_pack(choices, [1] * len(live)), policy.dynamic):
                out = engine.model(
                    input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask.to(device),
                    position_ids=next_pos[:, None].to(device), past_key_values=cache, use_cache=True,
                )
            next_pos = next_pos + 1

    tok = engine.base.tokenizer
    for i, res in enumerate(results):
        res.text = tok.decode(res.token_ids, skip_special_tokens=True)
        pieces = tok.convert_ids_to_tokens([t["token_id"] for t in res.trace])
        for entry, piece in zip(res.trace, pieces):
            entry["token"] = tok.convert_tokens_to_string([piece]) if piece is not None else ""
        res.events = policy.events(i)
        res.routing = policy.summary(engine, i)
    return results
