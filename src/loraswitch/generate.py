"""Batched generation with the KV cache kept, where every row routes its own way.

A `Policy` (explicit choice or any router) says, per row, which adapters and weights apply to
each prompt token and then to each new token; the loop packs those into one `Routing` per
forward pass, so rows of one batch can use different adapters, or switch adapters mid-answer,
and still share every matmul. Finished rows leave the batch (the cache shrinks with them).
`RowsPolicy` lets requests that asked for different things (explicit adapters, a router's
decisions, parts of one prompt) share one forward. A `Listener` follows every row as it decodes
(streaming, per-row limits, cancellation) and may end a row early. With `logprobs` / `echo` the
result carries the log-probabilities of the generated (and prompt) tokens, as evaluation clients
need them.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import torch

from loraswitch.decode import EagerStepper, StaticStepper, stepper_for
from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.layers import DynamicRouter
from loraswitch.padding import left_pad

Choice = tuple[list[int], list[float]]  # adapter slots and their weights for one token; -1 = none
NO_ADAPTER: Choice = ([-1], [1.0])


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] | None = None  # default: the model's end-of-turn / eos tokens
    logprobs: int | None = None  # None: none; k: each new token's log-probability and the k likeliest
    echo: bool = False  # also the prompt tokens' log-probabilities (the prefill keeps every position's logits)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the distribution it was sampled from (the model's, before
    temperature and top_p), and the `top` most likely tokens there as (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Generation:
    """One answer: a row's result, or a multi-part answer assembled from several rows. `trace`
    has one entry per generated token: which adapters produced it."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" when a stop token ended it; "error": its logits were not finite
    trace: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # routing decisions and switches
    routing: dict = field(default_factory=dict)  # the policy's summary (router, confidence...)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, with `params.logprobs`
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # with `params.echo`; None: first token


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

    def on_forward(self, rows: list[int], tokens_per_row: int) -> None:
        """Called before each forward pass with the rows in batch order (token-level routers
        use it to map their per-token records back to rows)."""

    def feed(self, row: int, generated: list[int], token: int, stops: bool) -> tuple[int, bool]:
        """(the token row `row` goes on with in place of the sampled `token`, which `stops` the
        row if kept; whether it belongs to the answer). A token kept out of the answer is still
        read into the KV cache: it lets a policy go on past a stop and feed a cue in the same
        pass (`routing.cues`)."""
        return token, True

    def extra_steps(self) -> int:
        """Forward steps beyond `max_new_tokens` this policy may feed (tokens kept out of the
        answer, `feed`), known after `start`."""
        return 0

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


