"""What a caller asks the library (`Request`, immutable), the handle it follows it by (`Handle`:
cancellation and where its events go), and the events an answer is made of.

A request's events, in order: `Started` (its first row entered a batched forward), `Token`s
(new answer text), `Switched` when the adapter writing the answer changes (its first token
included; a multi-part answer: each part), then exactly one of `Done` (the answer), `Failed`
(the request cannot be served as asked) or nothing more after a cancellation. `Switch.chat`
collects the `Done`s; the server streams the `Token`s.
"""

from __future__ import annotations

import math
import numbers
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import PurePath

from loraswitch.base import Base
from loraswitch.generate import MIN_TEMPERATURE, Generation, TokenLogprob
from loraswitch.switch.mixture import mixture_of

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


class RouterUnavailable(RuntimeError):
    """The router a request asked for cannot be built (missing, stale, or unknown)."""

    def __init__(self, route: str | None, cause: Exception):
        super().__init__(f"router {route or 'auto'!r} is unavailable: {cause}")
        self.route = route


class InvalidOutput(RuntimeError):
    """The model produced NaN / inf logits for a row (an adapter that overflows): that request
    fails alone, with this error, and the rows batched with it go on."""


def listed(values):
    """A list given as one string or path is that one item, not its characters."""
    return [values] if isinstance(values, str | PurePath) else values


MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's and vLLM's default limit)
MAX_REPETITION_PENALTY = 10.0  # beyond it every seen token is all but forbidden (typical: 1.0-1.5)
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


def _numbers(r: Request) -> None:
    """numpy and other numeric types as plain Python numbers (a whole float such as 8.0 as an int);
    a bool is no number here."""
    for name in ("max_tokens", "logprobs", "seed", "top_k"):
        value = getattr(r, name)
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
            object.__setattr__(r, name, int(value))
    for name in ("temperature", "top_p", "min_p", *PENALTIES):
        value = getattr(r, name)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            object.__setattr__(r, name, float(value))
    if r.stop is None:
        object.__setattr__(r, "stop", ())


