"""What every handler needs: the server's settings and the objects one app owns."""

from __future__ import annotations

import copy
import time
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


@dataclass
class ServerState:
    """One app's switch, worker, settings and metrics. `base` is the switch's base model with a
    copy of its tokenizer: handlers tokenize on the event loop while the worker decodes, and a
    fast tokenizer must not be used from two threads."""

    switch: object  # loraswitch.switch.Switch
    settings: ServerSettings
    metrics: Metrics
    scheduler: Scheduler
    base: Base = field(init=False)
    context: int = field(init=False)  # the model's context length (0: unknown)
    started_at: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        base = self.switch.base
        self.base = replace(base, tokenizer=copy.deepcopy(base.tokenizer))
        self.context = int(getattr(base.model.config, "max_position_embeddings", 0) or 0)

    @property
    def engine(self):
        return self.switch.engine


def state(request: Request) -> ServerState:
    """The handlers' dependency: this app's state."""
    return request.app.state.server
