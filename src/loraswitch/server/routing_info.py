"""The `routing` object of a response: how an answer was routed, in the shape clients read."""

from __future__ import annotations

from collections import Counter
from typing import Any

from loraswitch.generate import Generation
from loraswitch.switch.request import Request


def answered_adapters(model: str, summary: dict) -> list[str]:
    """The adapters that answered, from a policy summary (explicit policies have none)."""
    chosen = summary.get("adapter", None if model == "base" else model)
    items = chosen if isinstance(chosen, list) else [chosen]
    out: list[str] = []
    for a in items:
        if a and a != "base" and a not in out:
            out.append(a)
    return out


def tokens_by_adapter(entries: list[dict]) -> dict[str, int]:
    """How many generated tokens each adapter (its top weight) wrote; "base" for none. Part
    separators of a multi-part answer were written by nobody and are not counted."""
    return dict(Counter((max(e["adapters"], key=e["adapters"].get) if e.get("adapters") else "base")
                        for e in entries if not e.get("separator")))


def token_trace(tokenizer, token_ids: list[int], entries: list[dict]) -> list[dict]:
    """The response's per-token trace: index, token id and text, and the token's routing entry."""
    pieces = tokenizer.convert_ids_to_tokens(token_ids)
    return [{"index": i, "token_id": t, "token": tokenizer.convert_tokens_to_string([p]) if p is not None else "",
             **{k: v for k, v in e.items() if k not in ("token_id", "token")}}
            for i, (t, p, e) in enumerate(zip(token_ids, pieces, entries))]


def routing_info(request: Request, answer: Generation, tokenizer=None) -> dict[str, Any]:
    """requested, router, adapter(s), confidence, the router's scores / reason / parts, events,
    tokens_by_adapter; with a `tokenizer`, the per-token trace."""
    model, summary = request.model, answer.routing or {}
    entries = answer.trace[: len(answer.token_ids)]
    out: dict[str, Any] = {
        "requested": model,
        "router": summary.get("router"),
        "adapter": summary.get("adapter", None if model == "base" else model),
        "confidence": summary.get("confidence", 1.0),
        **{k: v for k, v in summary.items() if k not in ("router", "adapter", "confidence")},
        "adapters": answered_adapters(model, summary),
        "events": answer.events,
        "tokens_by_adapter": tokens_by_adapter(entries),
    }
    if model == "auto" and request.route:
        out["route"] = request.route
    if request.allow is not None:
        out["allow"] = list(request.allow)
    if request.deny:
        out["deny"] = list(request.deny)
    if tokenizer is not None:
        out["trace"] = token_trace(tokenizer, answer.token_ids, entries)
    return out