class RowsPolicy(Policy):
    """One policy made of several, so requests that asked for different things (explicit
    adapters, a sequence-level router's decisions, parts of one prompt) share one batched forward:
    part i, at `parts[i] = (policy, offset)`, owns rows [offset_i, offset_{i+1}) and sees them as
    rows 0, 1, ... Every per-row hook is delegated to the owner with the row renumbered.

    A policy with per-layer routing (`dynamic`: Arrow, learned gates) is consulted by every layer
    for *every* token of the forward, so it cannot share one: that combination is refused, and
    such a policy gets a `generate` call of its own.
    """

    def __init__(self, parts: list[tuple[Policy, int]], n_rows: int):
        if not parts:
            raise ValueError("RowsPolicy needs at least one part")
        offsets = [off for _, off in parts]
        if offsets[0] != 0 or offsets != sorted(set(offsets)) or offsets[-1] >= n_rows:
            raise ValueError(f"part offsets {offsets} must start at 0, increase, and stay below {n_rows} rows")
        self.parts = [p for p, _ in parts]
        self.offsets = offsets
        self.ends = offsets[1:] + [n_rows]
        self.n_rows = n_rows
        dynamic = [p for p in self.parts if p.dynamic is not None]
        if dynamic and len(self.parts) > 1:
            raise ValueError("a policy with per-layer (dynamic) routing must have the forward to itself")
        self.dynamic = dynamic[0].dynamic if dynamic else None

    def locate(self, row: int) -> tuple[Policy, int]:
        """(the policy owning `row`, the row's index inside that policy)."""
        i = bisect_right(self.offsets, row) - 1
        if i < 0 or row >= self.n_rows:
            raise IndexError(f"row {row} outside the batch of {self.n_rows}")
        return self.parts[i], row - self.offsets[i]

    def start(self, engine: Engine, prompts: list[list[int]]) -> None:
        for p, lo, hi in zip(self.parts, self.offsets, self.ends):
            p.start(engine, prompts[lo:hi])

    def prompt_choice(self, row: int, prompt: list[int]):
        p, r = self.locate(row)
        return p.prompt_choice(r, prompt)

    def step_choice(self, row: int, generated: list[int]) -> Choice:
        p, r = self.locate(row)
        return p.step_choice(r, generated)

    def feed(self, row: int, generated: list[int], token: int, stops: bool) -> tuple[int, bool]:
        p, r = self.locate(row)
        return p.feed(r, generated, token, stops)

    def extra_steps(self) -> int:
        return max(p.extra_steps() for p in self.parts)

    def on_forward(self, rows: list[int], tokens_per_row: int) -> None:
        # a dynamic policy is the only part (offset 0), so it sees the batch order unchanged
        for p, lo, hi in zip(self.parts, self.offsets, self.ends):
            p.on_forward([r - lo for r in rows if lo <= r < hi], tokens_per_row)

    def trace_entry(self, engine: Engine, row: int, choice: Choice) -> dict:
        p, r = self.locate(row)
        return p.trace_entry(engine, r, choice)

    def summary(self, engine: Engine, row: int) -> dict:
        p, r = self.locate(row)
        return p.summary(engine, r)

    def events(self, row: int) -> list[dict]:
        p, r = self.locate(row)
        return p.events(r)


def _named(engine: Engine, choice: Choice) -> dict[str, float]:
    out: dict[str, float] = {}
    for slot, w in zip(*choice):
        if slot >= 0 and w != 0:
            name = engine.name_of(slot) or f"slot{slot}"
            out[name] = round(out.get(name, 0.0) + float(w), 4)
    return out


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


# Below this temperature sampling is greedy: dividing logits by it overflows to inf (1e-40 did),
# and the distribution is already a point mass on the argmax.
MIN_TEMPERATURE = 1e-5


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    if params.temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class Listener:
    """Follows a generation as it happens: `token` after each token a row appends (return a finish
    reason such as "stop" or "cancelled" to end that row now), `finished` once per row as it leaves
    the batch, with its `Generation` complete. Rows end independently; the batch goes on."""

    def token(self, row: int, gen: Generation) -> str | None:
        return None

    def finished(self, row: int, gen: Generation) -> None:
        """Row `row` is done: `gen` has its text, finish_reason, trace, events and routing."""


