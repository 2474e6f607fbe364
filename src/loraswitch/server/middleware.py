"""The API key on /v1/*, and request counts and latency by endpoint and status."""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse

from loraswitch.server.errors import APIError
from loraswitch.server.metrics import Metrics, endpoint_label


class Gate:
    """Pure ASGI middleware (so the latency of a stream runs to its last byte, which a
    `BaseHTTPMiddleware` would not see)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

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
            if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
                err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                               "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send_status)
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
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
