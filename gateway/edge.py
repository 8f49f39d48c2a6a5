"""The proxy listener's defences against slow, idle, oversized and malformed clients.

aiohttp's server reads request heads without a deadline (a client sending one byte a
second holds its connection, and a file descriptor, for as long as it likes), keeps idle
connections for about an hour, accepts heads of about a megabyte, takes any number of
connections, and answers a malformed request with a plain-text page after logging a
full traceback. ``EdgeServer`` is its low-level server with those gaps closed, as
nginx's and Envoy's defaults close them:

- **header timeout**: a request head must be complete within ``header_timeout``
  seconds of its first byte (of connecting, for a connection's first request); past it
  the client gets ``408 request_timeout`` (nothing if it sent nothing) and the
  connection is closed;
- **idle timeout**: a kept-alive connection with no next request ``idle_timeout``
  seconds after its last answer is closed (aiohttp's own keep-alive timer);
- **head size**: request line and headers over ``max_header_bytes`` get ``431
  headers_too_large``; the head is refused as soon as that many bytes arrived without
  ending it, never held whole first;
- **connections**: past ``max_connections`` open client connections, a new one is
  closed at once (before anything is read from it), so the process keeps file
  descriptors for its backends and its admin listener;
- **malformed requests**: a JSON ``400 bad_request`` (or 431), one log line at debug
  level, and a warning that sums them up at most once a minute (``RejectLog``);
- **drain**: ``shutdown`` is bounded by its timeout in total (aiohttp waits up to the
  timeout for running handlers and then as long again after cancelling them).

The gap between two pieces of a request *body* is bounded where the body is read
(``gateway.pipeline.body``): only there is it known whether the gateway is waiting for
the client or the client for the gateway (a backend slow to read applies back-pressure).

Everything here runs per connection or per rejected request; a request that arrives
whole on a kept-alive connection costs a few attribute reads and additions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gateway.pipeline.errors import (
    BAD_REQUEST,
    HEADERS_TOO_LARGE,
    REQUEST_TIMEOUT,
    GatewayError,
    error_body,
)
from gateway.writes import BatchedServer, WriteBatch
from gateway.writes import _BatchedRequestHandler as BatchedRequestHandler

log = logging.getLogger("gateway.edge")

# RequestHandler internals this module relies on: checked when the server is built, so
# that an aiohttp release that changes them fails at start, not on the first request.
_HANDLER_INTERNALS = (
    "_messages", "_waiter", "_request_count", "_next_keepalive_close_time", "_lingering_time"
)  # fmt: skip

try:  # the parser's queue entry for a request it could not parse
    from aiohttp.web_protocol import _ErrInfo
except ImportError:  # pragma: no cover (checked at start by EdgeServer)
    _ErrInfo = None  # type: ignore[assignment,misc]

SUMMARY_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """``server.*`` limits of the proxy listener (see ``gateway.config.ServerConfig``)."""

    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 10_000


class RejectLog:
    """Requests (and connections) turned away at the edge: counted by reason (``count``,
    the metric), each logged at debug level, and summed up in one warning at most every
    ``interval`` seconds, so that a flood of bad requests cannot flood the log."""

    def __init__(
        self,
        count: Callable[[str], None] | None = None,
        *,
        interval: float = SUMMARY_SECONDS,
        logger: logging.Logger = log,
    ) -> None:
        self._count = count
        self.interval = interval
        self._log = logger
        self._pending: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._window_started = 0.0

    def __call__(self, reason: str, detail: str) -> None:
        if self._count is not None:
            self._count(reason)
        self._log.debug("rejected (%s): %s", reason, detail)
        pending = self._pending
        pending[reason] = pending.get(reason, 0) + 1
        if self._timer is None:
            self._window_started = time.monotonic()
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a test calling it directly): summed at flush()
                return
            self._timer = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Log the summary of what was rejected since the last one (if anything was)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        if not pending:
            return
        seconds = time.monotonic() - self._window_started
        total = sum(pending.values())
        by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(pending.items()))
        self._log.warning(
            "turned away %d requests or connections in %.0fs (%s); each is logged at "
            "debug level and counted in gateway_requests_rejected_total",
            total, seconds, by_reason,
        )  # fmt: skip


class HeadersTooLarge(BadHttpMessage):
    """A request head past ``max_header_bytes``."""


class EdgeServer(BatchedServer):
    """aiohttp's low-level server (with batched writes) and the limits above."""

    def __init__(
        self,
        handler: Any,
        *,
        writes: WriteBatch,
        limits: EdgeLimits,
        rejections: RejectLog,
        new_request_id: Callable[[], str],
        request_id_header: str = "X-Request-ID",
        **kwargs: Any,
    ) -> None:
        size = limits.max_header_bytes
        super().__init__(
            handler,
            writes=writes,
            # aiohttp's own timer closes idle kept-alive connections.
            keepalive_timeout=limits.idle_timeout,
            # Its per-line limits would answer 400 before the total is reached: the
            # total (counted here) is the limit, the count of fields bounds the work.
            max_line_size=size,
            max_field_size=size,
            max_headers=max(128, size // 64),
            # Bodies are relayed as sent: decoding them would hand the backend a body
            # that no longer matches its Content-Encoding (and let a small compressed
            # body expand without bound here).
            auto_decompress=False,
            **kwargs,
        )
        missing = [name for name in _HANDLER_INTERNALS if name not in _handler_slots()]
        if _ErrInfo is None or missing or not isinstance(getattr(self, "_connections", None), dict):
            raise RuntimeError(
                "this aiohttp's request handler lacks what gateway.edge relies on "
                f"({', '.join(missing) or '_ErrInfo or _connections'}); install a version "
                "this gateway supports (see pyproject.toml)"
            )
        self.limits = limits
        self.rejections = rejections
        self.new_request_id = new_request_id
        self.request_id_header = request_id_header

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        if len(self._connections) >= self.limits.max_connections:
            self.rejections("max_connections", "a new connection past server.max_connections")
            return _Refused()
        return _EdgeRequestHandler(self, loop=self._loop, **self._kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """Let running requests finish for up to ``timeout`` seconds *in total*, then
        close every connection that is left (aiohttp alone can take twice the timeout)."""
        connections = list(self._connections)
        if connections:
            waits = [asyncio.ensure_future(conn.shutdown(timeout)) for conn in connections]
            _, late = await asyncio.wait(waits, timeout=timeout)
            for conn in connections:
                task = conn._task_handler
                if task is not None and not task.done():
                    task.cancel()
                conn.force_close()
            for wait in late:
                wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)
        self._connections.clear()
        self.rejections.flush()


def close_after_answer(request: web.BaseRequest) -> None:
    """Close ``request``'s connection as soon as its answer is out, without the usual
    wait for the rest of an unread body (aiohttp's lingering close): for a body that
    stopped coming, there is nothing to wait for."""
    protocol = request.protocol
    if isinstance(protocol, _EdgeRequestHandler):
        protocol._lingering_time = 0.0
        protocol._keepalive = False


def answer_is_a_stream(request: web.BaseRequest) -> None:
    """``request``'s answer is a stream that may stay open for minutes (an LLM's
    tokens), thousands at a time: its connection's timers for a next head and for
    idleness have nothing to time until the answer ends, so they are let go of now,
    not when they next fire (a timer is about 0.6 KB). aiohttp arms its idle timer
    again when the answer ends, and a head that comes in pieces arms a head timer."""
    protocol = request.protocol
    if isinstance(protocol, _EdgeRequestHandler):
        protocol.drop_idle_timers()


def _handler_slots() -> set[str]:
    slots: set[str] = set()
    for cls in RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
    return slots


class _Refused(asyncio.Protocol):
    """A connection past the cap: closed as soon as it is made, nothing read or sent."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


# The base class's, called without super()'s lookup on every read.
_data_received = BatchedRequestHandler.data_received


class _EdgeRequestHandler(BatchedRequestHandler):
    """One client connection: aiohttp's handler, with the head's deadline and size."""

    __slots__ = (
        "_body", "_carry", "_edge", "_head_deadline", "_head_timer", "_max_head", "_pending"
    )  # fmt: skip

    def __init__(self, manager: EdgeServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = manager
        self._max_head = manager.limits.max_header_bytes
        # Bytes received of a head not complete yet (a lower bound: see data_received).
        self._pending = 0
        # Bytes that may belong to the next head: the chunk that completed the last one
        # may carry the start of another (a pipelined request), of unknown length.
        self._carry = 0
        self._body: StreamReader | None = None  # the last request's body, while it comes
        self._head_deadline = 0.0  # loop time by which the head must be complete; 0: none
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A new connection's first head is due within the header timeout of connecting.
        self._head_deadline = self._loop.time() + self._edge.limits.header_timeout
        self._head_timer = self._loop.call_at(self._head_deadline, self._head_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_deadline = 0.0
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Runs for every read: the usual request (its whole head in one read, on a
        # kept-alive connection) costs a few attribute reads and writes here.
        if self._force_close or self._close:
            return
        body = self._body
        before = self._request_count
        if body is not None and not body.is_eof():  # the last request's body
            _data_received(self, data)
            if self._request_count != before:  # and a next (pipelined) head after it
                self._heads_ended(before, len(data), len(data))
            return
        pending = self._pending + len(data)
        _data_received(self, data)
        if self._request_count == before:  # no head ended in this read
            if pending > self._max_head:
                self._refuse_head(pending)
                return
            self._pending = pending
            if self._head_deadline == 0.0:
                self._start_head_clock()
            return
        self._heads_ended(before, self._carry + pending, len(data))

    def _heads_ended(self, before: int, bound: int, size: int) -> None:
        """One or more heads ended in a read of ``size`` bytes; each is at most ``bound``
        bytes, so the usual request (its whole head in one read, under the limit) needs
        no counting."""
        if bound > self._max_head:
            self._check_head_sizes(self._request_count - before)
        messages = self._messages
        last = messages[-1][1] if messages else EMPTY_PAYLOAD
        if last.is_eof():
            self._body = None
            self._carry = size  # the read may end with the start of a next head
        else:
            self._body = last
            self._carry = 0
        self._pending = 0
        if self._head_deadline:
            self._head_deadline = 0.0

    def drop_idle_timers(self) -> None:
        """See answer_is_a_stream. Only while a request is being answered."""
        if self._head_deadline == 0.0 and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        idle = self._keepalive_handle
        if idle is not None:
            idle.cancel()
            self._keepalive_handle = None

    def _start_head_clock(self) -> None:
        loop = self._loop
        self._head_deadline = loop.time() + self._edge.limits.header_timeout
        if self._head_timer is None:  # a pending timer is due earlier and re-arms itself
            self._head_timer = loop.call_at(self._head_deadline, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline == 0.0 or self._force_close or self.transport is None:
            return
        loop = self._loop
        now = loop.time()
        waiter = self._waiter
        if now >= deadline and (waiter is None or waiter.done()):
            # A request is being handled and the next one (pipelined) trickles in behind
            # it: its clock starts once the handler is free to read it.
            deadline = self._head_deadline = now + self._edge.limits.header_timeout
        if now < deadline:
            self._head_timer = loop.call_at(deadline, self._head_expired)
            return
        self._head_timed_out()

    def _head_timed_out(self) -> None:
        self._edge.rejections(
            "header_timeout",
            f"{self._peer()}: no complete request head within "
            f"{self._edge.limits.header_timeout:g}s ({self._pending} bytes of it came)",
        )
        transport = self.transport
        if transport is not None and self._pending > 0:  # a client that sent nothing gets nothing
            transport.write(
                self._raw_error(REQUEST_TIMEOUT, "the request head did not arrive in time")
            )
        self._head_deadline = 0.0
        self.force_close()

    def _process_keepalive(self) -> None:
        # aiohttp's idle timer: count the connections it closes.
        waiter = self._waiter
        if (
            not self._force_close
            and self._keepalive
            and waiter is not None
            and not waiter.done()
            and self._loop.time() >= self._next_keepalive_close_time
        ):
            if self._pending > 0:  # a head is on its way, too slowly
                self._head_timed_out()
                return
            self._edge.rejections(
                "idle_timeout",
                f"{self._peer()}: no request within {self._keepalive_timeout:g}s of the last",
            )
        super()._process_keepalive()

    def _refuse_head(self, size: int) -> None:
        """A head past the limit before it even ended: answer 431 and stop reading."""
        limit = self._edge.limits.max_header_bytes
        error = HeadersTooLarge(f"more than {limit} bytes of request head ({size} so far)")
        self._queue_error(431, error)

    def _check_head_sizes(self, count: int) -> None:
        """The exact size of each head that just ended; the first one too large, and all
        after it, are replaced by a 431."""
        messages = self._messages
        limit = self._edge.limits.max_header_bytes
        new = len(messages) - count
        for index in range(max(new, 0), len(messages)):
            message = messages[index][0]
            if isinstance(message, _ErrInfo):
                continue
            size = _head_size(message)
            if size > limit:
                while len(messages) > index:
                    messages.pop()
                self._queue_error(
                    431, HeadersTooLarge(f"a request head of {size} bytes (limit {limit})")
                )
                return

    def _queue_error(self, status: int, error: BadHttpMessage) -> None:
        entry = _ErrInfo(status=status, exc=error, message=str(error))
        self._messages.append((entry, EMPTY_PAYLOAD))
        self._close = True  # nothing more is read; the connection ends after the answer
        self._head_deadline = 0.0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (or whose handler failed): a
        gateway-made JSON error, logged in one line (see RejectLog), not a traceback."""
        error, reason = _classify(status, exc)
        detail = f"{self._peer()}: {message or exc or error.code}"
        if error.status >= 500:
            log.error("request from %s failed: %s", self._peer(), exc, exc_info=exc)
        else:
            self._edge.rejections(reason, detail)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was under way: only closing is left")
        request_id = self._edge.new_request_id()
        response = web.Response(
            status=error.status,
            body=error_body(error, _client_message(error, exc), request_id),
            content_type="application/json",
            headers={self._edge.request_id_header: request_id},
        )
        response.force_close()
        return response

    def _raw_error(self, error: GatewayError, message: str) -> bytes:
        """A whole error answer as bytes, for when no request object exists."""
        request_id = self._edge.new_request_id()
        body = error_body(error, message, request_id)
        head = (
            f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{self._edge.request_id_header}: {request_id}\r\nConnection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def _peer(self) -> str:
        peer = self.peername
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer or "client")


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}
_INTERNAL_ERROR = GatewayError(500, "internal_error")


def _classify(status: int, exc: BaseException | None) -> tuple[GatewayError, str]:
    """The gateway-made error (and the rejection reason) for what aiohttp hands over."""
    if isinstance(exc, HeadersTooLarge | LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
    ):
        return HEADERS_TOO_LARGE, "headers_too_large"
    if status < 500 or isinstance(exc, RequestPayloadError | BadHttpMessage):
        return BAD_REQUEST, "bad_request"
    return _INTERNAL_ERROR, "internal_error"


def _client_message(error: GatewayError, exc: BaseException | None) -> str:
    if error is HEADERS_TOO_LARGE:
        return "the request head (request line and headers) is too large"
    if error is BAD_REQUEST:
        text = getattr(exc, "message", None) or str(exc or "")
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"malformed request: {first}"[:200] if first else "malformed request"
    return "the gateway failed to handle the request"


def _head_size(message: Any) -> int:
    """Bytes of a parsed request head: its request line and header lines."""
    size = len(message.method) + len(message.path) + 12  # " ", " HTTP/1.1\r\n" and "\r\n"
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4  # ": " and "\r\n"
    return size
