"""Errors a client caused, and the one JSON shape every error answer has: `{"detail": "..."}`."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse


class RequestError(ValueError):
    """A request the server will not answer as sent; `message` is safe to show the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status, headers=headers)
