"""The HTTP/1.1 connection, guarded: header limits, deadlines to finish sending, and refusals at the door.

uvicorn's httptools protocol accepts headers of any size (a 16 MiB header was read whole) and
waits forever for a client that sends part of a request. This subclass

* answers 431 and closes once a request's line and headers pass `max_header_bytes`;
* gives every request `request_timeout_s` from its first byte to its last (408 and close after),
  and a new connection as long to start one;
* stamps when a request's last byte arrived (`READY_AT` in the ASGI scope), so admission can judge
  how long it waited for the event loop or a worker;
* answers a predict request 503 + Retry-After straight from the connection, before any of the
  ASGI stack runs, when admission says the server is overloaded: a refusal must cost far less
  than an answer, or refusing cannot protect anything;
* sends each response's head together with its body (`HeadWithBody`).

It relies on uvicorn's `HttpToolsProtocol` internals (callbacks and `cycle`); `pyproject.toml`
bounds uvicorn's version, and tests/test_hardening.py covers every path.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Hashable
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

READY_AT = "branchserve.ready_at"
TIMED_OUT = "branchserve.timed_out"


def _canned(status: str, message: str, extra: str = "", close: bool = False) -> bytes:
    """An answer written by the connection itself; its body suits both APIs (native `detail`, OIP `error`)."""
    body = b'{"detail":"' + message.encode() + b'","error":"' + message.encode() + b'"}'
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


class Refused(Exception):
    """Raised inside a parser callback: answer `response` and close the connection."""

    def __init__(self, response: bytes) -> None:
        self.response = response


class Door(enum.Enum):
    """What the connection does with a request whose headers have arrived."""

    PASS = "not a predict request: not counted"
    ADMIT = "a predict request, counted from its last byte to its answer"
    REFUSE = "a predict request refused at once"


PredictModel = Callable[[bytes], Hashable | None]
"""The model a POST to this URL asks a prediction of (as the application names it, passed back to
`refuse`), or None for any other request."""


class Guard:
    """What the protocol asks the application: limits, which requests are predictions, whether to
    refuse one now (`refuse(model)` also counts the refusal), and whom to tell when a counted
    request has arrived whole and when it has been answered."""

    def __init__(
        self,
        max_header_bytes: int,
        request_timeout_s: float,
        predict_model: PredictModel,
        refuse: Callable[[Any], bool],
        arrived: Callable[[], None],
        left: Callable[[], None],
    ) -> None:
        self.max_header_bytes, self.request_timeout_s = max_header_bytes, request_timeout_s
        self.predict_model, self.refuse, self.arrived, self.left = predict_model, refuse, arrived, left
        self.too_large = _canned(
            "431 Request Header Fields Too Large",
            f"request line and headers exceed {max_header_bytes} bytes",
            close=True,
        )
        self.timed_out = _canned(
            "408 Request Timeout", f"request not received within {request_timeout_s:g} s", close=True
        )
        self.overloaded = _canned("503 Service Unavailable", "overloaded: try again shortly", "retry-after: 1\r\n")


_GUARD: Guard | None = None


def install(guard: Guard) -> None:
    """The guard of this process's application: one app per server process (and per worker)."""
    global _GUARD
    _GUARD = guard


class HeadWithBody:
    """A response's transport that sends the head with the body's first bytes. uvicorn writes them
    separately: two sends, and a client woken twice, once for headers it cannot use yet. A head
    with no body after it (an answer to HEAD) goes when the response completes (`flush`)."""

    def __init__(self, cycle: RequestResponseCycle, transport: asyncio.Transport) -> None:
        self._cycle, self._transport = cycle, transport
        self._head: bytes | None = None
        self._head_seen = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif self._cycle.response_started and not self._head_seen:  # the head (a 100 Continue comes before)
            self._head, self._head_seen = data, True
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with this process's `Guard` applied (see `install`); pass the
    class as `uvicorn.run(..., http=GuardedProtocol)`, also to worker processes."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if _GUARD is None:
            raise RuntimeError("no connection guard installed in this process: call transport.install")
        self.guard: Guard = _GUARD
        self.header_bytes = 0
        self.door = Door.PASS
        self.counted: set[RequestResponseCycle] = set()  # received whole, not yet answered
        self.deadline: asyncio.TimerHandle | None = None

    @property
    def refused(self) -> bool:
        return self.door is Door.REFUSE

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        for _ in self.counted:
            self.guard.left()
        self.counted.clear()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.guard.request_timeout_s, self._time_out)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _time_out(self) -> None:
        """The client took too long to send a request: answer 408 (unless an answer has begun) and close."""
        self.deadline = None
        if self.transport.is_closing():
            return
        cycle: RequestResponseCycle | None = self.cycle  # None before a connection's first request
        if self.refused or (cycle is not None and cycle.response_started and not cycle.response_complete):
            self.transport.close()  # an answer is already written or on its way
            return
        if cycle is not None and not cycle.response_complete:
            cycle.scope[TIMED_OUT] = True  # type: ignore[literal-required]
            cycle.disconnected = True  # the application's receive() now says http.disconnect
            cycle.message_event.set()
        self.transport.write(self.guard.timed_out)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, Refused):
                self.transport.write(e.__context__.response)
                self.transport.close()
                return
            self._invalid()
        except httptools.HttpParserError:
            self._invalid()
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _invalid(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_bytes = 0
        self.door = Door.PASS
        self._arm()  # from its first byte, the request has `request_timeout_s` to arrive whole

    def on_url(self, url: bytes) -> None:
        self._add_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._add_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _add_header_bytes(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > self.guard.max_header_bytes:
            raise Refused(self.guard.too_large)

    def on_headers_complete(self) -> None:
        model = self.guard.predict_model(self.url) if self.parser.get_method() == b"POST" else None
        if model is not None:
            cycle: RequestResponseCycle | None = self.cycle
            idle = cycle is None or cycle.response_complete  # never answer ahead of a pipelined request
            self.door = Door.REFUSE if idle and self.guard.refuse(model) else Door.ADMIT
            if self.refused:
                self.transport.write(self.guard.overloaded)
                return
        super().on_headers_complete()
        new: RequestResponseCycle | None = self.cycle  # None before a connection's first request
        if new is not None and new.scope is self.scope:  # a new cycle (none for an upgrade)
            transport = new.transport = HeadWithBody(new, self.transport)  # type: ignore[assignment]
            completed = new.on_response

            def on_response() -> None:
                transport.flush()
                completed()

            new.on_response = on_response

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if self.refused:
            if self.parser.should_keep_alive():
                self._arm()  # idle until the next request, as after any answer
            else:
                self.transport.close()
            return
        self.scope[READY_AT] = time.perf_counter()  # type: ignore[literal-required]
        if self.door is Door.ADMIT:
            self._count(self.cycle)
        super().on_message_complete()

    def _count(self, cycle: RequestResponseCycle) -> None:
        """Count `cycle` in until its answer is written (or its connection is lost)."""
        self.counted.add(cycle)
        self.guard.arrived()
        answered = cycle.on_response

        def on_response() -> None:
            if cycle in self.counted:
                self.counted.discard(cycle)
                self.guard.left()
            answered()

        cycle.on_response = on_response
