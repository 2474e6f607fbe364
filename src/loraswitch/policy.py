"""What a generation is asked for and what it gives back: the sampling settings, the answer
(`Generation`), how its rows route (`Policy`, and `RowsPolicy` joining several over row ranges),
and who follows it (`Listener`). `generate` runs them; routers and the switch build on them.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import torch

from loraswitch.decode import Choice
from loraswitch.engine import Engine
from loraswitch.layers import DynamicRouter

NO_ADAPTER: Choice = ([-1], [1.0])


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off; k: sample among the k likeliest tokens
    min_p: float = 0.0  # 0: off; drop tokens less likely than min_p x the likeliest's probability
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token the answer holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the answer
    repetition_penalty: float = 1.0  # vLLM's / transformers': logits of prompt and answer tokens divided by it (> 0: x it)
    seed: int | None = None
    stop_ids: set[int] | None = None  # default: the model's end-of-turn / eos tokens
    logprobs: int | None = None  # None: none; k: each new token's log-probability and the k likeliest
    echo: bool = False  # also the prompt tokens' log-probabilities (the prefill keeps every position's logits)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


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
    stop_reason: str | None = None  # the stop string that ended the answer (vLLM's field); None otherwise


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


class NamedPolicy(FixedPolicy):
    """One adapter per row, named by the caller (None = no adapter). Its summary has the keys a
    router's decision has, so `answer.routing["adapter"]` reads the same whoever chose."""

    def __init__(self, engine: Engine, names: list[str | None]):
        self.names = names
        super().__init__([NO_ADAPTER if n is None else ([engine.slot_of(n)], [1.0]) for n in names])

    def summary(self, engine: Engine, row: int) -> dict:
        return {"router": None, "adapter": self.names[row], "confidence": 1.0}


def explicit(engine: Engine, names: list[str | None]) -> FixedPolicy:
    """One adapter per row by name (None / "base" = no adapter)."""
    return NamedPolicy(engine, [None if n in (None, "base") else n for n in names])


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

    def add(self, policy: Policy, n_rows: int) -> None:
        """Rows [self.n_rows, self.n_rows + n_rows), routed by `policy` (as its rows 0, 1, ...),
        join the batch: requests that arrived while it decodes (continuous batching). Only
        static policies: a dynamic one needs the forward to itself."""
        if n_rows < 1:
            raise ValueError("a part needs at least one row")
        if policy.dynamic is not None or self.dynamic is not None:
            raise ValueError("a policy with per-layer (dynamic) routing must have the forward to itself")
        self.parts.append(policy)
        self.offsets.append(self.n_rows)
        self.n_rows += n_rows
        self.ends.append(self.n_rows)

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


class Listener:
    """Follows a generation as it happens: `token` after each token a row appends (return a finish
    reason such as "stop" or "cancelled" to end that row now), `finished` once per row as it leaves
    the batch, with its `Generation` complete. Rows end independently; the batch goes on."""

    def token(self, row: int, gen: Generation) -> str | None:
        return None

    def finished(self, row: int, gen: Generation) -> None:
        """Row `row` is done: `gen` has its text, finish_reason, trace, events and routing."""