def _logprob(logp: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry from one position's log-softmax, with the `k` likeliest tokens."""
    top = ()
    if k > 0:
        values, ids = logp.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(int(token), float(logp[token]), top)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it, from the prefill logits of one
    left-padded row ([width, vocab]); the first token has no context (None, as in the OpenAI API)."""
    n = len(prompt)
    logp = torch.log_softmax(logits[logits.shape[0] - n : -1].float(), -1)
    return [None] + [_logprob(logp[j], prompt[j + 1], k) for j in range(n - 1)]


def _prefill(policy: Policy, prompts: list[list[int]], stepper: EagerStepper | StaticStepper, params: SamplingParams,
             results: list[Generation]) -> torch.Tensor:
    """The prompts' forward (left-padded): the last position's logits. With `echo`, every
    position's logits give the prompt logprobs."""
    policy.on_forward(list(range(len(prompts))), stepper.width)
    out = stepper.prefill(_prefill_routing(policy, prompts, stepper.width), policy.dynamic, 0 if params.echo else 1)
    if params.echo:
        for i, p in enumerate(prompts):
            results[i].prompt_logprobs = _prompt_logprobs(out.logits[i], p, params.logprobs or 0)
    return out.logits[:, -1]


def _finish(engine: Engine, policy: Policy, row: int, res: Generation, reason: str) -> None:
    res.finish_reason = reason
    tok = engine.base.tokenizer
    res.text = tok.decode(res.token_ids, skip_special_tokens=True)
    pieces = tok.convert_ids_to_tokens([t["token_id"] for t in res.trace])
    for entry, piece in zip(res.trace, pieces):
        entry["token"] = tok.convert_tokens_to_string([piece]) if piece is not None else ""
    res.events = policy.events(row)
    res.routing = policy.summary(engine, row)


@torch.inference_mode()
def generate(
    engine: Engine,
    prompts: list[list[int]],
    policy: Policy | None = None,
    params: SamplingParams | None = None,
    listener: Listener | None = None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts under `policy` (default: base model only).
    `listener` sees every token as it lands and each row as it ends."""
    policy = policy or Policy()
    params = params or SamplingParams()
    listener = listener or Listener()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    stop = params.stop_ids if params.stop_ids is not None else engine.base.stop_ids
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    results = [Generation(prompt_ids=list(p)) for p in prompts]
    k = params.logprobs or 0
    ended: set[int] = set()

    def end(row: int, reason: str) -> None:
        ended.add(row)
        _finish(engine, policy, row, results[row], reason)
        listener.finished(row, results[row])

    with engine.pin():
        policy.start(engine, prompts)
        batch = left_pad(prompts, engine.base.tokenizer.pad_token_id or 0)
        steps = params.max_new_tokens + policy.extra_steps()
        stepper = stepper_for(engine, batch, steps, policy.dynamic)
        live = list(range(len(prompts)))  # batch position -> row
        last_choice = [policy.prompt_choice(i, p) for i, p in enumerate(prompts)]
        logits = _prefill(policy, prompts, stepper, params, results)
        for _ in range(steps):
            logits, broken = _finite_rows(logits)
            tokens = _sample(logits, params, gen).tolist()
            logp = torch.log_softmax(logits.float(), -1) if params.logprobs is not None else None
            keep = []
            for b, row in enumerate(live):
                res = results[row]
                if b in broken:  # this row's logits are NaN / inf: it fails alone, the others go on
                    end(row, "error")
                    continue
                tok, shown = policy.feed(row, res.token_ids, tokens[b], tokens[b] in stop)
                tokens[b] = tok
                if not shown:  # read into the cache, not part of the answer
                    keep.append(b)
                    continue
                res.trace.append({"token_id": tok, **policy.trace_entry(engine, row, _label(last_choice[row]))})
                if tok in stop:
                    end(row, "stop")
                    continue
                res.token_ids.append(tok)
                if logp is not None:
                    res.logprobs.append(_logprob(logp[b], tok, k))
                reason = listener.token(row, res)
                if reason is None and len(res.token_ids) >= params.max_new_tokens:
                    reason = "length"
                if reason is None:
                    keep.append(b)
                else:
                    end(row, reason)
            if not keep:
                break
            if len(keep) < len(live):
                stepper.select(keep)
                live = [live[b] for b in keep]
                tokens = [tokens[b] for b in keep]
            choices = [policy.step_choice(row, results[row].token_ids) for row in live]
            for row, c in zip(live, choices):
                last_choice[row] = c
            policy.on_forward(list(live), 1)
            logits = stepper.step(tokens, choices, policy.dynamic)
        for row in live:  # max_new_tokens=0: nothing was generated
            if row not in ended:
                end(row, "length")
    return results


def _finite_rows(logits: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """(logits safe to sample from, batch positions whose logits were not all finite). A broken
    row (an adapter that overflows) must fail alone: sampling the batch with its NaNs would raise
    for every row, so its logits are zeroed and the caller ends it with finish_reason "error"."""
    if bool(torch.isfinite(logits.sum(-1)).all()):  # one pass; the full check (3 ms a step at
        return logits, set()  # batch 16) only when a row sum is not finite (NaN, inf, or overflow)
    ok = torch.isfinite(logits).all(-1)
    if bool(ok.all()):
        return logits, set()
    broken = set((~ok).nonzero().flatten().tolist())
    return torch.where(ok[:, None], logits, torch.zeros((), dtype=logits.dtype)), broken


def _label(choice):
    """The choice a trace entry names: per-token prompt routing is labelled by its last token."""
    if isinstance(choice[0], torch.Tensor):
        return (choice[0][-1].tolist(), choice[1][-1].tolist())
    return choice
