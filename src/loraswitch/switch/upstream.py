"""The upstream model a request is escalated to: any OpenAI-compatible server (vLLM, a hosted
API, another loraswitch), spoken to with httpx.

The request always goes upstream as a *stream* (`stream: true`, usage included), whether or not
our own client streams: every delta is passed on as a `Token` event the moment it arrives, so a
streaming client sees the upstream's tokens with one hop of latency, and a non-streaming one gets
the same text in its `Done`. Failures are split by whether anything was passed on yet:

* before the first token (connection refused, a timeout, an HTTP error status, a body that is not
  an OpenAI stream) -> `UpstreamError`: the caller answers locally instead, nothing was sent;
* after it (the stream breaks or stalls mid-answer) -> the answer ends with what arrived,
  `finish_reason` "error" and the reason in its routing: text a client has already read cannot be
  taken back, and a local answer appended to half an upstream answer would be worse than either.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from loraswitch.generate import Generation
from loraswitch.switch.request import Event, Request, Started, Token

# an upstream answer is cut at this many characters per requested token: a server that ignores
# max_tokens (one wrote 5 MB for max_tokens 16) must not pass all of it on; real text runs 3-6
MAX_CHARS_PER_TOKEN = 32


def check_url(url: str) -> None:
    """ValueError unless `url` is an http(s) URL with a host: what an upstream can be."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the upstream URL must be http:// or https:// with a host, got {url!r}")


class UpstreamError(RuntimeError):
    """The upstream gave no answer (nothing was passed on): answer locally instead."""


@dataclass
class Upstream:
    """Where escalated requests go. `timeout`: seconds to connect and then between any two bytes
    of the answer (a stalled upstream is a failed one); `deadline`: seconds for the whole answer."""

    url: str  # the server's base URL, with or without /v1
    model: str  # the `model` sent upstream
    api_key: str | None = None
    timeout: float = 30.0
    deadline: float = 300.0

    @classmethod
    def from_env(cls, url: str, model: str, api_key_env: str | None = None, **kw) -> Upstream:
        """An upstream whose API key is read from the environment variable `api_key_env` (never
        from the command line: it would show in `ps` and shell history)."""
        key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and not key:
            raise ValueError(f"--upstream-api-key-env {api_key_env}: that environment variable is not set")
        return cls(url, model, key, **kw)

    def __post_init__(self):
        check_url(self.url)

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def describe(self) -> dict:
        """Where requests go, as /healthz and responses show it: a password in the URL is hidden."""
        return {"url": self.redact(self.base_url), "model": self.model}

    def redact(self, text: str) -> str:
        """`text` without the API key or the URL's password: an upstream's error body can echo the
        Authorization header, and that text reaches clients (`escalation.fallback`)."""
        for secret in (self.api_key, urlsplit(self.url).password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def accepts(self, request: Request) -> str | None:
        """Why `request` cannot go upstream (None: it can). Logprobs and echo are of the local
        model's tokens; a prompt of token ids means nothing to another tokenizer; allow / deny
        name local adapters, which an upstream cannot honour ("allow": [] asks for the base model)."""
        if request.logprobs is not None or request.echo:
            return "logprobs / echo are answered by the local model's tokens"
        if not request.is_chat and not isinstance(request.prompt, str):
            return "a prompt of token ids is only meaningful to the local tokenizer"
        if request.allow is not None or request.deny:
            return "allow / deny choose among this model's own adapters"
        return None

    def body(self, request: Request) -> tuple[str, dict]:
        """(endpoint path, JSON body) of `request` in the OpenAI API."""
        body: dict = {"model": self.model, "max_tokens": request.max_tokens, "temperature": request.temperature,
                      "top_p": request.top_p, "stream": True, "stream_options": {"include_usage": True}}
        if request.seed is not None:
            body["seed"] = request.seed
        for name, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0),
                          ("top_k", 0), ("min_p", 0.0)):  # the last three: vLLM's, sent only when asked for
            if getattr(request, name) != off:
                body[name] = getattr(request, name)
        if request.stop:
            body["stop"] = list(request.stop)
        if request.ignore_eos:  # vLLM's; asked for answers of a known length
            body["ignore_eos"] = True
        if request.is_chat:
            return "/chat/completions", {**body, "messages": [dict(m) for m in request.messages or ()]}
        return "/completions", {**body, "prompt": request.prompt}

    def answer(self, request: Request, emit: Callable[[Event], None], cancelled: Callable[[], bool]) -> Generation:
        """Ask the upstream; pass its text on as `Token`s through `emit`; return the answer (its
        `routing["upstream"]`: url, model, latency, usage, error). Raises UpstreamError when
        nothing was passed on."""
        path, body = self.body(request)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        began = time.monotonic()
        stream = _Stream(began, MAX_CHARS_PER_TOKEN * max(1, request.max_tokens))
        try:
            with httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers) as client, \
                    client.stream("POST", self.base_url + path, json=body) as response:
                if response.status_code != 200:
                    raise UpstreamError(f"HTTP {response.status_code}: {response.read()[:300].decode(errors='replace')}")
                for line in response.iter_lines():
                    if cancelled():
                        stream.finish = "cancelled"
                        break
                    if time.monotonic() - began > self.deadline:
                        raise httpx.ReadTimeout(f"no complete answer within {self.deadline:g} s")
                    stream.line(line, emit)
                    if stream.ended:
                        break
        except Exception as exc:  # whatever broke: before any text, answer locally; after, end with it
            why = UpstreamError(self.redact(str(exc) if isinstance(exc, UpstreamError) else f"{type(exc).__name__}: {exc}"))
            if not stream.text:
                raise why from exc
            stream.error, stream.finish = f"the upstream stream broke after {len(stream.text)} characters: {why}", "error"
        if not stream.text and not stream.ended:
            raise UpstreamError("the upstream closed the stream without an answer")
        return stream.generation(request, self.describe())


