"""GET /v1/models, and the adapter library: GET/POST /v1/adapters, DELETE /v1/adapters/{name}.

Loading and unloading run off the event loop; an adapter unloaded while requests decode with it
keeps its weights until they finish (the worker pins the library for each batch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends

from loraswitch.library import AdapterError
from loraswitch.server import errors
from loraswitch.server.errors import APIError, bad_request
from loraswitch.server.protocol import AdapterLoadRequest
from loraswitch.server.state import ServerState, state

log = logging.getLogger("loraswitch.server")
router = APIRouter(prefix="/v1")


def model_cards(st: ServerState) -> list[dict]:
    def card(name: str, kind: str) -> dict:
        return {"id": name, "object": "model", "created": st.started_at, "owned_by": "loraswitch", "kind": kind,
                "root": st.switch.base.name}

    return [card("auto", "router"), card("base", "base")] + [card(n, "adapter") for n in st.engine.names]


@router.get("/models")
async def list_models(st: ServerState = Depends(state)):
    return {"object": "list", "data": model_cards(st)}


@router.get("/models/{model:path}")
async def get_model(model: str, st: ServerState = Depends(state)):
    cards = model_cards(st)
    for card in cards:
        if card["id"] == model:
            return card
    raise errors.model_not_found(model, [c["id"] for c in cards])


def adapter_card(adapter) -> dict:
    return {"id": adapter.name, "object": "adapter", "ranks": adapter.ranks, "targets": adapter.target_modules,
            "size_bytes": adapter.size_bytes, "path": str(adapter.path) if adapter.path else None,
            "warnings": list(adapter.warnings)}


@router.get("/adapters")
async def list_adapters(st: ServerState = Depends(state)):
    engine = st.engine
    return {"object": "list", "data": [adapter_card(a) for a in list(engine.adapters.values())],
            "refused": [{"id": name, "reason": err.reason} for name, err in list(engine.errors.items())]}


def _admin_allowed(st: ServerState) -> None:
    if not st.settings.allow_adapter_admin:
        raise APIError(403, "adapter management is disabled on this server", "permission_error", None,
                       "admin_disabled")


@router.post("/adapters", status_code=201)
async def load_adapter(body: AdapterLoadRequest, st: ServerState = Depends(state)):
    _admin_allowed(st)
    name = body.name or Path(body.path).name
    if name in st.engine.adapters:
        raise APIError(409, f"adapter {name!r}: an adapter of that name is already loaded (DELETE it first)",
                       "conflict_error", "name", "adapter_exists")
    try:
        adapter = await anyio.to_thread.run_sync(st.engine.load_adapter, body.path, body.name)
    except AdapterError as exc:
        raise bad_request(str(exc), "path", "invalid_adapter") from None
    except OSError as exc:
        raise bad_request(f"adapter {name!r}: cannot read {body.path!r}: {exc}", "path", "invalid_adapter") from None
    log.info("loaded adapter %s from %s", adapter.name, body.path)
    return adapter_card(adapter)


@router.delete("/adapters/{name}")
async def remove_adapter(name: str, st: ServerState = Depends(state)):
    _admin_allowed(st)
    engine = st.engine
    if name not in engine.adapters:
        raise APIError(404, f"adapter {name!r} is not loaded (loaded: {', '.join(engine.names) or 'none'})",
                       "invalid_request_error", "name", "adapter_not_found")
    try:
        await anyio.to_thread.run_sync(engine.remove_adapter, name)
    except AdapterError as exc:  # removed by a concurrent request meanwhile
        raise APIError(404, str(exc), "invalid_request_error", "name", "adapter_not_found") from None
    log.info("removed adapter %s", name)
    return {"id": name, "object": "adapter", "deleted": True}
