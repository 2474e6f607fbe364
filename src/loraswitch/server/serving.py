"""What the two completion endpoints share (after vLLM's `OpenAIServing`): turning a validated
body into the library's `Request`, queueing it, and answering with one JSON object or an SSE
stream of the library's events. Each endpoint (`serving_chat`, `serving_completion`) says how its
request is built and how its responses and chunks look.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.server import errors
from loraswitch.server.composition import resolve_body
from loraswitch.server.errors import APIError, bad_request
from loraswitch.server.protocol import _Common
from loraswitch.server.routing_info import answered_adapters, routing_info
from loraswitch.server.scheduler import Job
from loraswitch.server.state import ServerState
from loraswitch.switch.parts import PartsError, fan_out
from loraswitch.switch.request import Done, Failed, Handle, Request, Token


def sse(obj: Any) -> str:
    """One server-sent event: compact JSON on one line."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class OpenAIServing:
    """One endpoint's serving: subclasses set the names and build requests, responses, chunks."""

    kind = ""  # "chat" | "completion"
    id_prefix = ""
    param = ""  # the body field that holds the prompt (for errors)

    def __init__(self, st: ServerState, body: _Common):
        self.st, self.body = st, body
        self.created = int(time.time())
        self.tok = st.base.tokenizer
        self._asked_at = float("-inf")  # when `next_event` last asked whether the client is there

    # ------------------------------------------------------------------ to implement
    def build(self) -> Request:
        """The library request for this body (messages or prompt), not yet validated."""
        raise NotImplementedError

    def choice(self, job: Job, answer: Generation) -> dict:
        raise NotImplementedError

    def chunk_choice(self, text: str | None, finish: str | None, logprobs: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ requests
    async def request(self) -> Request:
        """The validated, tokenized library request (400 / 404 before anything is queued). All
        validation happens here; tokenizing runs in the `prep` thread, after a character count
        has refused prompts that cannot fit, so a huge prompt never stalls other requests."""
        body, settings = self.body, self.st.settings
        body.check_supported()
        model, route, allow, deny = resolve_body(self.st, body, self.known_models())
        temperature = body.temperature if body.temperature is not None else settings.default_temperature
        req = self.build()
        chars = len(req.prompt) if isinstance(req.prompt, str) else sum(len(m["content"]) for m in req.messages or ())
        if chars > 2 * settings.max_prompt_tokens * self.st.max_token_chars:  # 2x: slack for normalizers
            raise bad_request(f"the prompt has {chars} characters, more than {settings.max_prompt_tokens} tokens can "
                              f"hold; this server accepts at most {settings.max_prompt_tokens} tokens", self.param,
                              "context_length_exceeded")
        self.fans_out = model == "auto" and req.is_chat and (route or "auto") == "auto"  # auto answers parts
        req = replace(req, model=model, route=route, allow=allow, deny=deny, temperature=temperature,
                      top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=tuple(body.stops()),
                      logprobs=body.logprob_count(), ignore_eos=bool(body.ignore_eos))
        return await asyncio.get_running_loop().run_in_executor(self.st.prep, self._prepare, req)

    def _prepare(self, req: Request) -> Request:
        """In the `prep` thread: tokenize, check the length and max_tokens, and count the rows a
        multi-part request will take (within --max-parts, and max_tokens for the whole answer)."""
        base = self.st.prep_base
        try:
            req = req.tokenized(base)
        except Exception as exc:  # a template that refuses the roles or their order
            raise bad_request(f"the model's chat template refused these messages: {exc}", self.param) from None
        req = replace(req, max_tokens=self._max_tokens(len(req.prompt_ids or ())))
        self.rows = 1
        if self.fans_out:  # at most this many rows: the segmenter may find the list is one request
            try:
                parts = fan_out(req, base, self.max_parts)
            except PartsError:  # more parts than --max-parts, or too few tokens: answered whole
                parts = None
            self.rows = len(parts) if parts else 1
        return req

    @property
    def max_parts(self) -> int:
        return min(self.st.settings.max_parts, self.st.settings.max_batch)

    def _max_tokens(self, n: int) -> int:
        """The request's max_tokens, after checking the prompt's `n` tokens against the limits."""
        settings, context, param = self.st.settings, self.st.context, self.param
        if not n:
            raise bad_request("the prompt is empty", param)
        if n > settings.max_prompt_tokens:
            raise bad_request(f"the prompt has {n} tokens; this server accepts at most {settings.max_prompt_tokens}",
                              param, "context_length_exceeded")
        room = context - n if context else settings.max_new_tokens
        if room < 1:
            raise bad_request(f"the prompt has {n} tokens and fills the model's context of {context}", param,
                              "context_length_exceeded")
        limit = self.body.limit()
        if limit is not None and limit > settings.max_new_tokens:
            raise bad_request(f"max_tokens={limit} exceeds this server's limit of {settings.max_new_tokens}",
                              "max_tokens", "max_tokens_exceeded")
        if limit is not None and limit > room:
            raise bad_request(f"the prompt ({n} tokens) plus max_tokens={limit} exceeds the model's context of "
                              f"{context} tokens", "max_tokens", "context_length_exceeded")
        return limit if limit is not None else min(settings.default_max_tokens, settings.max_new_tokens, room)

    def known_models(self) -> list[str]:
        return ["auto", "base", *self.st.served_adapters]

    # ------------------------------------------------------------------ answering
    async def serve(self, raw=None):
        """Queue the request and answer it. `raw` (the Starlette request) is polled while a
        non-streaming answer is awaited, so a client that went away frees its rows."""
        with self.st.scheduler.arriving():  # a round about to start waits for this request
            request = await self.request()
            job = Job(Handle(request), loop=asyncio.get_running_loop(), queue=asyncio.Queue(), metrics=self.st.metrics,
                      rows=self.rows)
            self.deadline = job.loop.time() + self.st.settings.timeout
            self.st.scheduler.submit(job)  # 429 / 503 before any byte of a stream is sent
        if self.body.stream:
            return StreamingResponse(self.stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                event = await self.next_event(job, raw)
                if event is None:  # the client went away: nobody reads the answer
                    self.st.scheduler.cancel(job)
                    return Response(status_code=499)
                if isinstance(event, Done):
                    return JSONResponse(self.response(job, event))
                if isinstance(event, Failed):
                    raise errors.from_library(event.error, job.request.model, self.known_models())
        except (asyncio.CancelledError, APIError):
            self.st.scheduler.cancel(job)  # the client went away, or timed out: free its rows
            raise

    async def next_event(self, job: Job, raw=None):
        """The job's next event; None when `raw`'s client disconnected; 504 past the deadline. The
        client is asked every `DISCONNECT_POLL_S` whether events flow or not: a decoding answer
        sends a token event each step, and a client gone mid-answer must free its rows."""
        while True:
            now = job.loop.time()
            remaining = self.deadline - now
            if remaining <= 0:
                raise errors.timeout(self.st.settings.timeout)
            if raw is not None and now - self._asked_at >= DISCONNECT_POLL_S:
                self._asked_at = now
                if await raw.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(job.queue.get(), min(remaining, DISCONNECT_POLL_S) if raw else remaining)
            except TimeoutError:
                continue

    def head(self, job: Job, model: str, chunk: bool = False) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        return {"id": self.id_prefix + job.id, "object": obj + (".chunk" if chunk and self.kind == "chat" else ""),
                "created": self.created, "model": model, "system_fingerprint": None}

    def response(self, job: Job, done: Done) -> dict:
        answer = done.answer
        return {**self.head(job, model_name(job.request, answer)), "choices": [self.choice(job, answer)],
                "usage": usage(answer), "routing": self.routing(job, answer), "batch": {**done.batch, **job.timings()}}

    def routing(self, job: Job, answer: Generation) -> dict:
        return routing_info(job.request, answer, self.tok if self.body.want_trace() else None)

    async def stream(self, job: Job):
        try:
            for first in self.stream_start(job):
                yield sse(first)
            while True:
                try:
                    event = await self.next_event(job)
                except APIError as err:  # timed out
                    self.st.scheduler.cancel(job)
                    yield sse(err.body())
                    yield SSE_DONE
                    return
                if isinstance(event, Token):
                    yield sse(self.token_chunk(job, event))
                elif isinstance(event, Done):
                    for chunk in self.final_chunks(job, event):
                        yield sse(chunk)
                    yield SSE_DONE
                    return
                elif isinstance(event, Failed):
                    yield sse(errors.from_library(event.error, job.request.model, self.known_models()).body())
                    yield SSE_DONE
                    return
        finally:
            if not job.finished:  # client gone or timed out: free the rows
                self.st.scheduler.cancel(job)

    def stream_start(self, job: Job) -> list[dict]:
        return []

    def token_chunk(self, job: Job, event: Token) -> dict:
        logprobs = list(event.logprobs) if job.request.logprobs is not None else None
        extra = {"routing": {"tokens": list(event.pieces)}} if self.body.want_trace() and event.pieces else {}
        return {**self.head(job, self.body.model, chunk=True), "choices": [self.chunk_choice(event.text, None, logprobs)],
                **self._no_usage_yet(), **extra}

    def _no_usage_yet(self) -> dict:
        """With stream_options.include_usage, OpenAI's chunks before the last carry "usage": null."""
        return {"usage": None} if self.body.include_usage() else {}

    def final_chunks(self, job: Job, done: Done) -> list[dict]:
        answer = done.answer
        model = model_name(job.request, answer)
        out = [{**self.head(job, model, chunk=True), "choices": [self.chunk_choice(None, answer.finish_reason, None)],
                **self._no_usage_yet(), "routing": self.routing(job, answer), "batch": {**done.batch, **job.timings()}}]
        if self.body.include_usage():
            out.append({**self.head(job, model, chunk=True), "choices": [], "usage": usage(answer)})
        return out

    def token_text(self, token_id: int) -> str:
        piece = self.tok.convert_ids_to_tokens(int(token_id))
        return self.tok.convert_tokens_to_string([piece]) if piece is not None else ""


def model_name(request: Request, answer: Generation) -> str:
    """The response's `model`: the adapter(s) that answered, "+"-joined, "base", or
    "upstream:<model>" for an escalated answer."""
    up = (answer.routing or {}).get("upstream")
    if up is not None:
        return f"upstream:{up.get('answered_by') or up['model']}"
    return "+".join(answered_adapters(request.model, answer.routing or {})) or "base"


def usage(answer: Generation) -> dict:
    """Tokens this server read and wrote; an escalated answer adds the upstream's (its prompt
    was read here too, to decide), with both parts under "local" and "upstream"."""
    p, c = len(answer.prompt_ids), len(answer.token_ids)
    up = ((answer.routing or {}).get("upstream") or {}).get("usage")
    if not up:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    up_p, up_c = int(up.get("prompt_tokens") or 0), int(up.get("completion_tokens") or 0)
    return {"prompt_tokens": p + up_p, "completion_tokens": c + up_c, "total_tokens": p + c + up_p + up_c,
            "local": {"prompt_tokens": p, "completion_tokens": c},
            "upstream": {"prompt_tokens": up_p, "completion_tokens": up_c}}
