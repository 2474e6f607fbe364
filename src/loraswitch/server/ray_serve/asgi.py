"""Call an ASGI app in-process and get its response as messages: how a replica answers the
requests the ingress forwards, through the very app `loraswitch serve` runs (its validation,
errors, streaming and metrics), without a second HTTP hop inside the cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class Forwarded:
    """An HTTP request as it travels from the ingress to a replica (plain data: Ray pickles it)."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


async def call(app, req: Forwarded) -> AsyncIterator[dict | bytes]:
    """Run `req` through `app`: yields the head first ({"status", "headers"}), then each body
    chunk as the app sends it (a stream's events one by one). Closing the iterator early tells
    the app its client went away, so a cancelled stream frees its batch rows."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
             "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "query_string": req.query,
             "root_path": "", "headers": req.headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            await out.put({"status": message["status"], "headers": list(message.get("headers", []))})
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await out.put(bytes(message["body"]))
            if not message.get("more_body", False):
                await out.put(None)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while (item := await out.get()) is not None:
            yield item
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
