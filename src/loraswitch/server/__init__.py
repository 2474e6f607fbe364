"""OpenAI-compatible HTTP server: batched multi-LoRA generation with routing, for many clients.

`create_app(switch, settings)` builds the FastAPI app (tests run it on a tiny model);
`loraswitch serve` / `python -m loraswitch.server` runs it with uvicorn. See docs/server.md.
"""

from loraswitch.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
