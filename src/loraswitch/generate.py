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

Continuous batching: with `admit`, rows also *join* a running batch between its steps (requests
that arrived while it decodes), so the batch stays full under sustained load instead of draining
before the next one starts. A joining group is prefilled on its own cache, `prefill_chunk`
positions per decode step of the running rows (chunked prefill: a long prompt delays each running
row's next token by one chunk's forward, not by its whole prefill), then its cache is merged into
the running one (`EagerStepper.join`, or `StaticStepper.join` on the compiled step). A row's
tokens do not depend on whether it joined: its positions are its own and padding is masked.
Up to `JOINING_GROUPS` groups are prefilled at once, so a short prompt that arrives while a long
one is being read is not held behind it; and a first batch longer than a chunk is itself read as
a joining group (into an empty batch), so what arrives during its prefill is admitted between its
chunks instead of after all of it (vLLM's chunked prefill does the same with a token budget).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraswitch.decode import EagerStepper, StaticStepper, buckets, join_into, stepper_for
from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.padding import left_pad
from loraswitch.policy import (
    NO_ADAPTER,
    Choice,
    FixedPolicy,
    Generation,
    Listener,
    Policy,
    RowsPolicy,
    SamplingParams,
    TokenLogprob,
    explicit,
)

__all__ = ["NO_ADAPTER", "Choice", "FixedPolicy", "Generation", "Joining", "Listener", "MIN_TEMPERATURE", "Policy",
           "RowsPolicy", "SamplingParams", "TokenLogprob", "explicit", "generate", "warm_up"]

# prompt positions a joining group prefills per decode step of the running rows. A 1024-token
# prompt joining 8 decoding rows (benchmarks/chunked_prefill.py, docs/benchmarks.md): 256 cut their
# longest stall 2.5x against one forward, at ~1.2x the joined row's first-token time and the same
# tokens/s; 64 cut it 3.5x but took 2.7x the first-token time and 20% of the running rows' tokens/s
PREFILL_CHUNK = 256
# joining groups prefilled at once: the running rows wait for one chunk of each per step, so more
# would lengthen their stall; two let a short prompt pass a long one whose prefill is under way
JOINING_GROUPS = 2


@dataclass
class Joining:
    """Rows that join a running `generate` (continuous batching): their prompts, the static policy
    that routes them (they are its rows 0, 1, ...) and their token limit, which may exceed the
    running batch's (the listener still ends each row at its own)."""

    prompts: list[list[int]]
    policy: Policy
    max_new_tokens: int


# Called between decode steps with the rows the batch holds (decoding and being prefilled): rows
# to join it, or None. Whoever passes it owns the listener and extends it for the rows it hands in.
Admit = Callable[[int], Joining | None]


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


def seed32(seed: int) -> int:
    """The seed torch's generator is given. Its CPU generator keeps only the low 32 bits, so 0,
    2**32 and -2**63 drew the same tokens: a seed outside [0, 2**32) is hashed into that range
    (seeds inside it are used as they are)."""
    if 0 <= seed < 2**32:
        return seed
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "little")


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """The next tokens: the argmax, or a draw at `temperature` among the tokens top_k, min_p and
    top_p keep (in that order, as vLLM applies them)."""
    if params.temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if 0 < params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, -1).values[..., -1:]
        probs = torch.where(probs < kth, 0.0, probs)
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0, probs)
    if params.top_p < 1.0:
        probs = probs / probs.sum(-1, keepdim=True)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _penalized(logits: torch.Tensor, answers: list[Generation], params: SamplingParams) -> torch.Tensor:
    """The logits with the repetition penalties applied, row by row, as vLLM applies them:
    presence and frequency penalties over the answer's tokens so far, the repetition penalty
    over the prompt's and the answer's (a positive logit divided by it, a negative one
    multiplied). Logprobs are still reported from the model's own logits."""
    out = logits.float().clone()
    vocab = out.shape[-1]
    for b, res in enumerate(answers):
        if (params.presence_penalty or params.frequency_penalty) and res.token_ids:
            counts = torch.bincount(torch.tensor(res.token_ids), minlength=vocab)[:vocab].to(out.dtype)
            out[b] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(t for t in {*res.prompt_ids, *res.token_ids} if 0 <= t < vocab), dtype=torch.long)
            values = out[b, seen]
            out[b, seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    return out


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


class _Rows:
    """One `generate` call's rows: their answers and limits, the batch order of those still
    decoding, and the sampling of each step (stop tokens, policy feeds, the listener)."""

    def __init__(self, engine: Engine, policy: Policy, params: SamplingParams, listener: Listener):
        self.engine, self.policy, self.params, self.listener = engine, policy, params, listener
        self.stop = params.stop_ids if params.stop_ids is not None else engine.base.stop_ids
        self.gen = torch.Generator().manual_seed(seed32(params.seed)) if params.seed is not None else None
        self.results: list[Generation] = []
        self.limit: list[int] = []  # answer tokens each row may give
        self.budget: list[int] = []  # forwards each row may take: its limit plus its policy's extra steps
        self.taken: list[int] = []
        self.last_choice: list = []  # the routing of the forward that produced each row's logits
        self.live: list[int] = []  # batch position -> row

    def add(self, prompts: list[list[int]], policy: Policy, max_new_tokens: int) -> list[int]:
        """Rows for `prompts`, routed by `policy` (started already) as its rows 0, 1, ..."""
        first = len(self.results)
        self.results += [Generation(prompt_ids=list(p)) for p in prompts]
        self.limit += [max_new_tokens] * len(prompts)
        self.budget += [max_new_tokens + policy.extra_steps()] * len(prompts)
        self.taken += [0] * len(prompts)
        self.last_choice += [policy.prompt_choice(i, p) for i, p in enumerate(prompts)]
        return list(range(first, len(self.results)))

    def end(self, row: int, reason: str) -> None:
        _finish(self.engine, self.policy, row, self.results[row], reason)
        self.listener.finished(row, self.results[row])

    def sample(self, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Sample the live rows' next tokens and take them in: (batch positions that go on, the
        tokens they feed next). Rows that stop, reach their limit or that the listener ends
        finish here."""
        params, policy, engine = self.params, self.policy, self.engine
        logits, broken = _finite_rows(logits)
        chosen_from = _penalized(logits, [self.results[r] for r in self.live], params) if params.penalized else logits
        tokens = _sample(chosen_from, params, self.gen).tolist()
        logp = torch.log_softmax(logits.float(), -1) if params.logprobs is not None else None
        keep = []
        for b, row in enumerate(self.live):
            res = self.results[row]
            self.taken[row] += 1
            if b in broken:  # this row's logits are NaN / inf: it fails alone, the others go on
                self.end(row, "error")
                continue
            tok, shown = policy.feed(row, res.token_ids, tokens[b], tokens[b] in self.stop)
            tokens[b] = tok
            reason = None
            if shown:  # a token kept out of the answer is still read into the cache
                res.trace.append({"token_id": tok, **policy.trace_entry(engine, row, _label(self.last_choice[row]))})
                if tok in self.stop:
                    self.end(row, "stop")
                    continue
                res.token_ids.append(tok)
                if logp is not None:
                    res.logprobs.append(_logprob(logp[b], tok, params.logprobs or 0))
                reason = self.listener.token(row, res)
                if reason is None and len(res.token_ids) >= self.limit[row]:
                    reason = "length"
            if reason is None and self.taken[row] >= self.budget[row]:
                reason = "length"
            if reason is None:
                keep.append(b)
            else:
                self.end(row, reason)
        return keep, [tokens[b] for b in keep]

    def choices(self) -> list[Choice]:
        """The live rows' routing for the next step (remembered for their trace)."""
        out = [self.policy.step_choice(row, self.results[row].token_ids) for row in self.live]
        for row, c in zip(self.live, out):
            self.last_choice[row] = c
        self.policy.on_forward(list(self.live), 1)
        return out


class _Joiner:
    """A group of rows joining the running batch: prefilled on a cache of its own, one chunk of
    positions per call to `advance`, through the same prefill as any batch (prefix cache included)."""

    def __init__(self, engine: Engine, joining: Joining, rows: list[int], chunk: int):
        self.rows = rows
        self.stepper = EagerStepper(engine, left_pad(joining.prompts, engine.base.tokenizer.pad_token_id or 0))
        width = self.stepper.width
        joining.policy.on_forward(list(range(len(rows))), width)
        routing = _prefill_routing(joining.policy, joining.prompts, width)
        self.chunks = self.stepper.prefill_chunks(routing, None, 1, chunk)
        self.left = -(-width // chunk)  # chunks to go (fewer on a prefix cache hit)

    def advance(self) -> torch.Tensor | None:
        """Prefill the next chunk: the rows' first logits once their prompts are all read."""
        self.left -= 1
        out = next(self.chunks)
        return None if out is None else out.logits[:, -1]


@torch.inference_mode()
def generate(engine: Engine, prompts: list[list[int]], policy: Policy | None = None, params: SamplingParams | None = None,
             listener: Listener | None = None, admit: Admit | None = None,
             prefill_chunk: int = PREFILL_CHUNK) -> list[Generation]:
    """Generate for a batch of token-id prompts under `policy` (default: base model only).
    `listener` sees every token as it lands and each row as it ends. `admit` (see `Admit`) lets
    rows join between steps (module doc), on the eager and the compiled step alike; it is not
    consulted where joining is not safe: a per-layer router, echo, or a seed (its answer must not
    depend on what else is in flight). Returns every row's answer, joined rows after the first ones."""
    policy = policy or Policy()
    params = params or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    joins = admit is not None and policy.dynamic is None and not params.echo and params.seed is None
    if joins and not isinstance(policy, RowsPolicy):
        policy = RowsPolicy([(policy, 0)], len(prompts))
    rows = _Rows(engine, policy, params, listener or Listener())
    with engine.pin():
        policy.start(engine, prompts)
        first_rows = rows.add(prompts, policy, params.max_new_tokens)
        batch = left_pad(prompts, engine.base.tokenizer.pad_token_id or 0)
        stepper = stepper_for(engine, batch, params.max_new_tokens + policy.extra_steps(), policy.dynamic)
        admit = admit if joins else None
        joiners: list[_Joiner] = []
        logits = None
        if admit is not None and batch.width > prefill_chunk and params.max_new_tokens > 0:
            # read in chunks as a group joining an empty batch: arrivals are admitted between them
            joiners.append(_Joiner(engine, Joining(prompts, policy, params.max_new_tokens), first_rows, prefill_chunk))
        else:
            rows.live = first_rows
            logits = _prefill(policy, prompts, stepper, params, rows.results)
            if rows.budget[0] <= 0:  # max_new_tokens=0: nothing to generate
                for row in rows.live:
                    rows.end(row, "length")
                rows.live = []
        while True:
            keep, tokens = rows.sample(logits) if rows.live else ([], [])
            if len(keep) < len(rows.live):
                stepper.select(keep)
                rows.live = [rows.live[b] for b in keep]
                if admit is not None and rows.live:  # a batch rows join: drop what only leavers used
                    stepper.trim()
            if admit is not None and len(joiners) < JOINING_GROUPS:
                held = len(rows.live) + sum(len(j.rows) for j in joiners)
                joiner = _join(engine, policy, rows, admit(held), prefill_chunk)
                joiners += [joiner] if joiner is not None else []
            if not rows.live and not joiners:
                break
            logits = stepper.step(tokens, rows.choices(), policy.dynamic) if rows.live else None
            for joiner in sorted(joiners, key=lambda j: j.left):  # a chunk of each, the nearest done first
                first = joiner.advance()
                if first is not None:
                    steps = max(rows.budget[r] - rows.taken[r] for r in rows.live + joiner.rows)
                    stepper = join_into(stepper, joiner.stepper, bool(rows.live), steps)
                    rows.live += joiner.rows
                    logits = first if logits is None else torch.cat([logits, first])
                    joiners.remove(joiner)
    return rows.results


class _OneStep(Listener):
    """Ends each row after its second token: the prefill gives the first, one decode step the second."""

    def token(self, row: int, gen: Generation) -> str | None:
        return "length" if len(gen.token_ids) >= 2 else None


def warm_up(engine: Engine, context: int = 0) -> dict[tuple[int, int, int], float]:
    """Compile the decode step's graphs before a request waits on them (a minute or more each on
    a CPU, and every row of a batch waits with it): one row and two rows (which serves every
    larger batch, `static`), each with the first adapter routed and with none, for every cache
    length bucket up to the one that holds `context` positions (prompt plus answer; 0: the
    shortest bucket only); without CUDA graphs the first bucket's graphs serve every other, with
    them the second bucket's every longer one (`static.Decoder.covers`). With CUDA graphs one
    row runs in two slots (`static.slot_rows`), so the one-row pass reuses the two-row graphs.
    A server calls it at start with `--compile` (`--compile-context`). Afterwards the decoder is
    frozen: a batch of a bucket not covered decodes on the eager loop, and a step shape not
    compiled (more choices per token) runs uncompiled, the same tokens more slowly, rather than
    stopping every row of its batch for a compile (`engine.decoder.frozen = False` compiles on
    first use again). Returns the decoder's first call per (rows, cache length, choices) in
    seconds; {} where nothing compiles."""
    if not engine.compile:
        return {}
    if engine.decoder is not None:
        engine.decoder.frozen = False
    prompt = [1, 2, 3]
    choices = [NO_ADAPTER] + ([([engine.slot_of(engine.names[0])], [1.0])] if engine.names else [])
    for length in buckets(context):
        params = SamplingParams(max_new_tokens=length - len(prompt), stop_ids=set())  # sizes the cache: `length`
        for rows in (1, 2):
            for choice in choices:
                generate(engine, [prompt] * rows, FixedPolicy([choice] * rows), params, _OneStep())
    if engine.decoder is None:
        return {}
    engine.decoder.frozen = True
    return dict(engine.decoder.compile_s)


def _join(engine: Engine, policy: RowsPolicy, rows: _Rows, joining: Joining | None, chunk: int) -> _Joiner | None:
    """Start prefilling the rows `admit` handed in, if any, as new rows of `policy`."""
    if joining is None or not joining.prompts:
        return None
    if any(len(p) == 0 for p in joining.prompts) or joining.max_new_tokens < 1:
        raise ValueError("joining rows need a prompt token and at least one new token each")
    joining.policy.start(engine, joining.prompts)
    policy.add(joining.policy, len(joining.prompts))
    new = rows.add(joining.prompts, joining.policy, joining.max_new_tokens)
    return _Joiner(engine, joining, new, max(1, chunk))


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
