"""What the two completion endpoints share (after vLLM's `OpenAIServing`): turning a validated
body into the library's `Request`s, queueing them, and answering with one JSON object or an SSE
stream of the library's events. Each endpoint (`serving_chat`, `serving_completion`) says how its
requests are built and how its responses and chunks look.

One body may ask for several choices: `n` samples of each prompt, and (completions) a list of
prompts. Each choice is a library request of its own, queued together, so they decode as rows of
one batch; choice `i` answers prompt `i // n`, as in the OpenAI API. A seed gives sample `j`
the seed `seed + j`: the samples differ, and each is reproducible alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.server import errors
from loraswitch.server.composition import resolve_body
from loraswitch.server.errors import APIError, bad_request
from loraswitch.server.protocol import SEED_MAX, _Common
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


@dataclass(eq=False)
class Choice:
    """One choice of a response and the job that answers it (`job.counts_prompt`: the first
    choice of its prompt, whose prompt tokens usage and metrics count)."""

    index: int
    job: Job


class _Tagged:
    """A job's event queue that forwards to the response's one queue, tagged with the choice:
    one reader then follows every choice in the order their events come."""

    def __init__(self, events: asyncio.Queue, index: int):
        self.events, self.index = events, index

    def put_nowait(self, event) -> None:
        self.events.put_nowait((self.index, event))


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
    def build(self) -> list[Request]:
        """The library request for each of this body's prompts (messages or prompt), not yet
        validated."""
        raise NotImplementedError

    def choice(self, choice: Choice, answer: Generation) -> dict:
        raise NotImplementedError

    def chunk_choice(self, index: int, text: str | None, finish: str | None,
                     logprobs: list[TokenLogprob] | None) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ requests
    async def requests(self) -> list[tuple[int, Request, int]]:
        """(prompt index, validated tokenized library request, rows) per choice (400 / 404 before
        anything is queued). All validation happens here; tokenizing runs in the `prep` thread,
        after a character count has refused prompts that cannot fit, so a huge prompt never
        stalls other requests."""
        body, settings = self.body, self.st.settings
        body.check_supported()
        model, route, allow, deny = resolve_body(self.st, body, self.known_models())
        temperature = body.temperature if body.temperature is not None else settings.default_temperature
        built, n = self.build(), body.n or 1
        if len(built) * n > settings.max_queue:
            raise bad_request(f"{len(built)} prompt(s) x n={n} is {len(built) * n} choices; this server queues at most "
                              f"{settings.max_queue} requests (send fewer, or several requests)",
                              "n" if n > 1 else self.param, "too_many_choices")
        for req in built:
            self._check_chars(req)
        self.fans_out = model == "auto" and built[0].is_chat and (route or "auto") == "auto"  # auto answers parts
        common = dict(model=model, route=route, allow=allow, deny=deny, temperature=temperature,
                      top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed, stop=tuple(body.stops()),
                      logprobs=body.logprob_count(), ignore_eos=bool(body.ignore_eos), **body.sampling())
        built = [replace(req, **common) for req in built]
        prepared = await asyncio.get_running_loop().run_in_executor(self.st.prep, self._prepare_all, built)
        return [(p, replace(req, seed=nth_seed(req.seed, j)), rows)
                for p, (req, rows) in enumerate(prepared) for j in range(n)]

    def _check_chars(self, req: Request) -> None:
        settings = self.st.settings
        chars = len(req.prompt) if isinstance(req.prompt, str) else sum(len(m["content"]) for m in req.messages or ())
        if chars > 2 * settings.max_prompt_tokens * self.st.max_token_chars:  # 2x: slack for normalizers
            raise bad_request(f"the prompt has {chars} characters, more than {settings.max_prompt_tokens} tokens can "
                              f"hold; this server accepts at most {settings.max_prompt_tokens} tokens", self.param,
                              "context_length_exceeded")

    def _prepare_all(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        return [self._prepare(req) for req in reqs]

    def _prepare(self, req: Request) -> tuple[Request, int]:
        """In the `prep` thread: tokenize, check the length and max_tokens, and count the rows a
        multi-part request will take (within --max-parts, and max_tokens for the whole answer)."""
        base = self.st.prep_base
        try:
            req = req.tokenized(base)
        except Exception as exc:  # a template that refuses the roles or their order
            raise bad_request(f"the model's chat template refused these messages: {exc}", self.param) from None
        req = replace(req, max_tokens=self._max_tokens(len(req.prompt_ids or ())))
        rows = 1
        if self.fans_out:  # at most this many rows: the segmenter may find the list is one request
            try:
                parts = fan_out(req, base, self.max_parts)
            except PartsError:  # more parts than --max-parts, or too few tokens: answered whole
                parts = None
            rows = len(parts) if parts else 1
        return req, rows

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
        """Queue the request's choices and answer them. `raw` (the Starlette request) is polled
        while a non-streaming answer is awaited, so a client that went away frees its rows."""
        with self.st.scheduler.arriving():  # a round about to start waits for this request
            asked = await self.requests()
            self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
            self.choices = [Choice(i, Job(Handle(req), loop=self.loop, queue=_Tagged(self.events, i),
                                          metrics=self.st.metrics, rows=rows, counts_prompt=i == 0 or asked[i - 1][0] != p))
                            for i, (p, req, rows) in enumerate(asked)]
            self.deadline = self.loop.time() + self.st.settings.timeout
            self.st.scheduler.submit_all([c.job for c in self.choices])  # 429 / 503 before any byte is sent
        if self.body.stream:
            return StreamingResponse(self.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answers: dict[int, Done] = {}
        try:
            while len(answers) < len(self.choices):
                got = await self.next_event(raw)
                if got is None:  # the client went away: nobody reads the answer
                    self.cancel_all()
                    return Response(status_code=499)
                i, event = got
                if isinstance(event, Done):
                    answers[i] = Done(self.shown(event.answer), event.batch)
                elif isinstance(event, Failed):
                    raise errors.from_library(event.error, self.choices[i].job.request.model, self.known_models())
            return JSONResponse(self.response(answers))
        except (asyncio.CancelledError, APIError):
            self.cancel_all()  # the client went away, timed out, or one choice failed: free the rows
            raise

    def shown(self, answer: Generation) -> Generation:
        """The answer as the response shows it (completions' echo-only requests drop a token)."""
        return answer

    def cancel_all(self) -> None:
        for c in self.choices:
            if not c.job.finished:
                self.st.scheduler.cancel(c.job)

    async def next_event(self, raw=None) -> tuple[int, Any] | None:
        """The next (choice index, event); None when `raw`'s client disconnected; 504 past the
        deadline. The client is asked every `DISCONNECT_POLL_S` whether events flow or not: a
        decoding answer sends a token event each step, and a client gone mid-answer must free
        its rows."""
        while True:
            now = self.loop.time()
            remaining = self.deadline - now
            if remaining <= 0:
                raise errors.timeout(self.st.settings.timeout)
            if raw is not None and now - self._asked_at >= DISCONNECT_POLL_S:
                self._asked_at = now
                if await raw.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), min(remaining, DISCONNECT_POLL_S) if raw else remaining)
            except TimeoutError:
                continue

    def head(self, model: str, chunk: bool = False) -> dict:
        obj = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        return {"id": self.id_prefix + self.choices[0].job.id,
                "object": obj + (".chunk" if chunk and self.kind == "chat" else ""),
                "created": self.created, "model": model, "system_fingerprint": None}

    def response(self, answers: dict[int, Done]) -> dict:
        """One choice: its routing and batch timings at the top level, as always. Several: each
        choice carries its own, and `model` names every adapter that answered."""
        done = [answers[c.index] for c in self.choices]
        extras = [{"routing": self.routing(c, d.answer), "batch": _batch(c, d)} for c, d in zip(self.choices, done)]
        choices = [self.choice(c, d.answer) for c, d in zip(self.choices, done)]
        if len(self.choices) == 1:
            return {**self.head(self.model_of(done)), "choices": choices, "usage": self.usage(done), **extras[0]}
        return {**self.head(self.model_of(done)), "choices": [{**c, **e} for c, e in zip(choices, extras)],
                "usage": self.usage(done)}

    def model_of(self, done: list[Done]) -> str:
        """The response's `model`: every adapter that answered one of the choices (`model_name`)."""
        return "+".join(dict.fromkeys(model_name(c.job.request, d.answer) for c, d in zip(self.choices, done)))

    def usage(self, done: list[Done]) -> dict:
        """Summed over the choices, each prompt's tokens counted once (as OpenAI counts n > 1)."""
        total: dict = {}
        for c, d in zip(self.choices, done):
            part = usage(d.answer)
            total = _added(total, part if c.job.counts_prompt else _without_prompt(part))
        return total

    def routing(self, choice: Choice, answer: Generation) -> dict:
        return routing_info(choice.job.request, answer, self.tok if self.body.want_trace() else None)

    async def stream(self):
        """The choices' chunks as their tokens come, each with its index; each choice's last
        chunk when it is done; one usage chunk (asked for) after every choice is done."""
        done: dict[int, Done] = {}
        try:
            for first in self.stream_start():
                yield sse(first)
            while len(done) < len(self.choices):
                try:
                    i, event = await self.next_event()
                except APIError as err:  # timed out
                    self.cancel_all()
                    yield sse(err.body())
                    yield SSE_DONE
                    return
                choice = self.choices[i]
                if isinstance(event, Token):
                    yield sse(self.token_chunk(choice, event))
                elif isinstance(event, Done):
                    done[i] = event
                    yield sse(self.final_chunk(choice, event))
                elif isinstance(event, Failed):
                    self.cancel_all()
                    yield sse(errors.from_library(event.error, choice.job.request.model, self.known_models()).body())
                    yield SSE_DONE
                    return
            if self.body.include_usage():
                ordered = [done[c.index] for c in self.choices]
                yield sse({**self.head(self.model_of(ordered), chunk=True), "choices": [], "usage": self.usage(ordered)})
            yield SSE_DONE
        finally:
            self.cancel_all()  # client gone or timed out: free the rows (finished jobs are skipped)

    def stream_start(self) -> list[dict]:
        return []

    def token_chunk(self, choice: Choice, event: Token) -> dict:
        logprobs = list(event.logprobs) if choice.job.request.logprobs is not None else None
        extra = {"routing": {"tokens": list(event.pieces)}} if self.body.want_trace() and event.pieces else {}
        return {**self.head(self.body.model, chunk=True),
                "choices": [self.chunk_choice(choice.index, event.text, None, logprobs)], **self._no_usage_yet(), **extra}

    def _no_usage_yet(self) -> dict:
        """With stream_options.include_usage, OpenAI's chunks before the last carry "usage": null."""
        return {"usage": None} if self.body.include_usage() else {}

    def final_chunk(self, choice: Choice, done: Done) -> dict:
        """A choice's last chunk: `finish_reason` and, as vLLM's, `stop_reason` (the stop string
        that ended it, else null), with the choice's routing and batch timings."""
        answer = done.answer
        last = {**self.chunk_choice(choice.index, None, answer.finish_reason, None), "stop_reason": answer.stop_reason}
        return {**self.head(model_name(choice.job.request, answer), chunk=True), "choices": [last],
                **self._no_usage_yet(), "routing": self.routing(choice, answer), "batch": _batch(choice, done)}

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


def _batch(choice: Choice, done: Done) -> dict:
    """A choice's `batch`: the batched forward that answered it and the request's timings."""
    return {**done.batch, **choice.job.timings()}


def nth_seed(seed: int | None, j: int) -> int | None:
    """Sample `j`'s seed of a request asking n samples with `seed` (None: unseeded)."""
    if seed is None or j == 0:
        return seed
    return seed + j if seed + j <= SEED_MAX else seed + j - 2**64


def _without_prompt(part: dict) -> dict:
    """A choice's usage when an earlier choice of the same prompt counted its prompt here (an
    upstream that answered it was sent the prompt again, and keeps its count)."""
    local = part.get("local", part)["prompt_tokens"]
    out = {**part, "prompt_tokens": part["prompt_tokens"] - local, "total_tokens": part["total_tokens"] - local}
    if "local" in part:
        out["local"] = {**part["local"], "prompt_tokens": 0}
    return out


def _added(a: dict, b: dict) -> dict:
    """Two usage objects summed, key by key (nested "local" / "upstream" too)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _added(out.get(k, {}), v) if isinstance(v, dict) else out.get(k, 0) + v
    return out