def _check_sampling(r: Request) -> None:
    """Refuse what no decode can honour, when the request is made rather than deep in a batch
    (where a bad value surfaced as a torch error: `logprobs=100000`, `temperature=nan`)."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    _numbers(r)
    if not whole(r.max_tokens) or r.max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1 (got {r.max_tokens!r})")
    if not isinstance(r.temperature, float) or not math.isfinite(r.temperature) or r.temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (got {r.temperature!r})")
    if not isinstance(r.top_p, float) or not 0 < r.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {r.top_p!r})")
    if whole(r.top_k) and r.top_k == -1:  # vLLM's spelling of "off"
        object.__setattr__(r, "top_k", 0)
    if not whole(r.top_k) or r.top_k < 0:
        raise ValueError(f"top_k must be a whole number >= 0 (0 or -1: off; got {r.top_k!r})")
    if not isinstance(r.min_p, float) or not 0 <= r.min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (got {r.min_p!r})")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(r, name)
        if not isinstance(value, float) or not -2 <= value <= 2:
            raise ValueError(f"{name} must be a number from -2 to 2 (got {value!r})")
    if not isinstance(r.repetition_penalty, float) or not 0 < r.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1: off; got {r.repetition_penalty!r})")
    if r.logprobs is not None and (not whole(r.logprobs) or not 0 <= r.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be a whole number from 0 to {MAX_LOGPROBS} (got {r.logprobs!r})")
    if r.seed is not None and (not whole(r.seed) or not -(2**63) <= r.seed < 2**64):
        raise ValueError(f"seed must be a whole number from -2**63 to 2**64 - 1 (got {r.seed!r})")
    if not all(isinstance(s, str) and s for s in r.stop):
        raise ValueError("stop strings must be non-empty strings")


@dataclass(frozen=True)
class Request:
    """One prompt to answer: a conversation (`messages`, answered in the chat template) or a raw
    completion (`prompt`: text or token ids, no template), and how to answer it.

    `model`: "auto" (routed; `route` picks the router, default "auto"), "base", an adapter
    name or a weighted mixture ("a:0.7+b:0.3", `switch.mixture`). `allow` / `deny` restrict
    which adapters `auto` may choose (None: all). Only chat requests to a router that fans out (`auto`) are answered part by part when
    their last user message numbers its parts.
    """

    messages: tuple[Message, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    model: str = "auto"
    route: str | None = None
    allow: tuple[str, ...] | None = None  # auto chooses only among these (None: every adapter)
    deny: tuple[str, ...] = ()  # ... and never these
    max_tokens: int = 64
    temperature: float = 0.0  # 0 (or below generate.MIN_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off; k: sample among the k likeliest tokens (vLLM's)
    min_p: float = 0.0  # 0: off; drop tokens below min_p x the likeliest's probability (vLLM's)
    presence_penalty: float = 0.0  # -2..2, OpenAI's: once per token the answer already holds
    frequency_penalty: float = 0.0  # -2..2, OpenAI's: per occurrence in the answer
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages prompt and answer tokens (greedy too)
    seed: int | None = None  # a seeded sampled request decodes alone, so its seed reproduces it
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    logprobs: int | None = None  # None: none; k: each answer token's logprob and the k likeliest
    echo: bool = False  # also the prompt tokens' logprobs (completions)
    # vLLM's `ignore_eos`: decode past the end-of-turn / end-of-text token, up to max_tokens or a
    # stop string (load tests and benchmarks that need answers of a known length)
    ignore_eos: bool = False
    prompt_ids: tuple[int, ...] | None = None  # filled by `tokenized`
    # what a router reads instead of the last user message: a part answered with the request
    # before it in sight is routed by its own words (`switch.parts.fan_out`)
    route_as: str | None = None

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Request has either messages or a prompt")
        for name in ("allow", "deny", "stop"):  # one name or string, not its characters; a list as a tuple
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(listed(value)))
        if isinstance(self.model, dict):  # {name: weight}, as Switch.chat takes it: the mixture's spelling
            object.__setattr__(self, "model", mixture_of(self.model).spec)
        _check_sampling(self)

    @classmethod
    def chat(cls, prompt: str | list[Message], system: str | None = None, **kw) -> Request:
        """A chat request from one user prompt (or a list of messages) and an optional system prompt."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return cls(messages=tuple(messages), **kw)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def _route_index(self) -> int:
        msgs = self.messages or ()
        for i in range(len(msgs) - 1, -1, -1):
            if msgs[i]["role"] == "user" and msgs[i]["content"].strip():
                return i
        return len(msgs) - 1

    def route_text(self, base: Base) -> str:
        """What a router reads: the last user message (routers are trained on single user turns;
        a system prompt says nothing about the task), or the completion prompt."""
        if self.route_as is not None:
            return self.route_as
        if self.messages is not None:
            return self.messages[self._route_index()]["content"]
        if isinstance(self.prompt, str):
            return self.prompt
        return base.tokenizer.decode(list(self.prompt or ()), skip_special_tokens=True)

    def with_route_text(self, text: str) -> Request:
        """This chat request with the message `route_text` reads replaced by `text` (one part of a
        multi-part request, answered on its own)."""
        i, msgs = self._route_index(), list(self.messages or ())
        msgs[i] = {**msgs[i], "content": text}
        return replace(self, messages=tuple(msgs), prompt_ids=None)

    def tokenized(self, base: Base) -> Request:
        """This request with `prompt_ids` filled in: the conversation in the chat template, or the
        raw prompt. The server tokenizes in its HTTP handlers (to refuse long prompts at once)."""
        if self.prompt_ids is not None:
            return self
        if self.messages is not None:
            ids = base.chat_ids(list(self.messages))
        elif isinstance(self.prompt, str):
            ids = base.tokenizer(self.prompt)["input_ids"]
        else:
            ids = list(self.prompt or ())
        return replace(self, prompt_ids=tuple(ids))

    @property
    def sampling_key(self) -> tuple:
        """Requests decode in one `generate` call only with equal keys: it samples a batch with one
        setting (penalties included) and one set of stop tokens, and echo keeps every prefill logit."""
        key: tuple = ("greedy",) if self.greedy else ("sample", float(self.temperature), float(self.top_p),
                                                       self.top_k, float(self.min_p))
        penalties = tuple(float(getattr(self, name)) for name in PENALTIES)
        key = (*key, "penalties", *penalties) if penalties != (0.0, 0.0, 1.0) else key
        key = (*key, "echo") if self.echo else key
        return (*key, "ignore_eos") if self.ignore_eos else key  # the batch has one set of stop tokens

    @property
    def decodes_alone(self) -> bool:
        """A seeded sampled request gets a `generate` call (and random generator) of its own, so
        its seed reproduces its answer whatever else is in flight."""
        return not self.greedy and self.seed is not None

    @property
    def greedy(self) -> bool:
        """Temperatures too small to divide logits by are greedy (generate samples them so)."""
        return self.temperature < MIN_TEMPERATURE


@dataclass(frozen=True)
class Started:
    batch: dict  # {"id", "size", "dynamic"} of the batched forward (a multi-part answer: "fan_out")


@dataclass(frozen=True)
class Token:
    """New answer text. `start` is the index (in the answer's tokens) of the first token this text
    belongs to; `logprobs` are those of the tokens whose text is now complete (with `logprobs`);
    `pieces` cut `text` at token boundaries, each with its token's `index` and routing entry."""

    text: str
    start: int
    pieces: tuple[dict, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Switched:
    token_index: int
    adapter: str | None  # None: the base model
    part: int | None = None  # 1-based, for a multi-part answer


@dataclass(frozen=True)
class Done:
    answer: Generation
    batch: dict


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | Token | Switched | Done | Failed


@dataclass(eq=False)
class Handle:
    """A request in flight: where its events go, and a flag to cancel it (its rows leave the batch
    at their next token). Owned by the caller; the library only reads `cancelled`."""

    request: Request
    emit: Callable[[Event], None] = lambda event: None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
