"""The OpenAI-compatible HTTP server: `create_app(switch, settings)` builds the FastAPI app.

Endpoints: POST /v1/chat/completions (`serving_chat`), POST /v1/completions
(`serving_completion`), GET /v1/models and the adapter library (`serving_models`), GET /healthz,
GET /metrics, GET /ui (`ops`). The server keeps only HTTP concerns — parsing, auth, the bounded
queue and its worker (`scheduler`), SSE, errors, metrics; every answer is produced by the
library (`Switch.run`). See docs/server.md.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from loraswitch.server import errors, ops, serving_chat, serving_completion, serving_models, serving_shifts
from loraswitch.server.metrics import Metrics
from loraswitch.server.middleware import Gate, default_hosts
from loraswitch.server.scheduler import Scheduler
from loraswitch.server.state import ServerSettings, ServerState

__all__ = ["ServerSettings", "create_app"]


def create_app(switch, settings: ServerSettings | None = None) -> FastAPI:
    """The app for `switch` (a `loraswitch.switch.Switch`); the worker starts with the app."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    scheduler = Scheduler(switch, settings.max_batch, settings.max_queue, metrics,
                          max_parts=min(settings.max_parts, settings.max_batch), continuous=settings.continuous)
    metrics.bind(scheduler)
    st = ServerState(switch, settings, metrics, scheduler)
    serving_shifts.install(st)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(scheduler.stop)
            st.prep.shutdown(wait=False, cancel_futures=True)

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="loraswitch", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-LoRA server with automatic routing.", **docs)
    app.state.server = st
    app.state.switch, app.state.scheduler, app.state.settings, app.state.metrics = switch, scheduler, settings, metrics
    hosts = settings.allowed_hosts if settings.allowed_hosts is not None else default_hosts("127.0.0.1")
    app.add_middleware(Gate, api_key=settings.api_key, metrics=metrics, allowed_hosts=hosts,
                       max_body_bytes=settings.max_body_bytes)
    errors.install(app)
    for module in (serving_chat, serving_completion, serving_models, serving_shifts, ops):
        app.include_router(module.router)
    app.mount("/ui/static", StaticFiles(directory=ops.STATIC_DIR), name="ui-static")
    return app
