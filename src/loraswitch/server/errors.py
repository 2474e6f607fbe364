"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any


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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(404, f"The model {model!r} does not exist. Available: {', '.join(known)}", "invalid_request_error",
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
