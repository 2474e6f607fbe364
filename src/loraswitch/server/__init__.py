"""OpenAI-compatible HTTP server: batched multi-LoRA generation with routing, for many clients.

`create_app(switch, settings)` builds the FastAPI app (tests run it on a tiny model);
`loraswitch serve` / `python -m loraswitch.server` runs it with uvicorn. See docs/server.md.
"""

from __future__ import annotations

from loraswitch.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {"ServerSettings": "app", "create_app": "app"})
