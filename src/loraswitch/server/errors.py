"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraswitch.library import AdapterError
from loraswitch.switch.mixture import MixtureError
from loraswitch.switch.request import InvalidOutput, RouterUnavailable

log = logging.getLogger("loraswitch.server")


class APIError(Exception):
    """An error the server answers with: HTTP status plus the OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, known: list[str], refused: str | None = None) -> APIError:
    """404 for a `model` the server does not serve; `refused`: why the library refused it."""
    why = f"was refused when the library loaded ({refused})" if refused else "does not exist"
    return APIError(404, f"The model {model!r} {why}. Available: {', '.join(known)}", "invalid_request_error",
                    "model", "model_not_found")


def queue_full(depth: int) -> APIError:
    return APIError(429, f"The server is at capacity ({depth} requests waiting); retry shortly.", "rate_limit_error",
                    None, "queue_full", headers={"Retry-After": "1"})


def timeout(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within the server's {seconds:g} s timeout.", "timeout_error",
                    None, "request_timeout")


def server_error(message: str) -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def unavailable(message: str) -> APIError:
    return APIError(503, message, "server_error", None, "unavailable")


STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


def for_status(status: int, message: str) -> APIError:
    return APIError(status, message, STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"))


def from_library(exc: Exception, model: str, known: list[str]) -> APIError:
    """The answer to a request the library could not serve (its `Failed` event)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterError):
        if exc.name == model:  # unloaded while the request waited
            return model_not_found(model, known)
        return bad_request(str(exc), "model", "invalid_adapter")
    if isinstance(exc, RouterUnavailable):
        return bad_request(str(exc), "route", "router_unavailable")
    if isinstance(exc, MixtureError):  # checked again as the batch starts (`switch.rows.asks_what_exists`)
        return bad_request(str(exc), "model", exc.code)
    if isinstance(exc, InvalidOutput):  # the adapter's fault, not a crash (422: retrying gives the same NaN)
        return APIError(422, str(exc), "invalid_request_error", "model", "invalid_model_output")
    return server_error(f"generation failed: {type(exc).__name__}: {exc}")


def validation_error(exc: RequestValidationError) -> APIError:
    """A FastAPI `RequestValidationError` as the OpenAI error the client expects."""
    problems, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            where = f" at position {loc[0]}" if loc else ""
            return bad_request(f"We could not parse the JSON body of your request: {detail}{where}", None, "invalid_json")
        field = ".".join(loc)
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return bad_request("The request body must be a JSON object (send Content-Type: application/json).", None,
                               "invalid_json")
        param = param or field or None
        problems.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return bad_request("Invalid request: " + "; ".join(problems), param, "invalid_request")


def install(app) -> None:
    """Every failure answers with the OpenAI error object: ours, validation, HTTP and crashes."""

    def reply(err: APIError, headers=None) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=headers or err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return reply(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown endpoint {request.method} {request.url.path}"
        err = for_status(exc.status_code, message)
        if exc.status_code == 400:  # the body could not be parsed (bad UTF-8, absurd nesting or numbers)
            err.code = "invalid_json"
        if exc.status_code in (404, 405):
            err.code = "unknown_endpoint" if exc.status_code == 404 else "method_not_allowed"
        if exc.status_code == 413:
            err.code = "request_too_large"
        return reply(err, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return reply(server_error(f"internal error: {type(exc).__name__}"))
