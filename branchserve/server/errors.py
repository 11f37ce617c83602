"""Errors a client caused, and the JSON shape of every error answer: `{"detail": "..."}` on the native
API, `{"error": "..."}` under /v2, as the Open Inference Protocol has it."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse


class RequestError(ValueError):
    """A request the server will not answer as sent; `message` is safe to show the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_key(path: str) -> str:
    """The field an error answer to a request for `path` puts its message in."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, key: str = "detail"
) -> JSONResponse:
    return JSONResponse({key: message}, status, headers=headers)