def _delta(choice) -> str | None:
    """A chunk choice's new text (chat `delta.content` or completion `text`); ValueError for
    anything not shaped so: it must not reach a client as it came (an integer `content` did)."""
    if not isinstance(choice, dict):
        raise ValueError(f"a stream choice that is not a JSON object: {str(choice)[:100]}")
    delta = choice.get("delta", {}) or {}
    if not isinstance(delta, dict):
        raise ValueError(f"a stream delta that is not a JSON object: {str(delta)[:100]}")
    text = delta.get("content") if "delta" in choice else choice.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"a stream delta whose text is not a string: {str(text)[:100]}")
    return text


class _Stream:
    """What one upstream SSE stream said so far (chat or completion chunks)."""

    def __init__(self, began: float, limit: int):
        self.began, self.text, self.finish, self.usage = began, "", "stop", None
        self.limit = limit  # characters passed on at most (`MAX_CHARS_PER_TOKEN`)
        self.first_token_s: float | None = None
        self.model: str | None = None
        self.error: str | None = None
        self.ended = False
        self.pieces = 0

    def line(self, line: str, emit: Callable[[Event], None]) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.ended = True
            return
        chunk = json.loads(data)  # ValueError: not an OpenAI stream
        if not isinstance(chunk, dict):
            raise ValueError(f"a stream chunk that is not a JSON object: {data[:100]}")
        if "error" in chunk and not chunk.get("choices"):
            raise UpstreamError(f"the upstream answered an error: {json.dumps(chunk['error'])[:300]}")
        model, usage = chunk.get("model"), chunk.get("usage")
        self.model = model if isinstance(model, str) else self.model
        self.usage = usage if isinstance(usage, dict) and usage else self.usage  # a number or list is no usage
        for choice in chunk.get("choices") or []:
            delta = _delta(choice)
            if delta and len(self.text) + len(delta) > self.limit:  # it ignores max_tokens: end here
                delta, self.ended, self.finish = delta[: self.limit - len(self.text)], True, "length"
                self.error = f"the upstream wrote past max_tokens; cut at {self.limit} characters"
            if delta:
                if not self.text:
                    self.first_token_s = time.monotonic() - self.began
                    emit(Started({"id": None, "size": 1, "dynamic": False, "upstream": True}))
                emit(Token(delta, self.pieces))
                self.text += delta
                self.pieces += 1
            if choice.get("finish_reason") and not self.error:
                self.finish = choice["finish_reason"]

    def generation(self, request: Request, where: dict) -> Generation:
        info = {**where, "answered_by": self.model, "latency_s": round(time.monotonic() - self.began, 4),
                "first_token_s": None if self.first_token_s is None else round(self.first_token_s, 4),
                "usage": self.usage}
        if self.error:
            info["error"] = self.error
        return Generation(prompt_ids=list(request.prompt_ids or ()), text=self.text, finish_reason=self.finish,
                          routing={"upstream": info})
