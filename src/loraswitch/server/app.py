"""The OpenAI-compatible HTTP server: `create_app(switch, settings)` builds the FastAPI app.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream`), GET /v1/models,
GET/POST /v1/adapters, DELETE /v1/adapters/{name}, GET /healthz, GET /metrics, GET /ui.
Every answer carries `routing` (router, chosen adapters, confidence, switch events; with
`"loraswitch": {"trace": true}` the per-token trace) and `batch` (which batched forward served it).
See docs/server.md.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraswitch.library import AdapterError
from loraswitch.routing import ROUTER_NAMES
from loraswitch.server import errors
from loraswitch.server.errors import APIError, bad_request
from loraswitch.server.metrics import CONTENT_TYPE, Metrics, endpoint_label
from loraswitch.server.protocol import (
    AdapterLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    _Common,
    chat_ids,
    route_text,
    with_route_text,
)
from loraswitch.server.scheduler import Job, JobResult, Scheduler

log = logging.getLogger("loraswitch.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class ServerSettings:
    max_batch: int = 32  # rows decoded together in one forward
    max_queue: int = 256  # requests waiting for the worker; more -> 429
    max_prompt_tokens: int = 2048  # longer prompts -> 400
    max_new_tokens: int = 512  # largest max_tokens a request may ask for -> else 400
    default_max_tokens: int = 256  # when a request does not say (capped by max_new_tokens)
    default_temperature: float = 1.0  # the OpenAI default; 0 = greedy
    timeout: float = 300.0  # seconds from arrival to the last token -> else 504
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1/*
    allow_adapter_admin: bool = True  # POST/DELETE /v1/adapters


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _validation_error(exc: RequestValidationError) -> APIError:
    problems, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            where = f" at position {loc[0]}" if loc else ""
            return bad_request(f"We could not parse the JSON body of your request: {detail}{where}", None, "invalid_json")
        field = ".".join(loc)
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return bad_request("The request body must be a JSON object (send Content-Type: application/json).", None,
                               "invalid_json")
        param = param or field or None
        problems.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return bad_request("Invalid request: " + "; ".join(problems), param, "invalid_request")


class _Gate:
    """Pure ASGI middleware: the API key on /v1/*, and request counts and latency by endpoint
    and status (latency of a stream runs to its last byte)."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = endpoint_label(path)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.settings.api_key and path.startswith("/v1/") and not self._authorized(scope):
                err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                               "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                response = JSONResponse(err.body(), status_code=401, headers=err.headers)
                await response(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope) -> bool:
        header = ""
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                header = v.decode("latin-1")
                break
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.settings.api_key.encode())


def create_app(switch, settings: ServerSettings | None = None) -> FastAPI:
    """The app for `switch` (a `loraswitch.switch.Switch`); the worker starts with the app."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    scheduler = Scheduler(switch, settings.max_batch, settings.max_queue, metrics)
    metrics.bind(scheduler)
    engine = switch.engine
    # the HTTP side tokenizes with its own copy: a fast tokenizer must not be used from two threads
    tokenizer = copy.deepcopy(switch.base.tokenizer)
    context = int(getattr(switch.base.model.config, "max_position_embeddings", 0) or 0)
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(scheduler.stop)

    app = FastAPI(title="loraswitch", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-LoRA server with automatic routing.")
    app.state.switch, app.state.scheduler, app.state.settings, app.state.metrics = switch, scheduler, settings, metrics
    app.add_middleware(_Gate, settings=settings, metrics=metrics)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown endpoint {request.method} {request.url.path}"
        err = errors.for_status(exc.status_code, message)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = errors.server_error(f"internal error: {type(exc).__name__}")
        return JSONResponse(err.body(), status_code=500)

    # ------------------------------------------------------------------ helpers
    def resolve_model(model: str, route: str | None) -> tuple[str, str | None]:
        if model.startswith("auto:"):  # "auto:arrow" = model "auto" with router "arrow"
            model, route = "auto", route or model.split(":", 1)[1]
        if model == "auto":
            if route is not None and route not in ROUTER_NAMES:
                raise bad_request(f"unknown router {route!r}; choose one of {', '.join(ROUTER_NAMES)}", "route",
                                  "invalid_route")
            return model, route
        if route not in (None, "none"):
            raise bad_request(f"route={route!r} only applies to model 'auto' ({model!r} is explicit)", "route")
        if model != "base" and model not in engine.names:
            raise errors.model_not_found(model, ["auto", "base", *engine.names])
        return model, None

    def make_job(body: _Common, prompt_ids: list[int], text: str, param: str,
                 part_prompt: Callable[[str], list[int]] | None = None) -> Job:
        body.check_supported()
        model, route = resolve_model(body.model, body.router())
        if not prompt_ids:
            raise bad_request("the prompt is empty", param)
        n = len(prompt_ids)
        if n > settings.max_prompt_tokens:
            raise bad_request(f"the prompt has {n} tokens; this server accepts at most {settings.max_prompt_tokens}",
                              param, "context_length_exceeded")
        room = context - n if context else settings.max_new_tokens
        if room < 1:
            raise bad_request(f"the prompt has {n} tokens and fills the model's context of {context}", param,
                              "context_length_exceeded")
        limit = body.limit()
        if limit is not None and limit > settings.max_new_tokens:
            raise bad_request(f"max_tokens={limit} exceeds this server's limit of {settings.max_new_tokens}",
                              "max_tokens", "max_tokens_exceeded")
        if limit is not None and limit > room:
            raise bad_request(f"the prompt ({n} tokens) plus max_tokens={limit} exceeds the model's context of "
                              f"{context} tokens", "max_tokens", "context_length_exceeded")
        max_tokens = limit if limit is not None else min(settings.default_max_tokens, settings.max_new_tokens, room)
        temperature = body.temperature if body.temperature is not None else settings.default_temperature
        return Job(prompt_ids=list(prompt_ids), route_text=text, model=model, route=route, max_tokens=max_tokens,
                   temperature=temperature, top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
                   stop=body.stops(), stream=bool(body.stream), trace=body.want_trace(), part_prompt=part_prompt)

    async def run(job: Job, body: _Common, kind: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.sink = lambda k, payload: loop.call_soon_threadsafe(queue.put_nowait, (k, payload))
        deadline = loop.time() + settings.timeout
        scheduler.submit(job)  # 429 / 503 before any byte of a stream is sent

        async def next_event():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(queue.get(), remaining)

        if job.stream:
            return StreamingResponse(stream(job, body, kind, next_event), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                try:
                    event, payload = await next_event()
                except TimeoutError:
                    scheduler.cancel(job)
                    raise errors.timeout(settings.timeout) from None
                if event == "done":
                    return JSONResponse(respond(job, body, kind, payload))
                if event == "error":
                    raise payload
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise

    def respond(job: Job, body: _Common, kind: str, res: JobResult) -> dict:
        usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                 "total_tokens": res.prompt_tokens + res.completion_tokens}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text}, "logprobs": None,
                      "finish_reason": res.finish_reason}
            head = {"id": f"chatcmpl-{job.id}", "object": "chat.completion"}
        else:
            choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}
            head = {"id": f"cmpl-{job.id}", "object": "text_completion"}
        return {**head, "created": int(time.time()), "model": res.model, "system_fingerprint": None,
                "choices": [choice], "usage": usage, "routing": res.routing, "batch": res.batch}

    async def stream(job: Job, body: _Common, kind: str, next_event):
        created = int(time.time())
        cid = f"chatcmpl-{job.id}" if kind == "chat" else f"cmpl-{job.id}"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None = None, model: str | None = None, **extra) -> dict:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": cid, "object": obj, "created": created, "model": model or body.model, "system_fingerprint": None,
                    "choices": [choice], **extra}

        try:
            if kind == "chat":
                first = chunk(None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
            while True:
                try:
                    event, payload = await next_event()
                except TimeoutError:
                    scheduler.cancel(job)
                    yield _sse(errors.timeout(settings.timeout).body())
                    yield "data: [DONE]\n\n"
                    return
                if event == "start":
                    continue
                if event == "delta":
                    extra = {"routing": {"tokens": payload["tokens"]}} if "tokens" in payload else {}
                    yield _sse(chunk(payload["text"], **extra))
                elif event == "done":
                    res: JobResult = payload
                    yield _sse(chunk(None if kind == "chat" else "", res.finish_reason, res.model,
                                     routing=res.routing, batch=res.batch))
                    if body.include_usage():
                        yield _sse({"id": cid, "object": obj, "created": created, "model": res.model, "choices": [],
                                    "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                                              "total_tokens": res.prompt_tokens + res.completion_tokens}})
                    yield "data: [DONE]\n\n"
                    return
                elif event == "error":
                    yield _sse(payload.body())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not job.finished:  # client gone or timed out: free the row
                scheduler.cancel(job)

    # ------------------------------------------------------------------ /v1
    v1 = APIRouter(prefix="/v1")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = body.conversation()
        try:
            ids = chat_ids(tokenizer, messages)
        except Exception as exc:  # a template that refuses the roles/order
            raise bad_request(f"the model's chat template refused these messages: {exc}", "messages") from None
        def part_prompt(part: str) -> list[int]:
            return chat_ids(tokenizer, with_route_text(messages, part))

        return await run(make_job(body, ids, route_text(messages), "messages", part_prompt), body, "chat")

    @v1.post("/completions")
    async def completions(body: CompletionRequest):
        prompt = body.prompt_input()
        if isinstance(prompt, str):
            ids, text = tokenizer(prompt)["input_ids"], prompt
        else:
            vocab = len(tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
            ids, text = prompt, tokenizer.decode(prompt, skip_special_tokens=True)
        return await run(make_job(body, ids, text, "prompt"), body, "completion")

    def model_card(name: str, kind: str) -> dict:
        return {"id": name, "object": "model", "created": started_at, "owned_by": "loraswitch", "kind": kind,
                "root": switch.base.name}

    def model_cards() -> list[dict]:
        return [model_card("auto", "router"), model_card("base", "base")] + [model_card(n, "adapter") for n in engine.names]

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": model_cards()}

    @v1.get("/models/{model:path}")
    async def get_model(model: str):
        for card in model_cards():
            if card["id"] == model:
                return card
        raise errors.model_not_found(model, [c["id"] for c in model_cards()])

    def adapter_card(adapter) -> dict:
        return {"id": adapter.name, "object": "adapter", "ranks": adapter.ranks, "targets": adapter.target_modules,
                "size_bytes": adapter.size_bytes, "path": str(adapter.path) if adapter.path else None,
                "warnings": list(adapter.warnings)}

    @v1.get("/adapters")
    async def list_adapters():
        return {"object": "list", "data": [adapter_card(a) for a in list(engine.adapters.values())],
                "refused": [{"id": name, "reason": err.reason} for name, err in list(engine.errors.items())]}

    def admin_allowed() -> None:
        if not settings.allow_adapter_admin:
            raise APIError(403, "adapter management is disabled on this server", "permission_error", None,
                           "admin_disabled")

    @v1.post("/adapters", status_code=201)
    async def load_adapter(body: AdapterLoadRequest):
        admin_allowed()
        name = body.name or Path(body.path).name
        if name in engine.adapters:
            raise APIError(409, f"adapter {name!r}: an adapter of that name is already loaded (DELETE it first)",
                           "conflict_error", "name", "adapter_exists")
        try:
            adapter = await anyio.to_thread.run_sync(engine.load_adapter, body.path, body.name)
        except AdapterError as exc:
            raise bad_request(str(exc), "path", "invalid_adapter") from None
        except OSError as exc:
            raise bad_request(f"adapter {name!r}: cannot read {body.path!r}: {exc}", "path", "invalid_adapter") from None
        log.info("loaded adapter %s from %s", adapter.name, body.path)
        return adapter_card(adapter)

    @v1.delete("/adapters/{name}")
    async def remove_adapter(name: str):
        admin_allowed()
        if name not in engine.adapters:
            raise APIError(404, f"adapter {name!r} is not loaded (loaded: {', '.join(engine.names) or 'none'})",
                           "invalid_request_error", "name", "adapter_not_found")
        try:
            await anyio.to_thread.run_sync(engine.remove_adapter, name)
        except AdapterError as exc:  # removed by a concurrent request meanwhile
            raise APIError(404, str(exc), "invalid_request_error", "name", "adapter_not_found") from None
        log.info("removed adapter %s", name)
        return {"id": name, "object": "adapter", "deleted": True}

    app.include_router(v1)

    # ------------------------------------------------------------------ operations
    @app.get("/healthz")
    async def healthz():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "worker stopped", "model": switch.base.name, "adapters": engine.names,
                "queue_depth": scheduler.queue_depth, "running": scheduler.running,
                "scheduler": {**scheduler.stats, "max_batch": scheduler.max_batch, "max_queue": scheduler.max_queue,
                              "recent": list(scheduler.recent)[-8:]}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    async def ui():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    return app
