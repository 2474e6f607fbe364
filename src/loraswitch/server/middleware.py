"""What every request passes before a handler: the Host allow-list, the body-size cap, the API
key on /v1/* (and on the API docs), and request counts and latency by endpoint and status."""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraswitch.server.errors import APIError
from loraswitch.server.metrics import Metrics, endpoint_label

DOC_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def default_hosts(bound: str) -> list[str]:
    """The Host names a server bound to `bound` answers without an API key: that address and
    localhost. A wildcard bind (0.0.0.0, ::) cannot know its public names: any host ("*")."""
    if bound in ("0.0.0.0", "::", "*", ""):
        return ["*"]
    return sorted({bound.strip("[]").lower(), *LOCAL_HOSTS})


def host_name(header: str) -> str:
    """'example.org:8000' -> 'example.org', '[::1]:8000' -> '::1' (lowercased)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-body: an HTTPException, so FastAPI's body parsing passes it on
    (it turns other exceptions into a vague 400) and the error handlers answer 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than this server's limit of {limit} bytes "
                              "(--max-body-bytes).", {"Connection": "close"})


class Gate:
    """Pure ASGI middleware (so the latency of a stream runs to its last byte, which a
    `BaseHTTPMiddleware` would not see).

    Without an API key, a browser page from any site could reach a server on 127.0.0.1 through
    DNS rebinding (its own name resolving to 127.0.0.1) and load or delete adapters: requests
    whose Host is not in `allowed_hosts` get 421. Bodies over `max_body_bytes` get 413 from the
    Content-Length header, or as soon as a chunked body passes the limit, before any parsing."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, allowed_hosts: list[str] | None = None,
                 max_body_bytes: int | None = None):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.allowed = None if api_key or not allowed_hosts or "*" in allowed_hosts else \
            {host_name(h) for h in allowed_hosts}
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = endpoint_label(path)
        started = time.perf_counter()
        status = 500
        sent = False

        async def send_status(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status, sent = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await JSONResponse(refusal.body(), status_code=refusal.status, headers=refusal.headers)(
                    scope, receive, send_status)
                return
            try:
                await self.app(scope, self._limited(receive) if self.max_body else receive, send_status)
            except BodyTooLarge:
                if not sent:
                    await self._reply(self._too_large(), scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    @staticmethod
    async def _reply(err: APIError, scope, receive, send) -> None:
        await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)

    def _refusal(self, scope, path: str) -> APIError | None:
        headers = dict(scope.get("headers", []))
        if self.allowed is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                return APIError(421, "This server does not answer for that Host header (set --allowed-hosts or "
                                "--api-key to serve other names).", "invalid_request_error", None, "host_not_allowed")
        length = headers.get(b"content-length")
        if self.max_body and length is not None and (not length.isdigit() or int(length) > self.max_body):
            return self._too_large()
        protected = path.startswith("/v1/") or path in DOC_PATHS
        if self.api_key and protected and not self._authorized(headers.get(b"authorization", b"")):
            return APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                            "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server's limit of {self.max_body} bytes "
                        "(--max-body-bytes).", "invalid_request_error", None, "request_too_large",
                        {"Connection": "close"})

    def _limited(self, receive):
        """`receive` that stops a body without Content-Length once it passes the limit."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return counted

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
