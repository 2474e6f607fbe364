"""The ingress: one light deployment (no model) in front of the replicas.

It checks what the single server's `Gate` checks (Host, body size, API key), then forwards each
request whole to a replica: a request naming an adapter goes, by Serve's model multiplexing, to a
replica that serves it; `auto` and `base` go to the least busy replica, which routes the request
once, with its own router, as the single server does (routing needs the base model's forward
pass: routing here would mean a third copy of the model on the ingress). A replica that dies
before its answer began is retried on another (`ATTEMPTS`); when none answers, a clear 503 — a
stream whose replica dies after it began ends with an error event, never a hang.

Adapter changes are answered by one replica, then logged for all (`cluster.Library`) and awaited
until every live replica applied them; /metrics and /healthz aggregate the replicas' reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from loraswitch.server import errors
from loraswitch.server.metrics import CONTENT_TYPE, Metrics
from loraswitch.server.middleware import Gate
from loraswitch.server.ray_serve.asgi import Forwarded
from loraswitch.server.ray_serve.cluster import merge_metrics

log = logging.getLogger("loraswitch.server.ray")
ATTEMPTS = 4  # replicas tried for one request before answering 503
RETRY_PAUSE_S = 0.5  # Serve needs a moment to stop routing to a dead replica
SETTLE_S = 60.0  # how long an adapter change waits for every live replica
UNROUTED = ("auto", "base")
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


@serve.ingress()
class Ingress:
    """A Serve deployment class: `replicas` is the replicas' handle, `library` the cluster's
    `Library` actor, `gate` the `Gate` arguments (api_key, allowed_hosts, max_body_bytes)."""

    def __init__(self, replicas, library, gate: dict):
        self.replicas, self.library, self.gate = replicas, library, gate
        self.metrics = Metrics()
        self.retries = 0  # requests sent again because their replica failed before answering

    def __serve_build_asgi_app__(self):
        http = FastAPI(title="loraswitch (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
        http.add_api_route("/v1/chat/completions", self.complete, methods=["POST"])
        http.add_api_route("/v1/completions", self.complete, methods=["POST"])
        http.add_api_route("/v1/adapters", self.load_adapter, methods=["POST"])
        http.add_api_route("/v1/adapters/{name}", self.remove_adapter, methods=["DELETE"])
        http.add_api_route("/v1/models", self.models, methods=["GET"])
        http.add_api_route("/metrics", self.prometheus, methods=["GET"])
        http.add_api_route("/healthz", self.healthz, methods=["GET"])
        http.add_api_route("/{path:path}", self.anything,  # the replica's answer (its 404 / 405 shape too)
                           methods=["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])
        return Gate(http, metrics=self.metrics, **self.gate)

    # ------------------------------------------------------------------ requests
    async def complete(self, raw: Request):
        req = await forwarded(raw)
        try:
            body = json.loads(req.body)
            model, stream = body.get("model"), bool(body.get("stream"))
        except (ValueError, AttributeError, RecursionError):  # the replica answers the 400 / 422 the server would
            model, stream = None, False
        placed = model if isinstance(model, str) and model not in UNROUTED and not model.startswith("auto:") else ""
        return await self.relay(req, placed, stream)

    async def anything(self, raw: Request, path: str):
        return await self.relay(await forwarded(raw), "", False)

    async def relay(self, req: Forwarded, model: str = "", stream: bool = False) -> Response:
        """`req` answered by a replica (one serving `model` when it names an adapter); retried on
        another while nothing of the answer has reached the client."""
        handle = self.replicas.options(stream=True, **({"multiplexed_model_id": model} if model else {}))
        failure = None
        for attempt in range(ATTEMPTS):
            gen = handle.forward.remote(req)
            try:
                head = await gen.__anext__()
                if not stream or head["status"] != 200:
                    body = b"".join([chunk async for chunk in gen])
                    return Response(body, status_code=head["status"], headers=plain(head["headers"]))
                first = await opening(gen)
            except Exception as exc:  # the replica died or went away: nothing was sent yet
                failure = exc
                self.retries += 1
                log.warning("replica failed before answering (try %d of %d): %s", attempt + 1, ATTEMPTS, exc)
                gen.cancel()
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            return StreamingResponse(rest(first, gen), status_code=head["status"], headers=plain(head["headers"]))
        err = errors.unavailable(f"no replica could answer after {ATTEMPTS} tries ({type(failure).__name__}); "
                                 "retry shortly")
        return JSONResponse(err.body(), status_code=err.status, headers={"Retry-After": "1"})

    # ------------------------------------------------------------------ the library, cluster-wide
    async def load_adapter(self, raw: Request):
        req = await forwarded(raw)
        answer = await self.relay(req)
        if answer.status_code != 201:
            return answer
        return await self.everywhere(answer, {"op": "load", "body": json.loads(req.body)})

    async def remove_adapter(self, raw: Request, name: str):
        answer = await self.relay(await forwarded(raw))
        if answer.status_code not in (200, 202):
            return answer
        return await self.everywhere(answer, {"op": "remove", "name": name})

    async def everywhere(self, answer: Response, op: dict) -> Response:
        """Log `op` for every replica and wait until the live ones applied it; the answer says
        how many did and which (if any) are still behind."""
        version = await self.library.append.remote(op)
        deadline = time.monotonic() + SETTLE_S
        while (behind := await self.library.behind.remote(version)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        live = await self.library.live.remote()
        body = json.loads(answer.body)
        body["replicas"] = {"applied": len(live) - len(behind), "pending": behind}
        return JSONResponse(body, status_code=answer.status_code)

    async def models(self, raw: Request):
        """A replica's model list (every replica knows the whole library), each adapter with the
        live replicas that hold it in their layers now (`replicas`)."""
        answer = await self.relay(await forwarded(raw))
        if answer.status_code != 200:
            return answer
        live = await self.library.live.remote()
        body = json.loads(answer.body)
        for card in body.get("data", []):
            if card.get("kind") == "adapter":
                card["replicas"] = sorted(r for r, rep in live.items() if card["id"] in rep["health"].get("resident", []))
        return JSONResponse(body)

    # ------------------------------------------------------------------ operations
    async def prometheus(self):
        live = await self.library.live.remote()
        reports = {r: rep["metrics"] for r, rep in live.items()}
        # the ingress counts every request the replicas count too: under names of its own, so a
        # sum over loraswitch_requests_total counts each answered request once
        reports["ingress"] = self.metrics.render().replace(b"loraswitch_", b"loraswitch_ingress_")
        return Response(merge_metrics(reports), media_type=CONTENT_TYPE)

    async def healthz(self):
        live = await self.library.live.remote()
        ok = any(rep["health"].get("alive") for rep in live.values())
        return JSONResponse({"status": "ok" if ok else "no live replica", "retries": self.retries, "replicas": {
            r: rep["health"] for r, rep in sorted(live.items())}}, status_code=200 if ok else 503)


async def forwarded(raw: Request) -> Forwarded:
    return Forwarded(raw.method, raw.url.path, raw.url.query.encode(), list(raw.headers.raw), await raw.body())


def plain(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The replica's response headers, less those that describe its own connection."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.lower() not in HOP_HEADERS}


async def opening(gen) -> bytes:
    """A stream's chunks up to the first that carries answer text, an end or an error, held
    back: the role chunk comes at once, and a replica that died after it but before any text
    left the stream failed where a retry could answer it. Holding it costs the client nothing
    (the text's time to first token is the same)."""
    held = b""
    while True:
        try:
            chunk = await gen.__anext__()
        except StopAsyncIteration:
            return held
        held += chunk
        if says_something(chunk):
            return held


def says_something(chunk: bytes) -> bool:
    """Whether an SSE chunk holds answer text, a finish, an error or the end (anything not the
    role-only opening chunk)."""
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        try:
            event = json.loads(data)
        except ValueError:  # [DONE], or something this does not know: send it on
            return True
        if not isinstance(event, dict) or "error" in event:
            return True
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text") or choice.get("finish_reason"):
                return True
    return False


async def rest(first: bytes, gen):
    """The rest of a stream; a replica lost mid-stream ends it with an error event."""
    if first:
        yield first
    try:
        async for chunk in gen:
            yield chunk
    except Exception as exc:
        log.warning("replica failed mid-stream: %s", exc)
        err = errors.unavailable("the replica answering this stream failed; retry the request")
        yield f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n".encode()
