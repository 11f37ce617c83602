"""Bearer tokens: the admin token, and API keys for inference that can rotate without a restart.

Every comparison is constant-time over the raw bytes a client sent (`hmac.compare_digest` on bytes
never raises, whatever the bytes), and no token is ever logged or echoed.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr
from starlette.requests import Request

from branchserve.server.errors import RequestError

RELOAD_EVERY_S = 1.0  # how often the keys file's modification time is checked
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def presented(request: Request) -> bytes | None:
    """The bearer token of `Authorization: Bearer <token>`, as the bytes the client sent."""
    return bearer(request.headers.get("authorization", ""))


def bearer(authorization: str) -> bytes | None:
    """The token of an `Authorization` value `Bearer <token>`, if it is one."""
    scheme, _, token = authorization.partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" and token.strip() else None


def matches(token: bytes | None, keys: Sequence[bytes]) -> bool:
    hits = [hmac.compare_digest(token or b"", key) for key in keys]  # every key, so timing says nothing
    return token is not None and any(hits)


class Keys:
    """API keys from the settings plus a file of one key per line, re-read when the file changes."""

    def __init__(self, keys: Sequence[SecretStr], file: Path | None) -> None:
        self.fixed = [k.get_secret_value().encode() for k in keys]
        self.file, self.file_mtime, self.checked = file, -1.0, 0.0
        self.from_file: list[bytes] = []
        self._reload()

    @property
    def required(self) -> bool:
        return bool(self.fixed or self.file)

    def _reload(self) -> None:
        if self.file is None:
            return
        mtime = os.stat(self.file).st_mtime
        if mtime != self.file_mtime:
            lines = self.file.read_text().splitlines()
            self.from_file = [line.strip().encode() for line in lines if line.strip() and not line.startswith("#")]
            self.file_mtime = mtime

    def check(self, request: Request) -> None:
        """401 unless the request carries one of the keys (nothing to check when none are configured)."""
        if self.required:  # else not even the header is read
            self.check_token(presented(request))

    def check_token(self, token: bytes | None) -> None:
        """As `check`, for a bearer token presented some other way (gRPC metadata)."""
        if not self.required:
            return
        now = time.monotonic()
        if now - self.checked > RELOAD_EVERY_S:
            self.checked = now
            with contextlib.suppress(OSError):  # a file being replaced: keep the keys read last
                self._reload()
        if not matches(token, self.fixed + self.from_file):
            raise RequestError(401, "missing or unknown API key: send Authorization: Bearer <key>", CHALLENGE)


class AdminToken:
    """The admin endpoints' token; without one they are disabled."""

    def __init__(self, token: SecretStr | None) -> None:
        self.token = token.get_secret_value().encode() if token else None

    def check(self, request: Request) -> None:
        if self.token is None:
            raise RequestError(403, "admin endpoints are disabled: start the server with BRANCHSERVE_ADMIN_TOKEN set")
        if not matches(presented(request), [self.token]):
            raise RequestError(401, "admin endpoint: missing or wrong bearer token", CHALLENGE)
