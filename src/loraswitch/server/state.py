"""What every handler needs: the server's settings and the objects one app owns."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from fastapi import Request

from loraswitch.base import Base
from loraswitch.server.metrics import Metrics
from loraswitch.server.scheduler import Scheduler


@dataclass
class ServerSettings:
    max_batch: int = 32  # requests decoded together (a multi-part request may add rows)
    max_queue: int = 256  # requests waiting for the worker; more -> 429
    max_prompt_tokens: int = 2048  # longer prompts -> 400
    max_new_tokens: int = 512  # largest max_tokens a request may ask for -> else 400
    default_max_tokens: int = 256  # when a request does not say (capped by max_new_tokens)
    default_temperature: float = 1.0  # the OpenAI default; 0 = greedy
    timeout: float = 300.0  # seconds from arrival to the last token -> else 504
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1/*
    allow_adapter_admin: bool = True  # POST/DELETE /v1/adapters
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies -> 413 before they are read
    max_parts: int = 16  # most numbered parts answered part by part (capped by max_batch); more: answered whole
    continuous: bool = True  # requests join a running batch between its steps (else they wait for the next)
    # Host headers served when no API key is set (DNS rebinding); None: the bound host and
    # localhost; "*" allows any
    allowed_hosts: list[str] | None = None
    docs: bool = True  # /docs, /redoc, /openapi.json (behind the API key when there is one)
    # task-shift detection (`server.shifts`): prompt texts are kept only with keep_prompts
    keep_prompts: bool = False
    shift_min_size: int = 16  # unrouted prompts in one cluster before it is reported
    shift_similarity: float = 0.4  # cosine to a cluster's mean direction to join it


@dataclass
class ServerState:
    """One app's switch, worker, settings and metrics. `base` is the switch's base model with a
    copy of its tokenizer for the event loop (token texts of responses); `prep` tokenizes prompts
    in its own thread with another copy: a 20 MB prompt tokenized on the event loop froze every
    request for 30 s, and a fast tokenizer must not be used from two threads."""

    switch: object  # loraswitch.switch.Switch
    settings: ServerSettings
    metrics: Metrics
    scheduler: Scheduler
    base: Base = field(init=False)
    prep_base: Base = field(init=False)  # used only in the `prep` thread
    prep: ThreadPoolExecutor = field(init=False)
    context: int = field(init=False)  # the model's context length (0: unknown)
    max_token_chars: int = field(init=False)  # the longest token's text: a prompt longer than
    # max_prompt_tokens * this many characters is refused before tokenizing
    removing: set[str] = field(default_factory=set)  # DELETEd, leaving once in-flight work ends
    started_at: int = field(default_factory=lambda: int(time.time()))
    shifts: object = None  # server.shifts.ShiftDetector, set by serving_shifts.install

    def __post_init__(self):
        base = self.switch.base
        self.base = replace(base, tokenizer=copy.deepcopy(base.tokenizer))
        self.prep_base = replace(base, tokenizer=copy.deepcopy(base.tokenizer))
        self.prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraswitch-prep")
        self.context = int(getattr(base.model.config, "max_position_embeddings", 0) or 0)
        self.max_token_chars = longest_token(self.base.tokenizer)

    @property
    def served_adapters(self) -> list[str]:
        """Adapters requests may name: loaded and not being removed."""
        return [n for n in self.switch.engine.names if n not in self.removing]

    @property
    def engine(self):
        return self.switch.engine


def longest_token(tokenizer) -> int:
    """Characters in the longest token's text (at least 1; 0.2 s over a 49k vocabulary)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max([1] + [len(tokenizer.convert_tokens_to_string([p])) for p in pieces if p is not None])


def state(request: Request) -> ServerState:
    """The handlers' dependency: this app's state."""
    return request.app.state.server
