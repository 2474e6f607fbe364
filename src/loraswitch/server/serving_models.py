"""GET /v1/models, and the adapter library: GET/POST /v1/adapters, DELETE /v1/adapters/{name}.

Loading and unloading happen in the worker thread between batches (`Scheduler.call_between_rounds`),
so no answer in flight sees the library change: an adapter DELETEd while requests decode with it
(named, or chosen by `auto`) stays until they finish, and the DELETE answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from loraswitch.library import AdapterError, validate_name
from loraswitch.routing.added import forget_head
from loraswitch.server import errors
from loraswitch.server.errors import APIError, bad_request
from loraswitch.server.protocol import AdapterLoadRequest
from loraswitch.server.state import ServerState, state

log = logging.getLogger("loraswitch.server")
router = APIRouter(prefix="/v1")
DELETE_WAIT_S = 1.0  # a DELETE waits this long for the removal, then answers 202


def model_cards(st: ServerState) -> list[dict]:
    def card(name: str, kind: str) -> dict:
        return {"id": name, "object": "model", "created": st.started_at, "owned_by": "loraswitch", "kind": kind,
                "root": st.switch.base.name}

    return [card("auto", "router"), card("base", "base")] + [card(n, "adapter") for n in st.served_adapters]


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
    routed = _routing_all(st)
    return {"object": "list", "data": [{**adapter_card(a), "resident": a.name in engine.slots,
                                        **({"status": "removing"} if a.name in st.removing else {}),
                                        **({"routing": routed[a.name]} if a.name in routed else {})}
                                       for a in list(engine.adapters.values())],
            "refused": [{"id": name, "reason": err.reason} for name, err in list(engine.errors.items())]}


def _admin_allowed(st: ServerState) -> None:
    if not st.settings.allow_adapter_admin:
        raise APIError(403, "adapter management is disabled on this server", "permission_error", None,
                       "admin_disabled")


@router.post("/adapters", status_code=201)
async def load_adapter(body: AdapterLoadRequest, st: ServerState = Depends(state)):
    _admin_allowed(st)
    if body.name is not None:  # a bad name is the name's fault, whatever the folder holds
        try:
            validate_name(body.name)
        except AdapterError as exc:
            raise bad_request(str(exc), "name", "invalid_adapter") from None
    name = body.name or Path(body.path).name
    if name in st.engine.adapters:
        pending = " is being removed; retry when it has left GET /v1/adapters" if name in st.removing else \
            " is already loaded (DELETE it first)"
        raise APIError(409, f"adapter {name!r}: an adapter of that name{pending}", "conflict_error", "name",
                       "adapter_exists")

    def install():  # in the worker, between batches: no answer in flight sees the library change
        adapter = st.engine.load_adapter(body.path, body.name, examples=body.examples)
        return adapter, auto_routing(st, adapter.name)

    try:
        adapter, routing = await asyncio.wrap_future(st.scheduler.call_between_rounds(install))
    except AdapterError as exc:
        if exc.missing:  # say nothing about which paths exist on this machine
            raise bad_request(f"cannot load adapter {name!r} from {body.path!r}: not a readable adapter folder",
                              "path", "invalid_adapter") from None
        raise bad_request(str(exc), "path", "invalid_adapter") from None
    except OSError:
        raise bad_request(f"cannot load adapter {name!r} from {body.path!r}: not a readable adapter folder", "path",
                          "invalid_adapter") from None
    log.info("loaded adapter %s from %s", adapter.name, body.path)
    card = adapter_card(adapter)
    card["routing"] = routing
    if routing.get("note"):
        card["warnings"].append(f"model 'auto': {routing['note']}")
    return card


def _routing_all(st: ServerState) -> dict[str, dict]:
    """How `auto` routes each adapter (trained / from N examples / zero-shot, since when)."""
    try:
        return st.switch.router("auto").describe(st.engine)
    except Exception:  # the router cannot be built: requests to auto will say why
        return {}


def auto_routing(st: ServerState, name: str) -> dict:
    """How `auto` routes the new adapter, so a 201 says so when auto fell back to Arrow (which
    loading an adapter the trained selector never saw used to cause silently)."""
    try:
        router = st.switch.router("auto")
        described = router.describe(st.engine).get(name, {}) if hasattr(router, "describe") else {}
        note = getattr(router, "note", "")
        return {**described, **({"note": note} if note else {})}
    except Exception as exc:  # the router cannot be built: requests to auto will say why
        return {"note": f"router 'auto' is unavailable: {exc}"}


@router.delete("/adapters/{name}")
async def remove_adapter(name: str, st: ServerState = Depends(state)):
    """New requests for `name` get 404 at once; it leaves the library between batches, so the
    requests decoding with it now (explicit or routed to it) finish with it. Answers 200 when
    that happened within a moment, else 202 with status "removing"."""
    _admin_allowed(st)
    engine = st.engine
    if name not in engine.adapters or name in st.removing:
        raise APIError(404, f"adapter {name!r} is not loaded (loaded: {', '.join(st.served_adapters) or 'none'})",
                       "invalid_request_error", "name", "adapter_not_found")
    st.removing.add(name)

    def remove():
        try:
            engine.remove_adapter(name)
            forget_head(st.switch.router_dir, name)
        finally:
            st.removing.discard(name)
        log.info("removed adapter %s", name)

    future = asyncio.wrap_future(st.scheduler.call_between_rounds(remove))
    done, _ = await asyncio.wait({future}, timeout=DELETE_WAIT_S)
    if done:
        with contextlib.suppress(AdapterError):  # removed by a concurrent request meanwhile: gone all the same
            future.result()
        return {"id": name, "object": "adapter", "deleted": True, "status": "removed"}
    return JSONResponse({"id": name, "object": "adapter", "deleted": True, "status": "removing",
                         "detail": "new requests for it get 404 now; it leaves the library when the batch decoding "
                                   "now ends (its requests finish with it)"}, status_code=202)
