"""A lean HTTP/1.1 client for the proxy's upstream calls.

aiohttp's ``ClientSession`` is a general client: per request it builds a request object,
a payload wrapper, a writer task, timers and trace hooks, and copies headers several
times. A reverse proxy needs much less: write one request head (and the body) on a
pooled keep-alive connection, parse the answer with a C parser (httptools, llhttp), and
hand the body on chunk by chunk. Under load that halves what the upstream side of a
request costs, which is most of what the gateway adds over a bare proxy.

What it keeps from a full client: connection pooling with idle expiry, one transparent
retry when a reused keep-alive connection turns out to be closed (only for bodies that
can be sent again), read timeouts that bound the wait for the head and every gap between
body chunks, back-pressure both ways, chunked request bodies, TLS, and 1xx answers
skipped. What it leaves out on purpose: redirects, cookies, decompression, proxies.
"""

from __future__ import annotations

import asyncio
import enum
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, cast

import httptools

from gateway.writes import WriteBatch

# Pause reading from the backend while this much answer is buffered and not yet sent
# on to the client; resume below the low mark.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
IDLE_SECONDS = 30.0
MAX_IDLE_PER_ENDPOINT = 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_JOIN_BYTES = 16 * 1024


class UpstreamError(Exception):
    """The backend could not be reached or broke the exchange.

    ``reason`` is ``connect`` (no connection, or closed before any answer) or
    ``protocol`` (an answer that is not valid HTTP/1.1)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UpstreamTimeout(TimeoutError):
    """No head, or no next body chunk, within the read timeout."""


class ConnectError(UpstreamError):
    """No connection could be made: nothing of the request was sent, so it may go to
    another endpoint."""

    def __init__(self, message: str) -> None:
        super().__init__("connect", message)


class StaleConnection(ConnectError):
    """A kept-alive connection was found closed before any byte of an answer: on the
    premise of the pool's own retry (the backend had closed it before the request came),
    the request never reached the backend, and may be sent to another endpoint."""


class ConnectTimeout(UpstreamTimeout):
    """No connection within the connect timeout: nothing of the request was sent."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an endpoint's connections go, parsed once at config load."""

    host: str
    port: int
    tls: bool
    host_header: str  # "host" or "host:port", as the Host header should read
    # What the connection pool is keyed by. A str hashes once and compares in C; this
    # dataclass's own hash and == are Python calls, and == runs on every lookup when
    # many endpoints (one Origin each) share an address.
    key: str

    @classmethod
    def parse(cls, scheme: str, host: str, port: int | None) -> Origin:
        tls = scheme == "https"
        default = 443 if tls else 80
        real_port = port or default
        shown = host if real_port == default else f"{host}:{real_port}"
        if ":" in host and not host.startswith("["):  # IPv6 literal
            shown = f"[{host}]" if real_port == default else f"[{host}]:{real_port}"
        return cls(host, real_port, tls, shown, f"{'https' if tls else 'http'}://{shown}")


class _State(enum.Enum):
    """Where a connection is in its life: it decides what incoming bytes, a firing timer
    and a close mean. What the answer was is the exchange's (a close can come after a
    complete answer, whose reader must still see it end).

        IDLE --begin--> EXCHANGING --end of answer (of a HEAD answer: its head)--> DONE
        DONE --release, if the exchange is reusable--> IDLE (pooled); else CLOSED
        any state --close(), the backend's close, a failure--> CLOSED (final)

    The head's arrival is not a state of its own: nothing here acts on it but the head
    future the caller waits on, and the timer and a close treat both halves alike."""

    IDLE = "idle"  # open, between exchanges: just connected, or in the pool
    EXCHANGING = "exchanging"  # request written (a streamed body may go on), answer awaited
    DONE = "done"  # answer complete; the exchange stays attached until released
    CLOSED = "closed"  # by either side


# On Python 3.11 ``_State.DONE`` is an attribute lookup through the enum's metaclass, 70 ns
# (three times a module global, measured), and states are compared several times per
# request: the hot path uses these.
_IDLE: Final = _State.IDLE
_EXCHANGING: Final = _State.EXCHANGING
_DONE: Final = _State.DONE
_CLOSED: Final = _State.CLOSED


# What an exchange's ``chunks`` is until it has any: empty, never appended to (on_body
# makes a deque of its own first).
_NO_CHUNKS: Final[deque[bytes]] = deque(maxlen=0)


class _Exchange:
    """One request and its answer (uvicorn's ``RequestResponseCycle``): made new by
    ``_Connection.begin``, so nothing of one exchange leaks into the next, and kept by
    the UpstreamResponse, which reads the body from it."""

    __slots__ = (
        "body_sent",
        "buffered",
        "chunks",
        "complete",
        "error",
        "got_bytes",
        "head",
        "head_request",
        "raw_headers",
        "reason",
        "reusable",
        "sink",
        "sink_error",
        "status",
        "waiter",
    )

    def __init__(self, head: asyncio.Future[None], head_request: bool) -> None:
        # Resolved when the answer's head has arrived; failed with ``error``.
        self.head = head
        # No body follows a HEAD answer, whatever its Content-Length says.
        self.head_request = head_request
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        # Body received, not yet taken: made at the first chunk (a piped stream never
        # needs one, and thousands of them stay open).
        self.chunks: deque[bytes] = _NO_CHUNKS
        self.buffered = 0  # bytes in ``chunks``
        # The whole answer arrived. Unlike the connection's DONE this outlives a close
        # (the backend may close after answering): the reader still gets the end.
        self.complete = False
        self.reusable = False  # complete, keep-alive, not HEAD: see UpstreamResponse.release
        # Only a connection whose request went out whole can carry another: after an
        # early answer the backend may still be waiting for the rest of the body.
        self.body_sent = False
        # Any byte of an answer came back: then the request may have been acted on, and
        # is not sent again (see UpstreamClient.request).
        self.got_bytes = False
        self.error: BaseException | None = None  # why the exchange broke, if it did
        self.waiter: asyncio.Future[None] | None = None  # a reader waiting for body
        # Takes the body as it arrives, from on_body (UpstreamResponse.pipe); returns
        # False when its receiver is full. What it raised, for the reader to raise.
        self.sink: Callable[[bytes], bool] | None = None
        self.sink_error: Exception | None = None

    def wake(self) -> None:
        """Let a reader waiting in ``UpstreamResponse.chunks()`` look again."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _NoCallbacks:
    """A parser's protocol that wants no callbacks."""


# What a closed connection holds instead of its parser (see _Connection.connection_lost).
_NO_PARSER: Final = httptools.HttpResponseParser(_NoCallbacks())


class _Connection(asyncio.Protocol):
    """One keep-alive connection: the socket, its parser and read timer, its state, and
    the exchange it carries."""

    # Slots: read for every chunk of thousands of open streams, whose objects are no
    # longer in the CPU's caches (a dict's values are one more place to fetch).
    __slots__ = (
        "_deadline",
        "_timer",
        "_timer_at",
        "_write_ready",
        "client",
        "exchange",
        "idle_since",
        "loop",
        "origin",
        "parser",
        "read_timeout",
        "reading_paused",
        "state",
        "transport",
    )

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        # The exchange carried; while IDLE the last one (finished), or for a new connection
        # an empty finished one. Never None, so the parser's callbacks (run only while
        # EXCHANGING or DONE, from data_received) need no check for it on the hot path.
        self.exchange = _Exchange(self.loop.create_future(), head_request=False)
        self.exchange.complete = True
        self.idle_since = 0.0
        # Reading stops while the answer's unread body is above HIGH_WATER. Only ever
        # paused with body buffered, and a connection is pooled only once its exchange's
        # body is all taken (so resumed): it never carries a pause into the next exchange.
        self.reading_paused = False
        self.read_timeout = 0.0  # the current exchange's: see begin
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when _timer fires
        self._deadline = 0.0  # when the exchange times out if no more data comes
        self._write_ready: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, hence no isinstance check.
        # Writes after the first of a loop pass wait for its end, to go out together.
        self.transport = self.client.writes.wrap(cast(asyncio.Transport, transport))
        self.client._opened(self.origin.key)

    def data_received(self, data: bytes) -> None:
        if self.state is _IDLE:
            # Bytes on an idle connection: the backend is closing it or talking nonsense.
            self.close()
            return
        exchange = self.exchange
        exchange.got_bytes = True
        self._deadline = self.loop.time() + self.read_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(exchange, UpstreamError("protocol", "the backend switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(
                exchange, UpstreamError("protocol", f"invalid HTTP from the backend: {error}")
            )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.client._closed_one(self.origin.key)
            self.transport = None
        # The parser holds this connection's bound methods (its callbacks), and uvloop's
        # transport its protocol: cycles, through the exchange to its buffered body, that
        # only the cycle collector frees, which runs rarely (app.tune_gc). 1,000 aborted
        # downloads held 150 MB that way. Nothing is parsed after the close.
        self.parser = _NO_PARSER
        self.state = _CLOSED
        self._cancel_timer()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_exception(ConnectionResetError("backend closed the connection"))
        exchange = self.exchange
        if not exchange.complete and exc is None and _ends_at_close(exchange):
            # An answer without Content-Length or chunking (HTTP/1.0 style) ends where the
            # backend closes the connection: this is its end, not a failure.
            exchange.complete = True
            exchange.wake()
            return
        # Also after our own close(): whoever still waits on the exchange learns it ended.
        if not exchange.complete:
            self._fail(exchange, UpstreamError("connect", "the backend closed the connection"))

    def pause_writing(self) -> None:
        self._write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._write_ready = None

    async def drain(self) -> None:
        if self._write_ready is not None:
            await self._write_ready

    # --- httptools callbacks ---------------------------------------------------------------
    # The parser runs only inside data_received, so while EXCHANGING (or DONE, if the
    # backend sends more after a complete answer): ``self.exchange`` is the current one.

    def on_status(self, status: bytes) -> None:
        self.exchange.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.exchange.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        status = exchange.status = self.parser.get_status_code()
        if status < 200:
            if status >= 100 and status != 101:
                return  # informational: the real answer follows
            # 101 Switching Protocols (the gateway asked for no upgrade, and relaying one
            # would leave the client waiting on a protocol nobody speaks), or a status
            # line with no valid code: nothing a client could be given.
            self._fail(exchange, UpstreamError("protocol", _bad_status(status, exchange.reason)))
            return
        if status > 599:
            self._fail(exchange, UpstreamError("protocol", _bad_status(status, exchange.reason)))
            return
        head = exchange.head
        if not head.done():  # done already if the caller gave up (cancelled) the wait
            head.set_result(None)
        if exchange.head_request:
            # No body follows a HEAD answer, whatever its Content-Length says; the parser
            # does not know that, so this connection is not reused.
            self.state = _DONE
            exchange.complete = True
            exchange.wake()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange.head_request:
            return
        sink = exchange.sink
        if sink is not None:
            # Piped: handed on here, with no task switch per chunk (see pipe()).
            try:
                more = sink(body)
            except Exception as error:  # the receiving side's failure, not the backend's
                exchange.sink = None
                exchange.sink_error = error
                more = False
            if not more:
                if not self.reading_paused and self.transport:
                    self.transport.pause_reading()
                    self.reading_paused = True
                exchange.wake()  # the reader waits for the receiver to take more
            return
        chunks = exchange.chunks
        if chunks is _NO_CHUNKS:
            chunks = exchange.chunks = deque()
        chunks.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True
        # Checked here, not only in wake(): a small answer arrives whole before anyone
        # reads (waits on) its body, and this skips a call twice per request.
        if exchange.waiter is not None:
            exchange.wake()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        status = exchange.status
        if 100 <= status < 200 and status != 101:
            exchange.status = 0
            exchange.reason = ""
            exchange.raw_headers = []
            return
        self.state = _DONE
        exchange.complete = True
        exchange.reusable = not exchange.head_request and self.parser.should_keep_alive()
        # The timer is left to fire (it finds the connection DONE or IDLE, or re-arms for
        # the next exchange on this connection): see arm_timer.
        if exchange.waiter is not None:  # see on_body
            exchange.wake()

    # --- exchange --------------------------------------------------------------------------

    def begin(self, head_request: bool, read_timeout: float) -> _Exchange:
        """Start an exchange on this IDLE connection (its request is written next)."""
        exchange = self.exchange = _Exchange(self.loop.create_future(), head_request)
        self.state = _EXCHANGING
        self.read_timeout = read_timeout
        return exchange

    def _fail(self, exchange: _Exchange, error: BaseException) -> None:
        if exchange.error is None:
            exchange.error = error
        head = exchange.head
        if not head.done():
            head.set_exception(error)
            # Retrieved by whoever awaits it; mark it so an unawaited one is not logged.
            head.exception()
        exchange.wake()
        self.close()

    def arm_timer(self) -> None:
        """Fail the exchange if no data comes within ``read_timeout`` from now.

        A timer that will fire no later than the new deadline is kept: when it fires it
        re-arms for the deadline then current. So a keep-alive connection makes a timer
        about once per timeout, not once per exchange (a timer made and cancelled costs
        1 us, on every request)."""
        deadline = self._deadline = self.loop.time() + self.read_timeout
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._start_timer(deadline)

    def _start_timer(self, when: float) -> None:
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.state is not _EXCHANGING:
            return  # done, idle or closed since it was armed: nothing to time
        if self.reading_paused:  # the client is slow, not the backend: not a timeout
            self.arm_timer()
            return
        now = self.loop.time()
        if now < self._deadline:
            self._start_timer(self._deadline)
            return
        timeout = UpstreamTimeout(f"no data from the backend within {self.read_timeout:g}s")
        self._fail(self.exchange, timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def take_chunk(self, exchange: _Exchange) -> bytes:
        chunk = exchange.chunks.popleft()
        exchange.buffered -= len(chunk)
        if self.reading_paused and exchange.buffered < LOW_WATER and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
            self._deadline = self.loop.time() + self.read_timeout
        return chunk

    def resume(self) -> None:
        """Read again after a pause for a piped receiver that was full (see pipe())."""
        if self.reading_paused and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
            self._deadline = self.loop.time() + self.read_timeout

    async def wait_data(self, exchange: _Exchange) -> None:
        waiter = exchange.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            exchange.waiter = None

    def close(self) -> None:
        self._cancel_timer()
        if self.state is not _CLOSED:
            self.state = _CLOSED
            if self.transport is not None:
                self.transport.close()


def _bad_status(status: int, reason: str) -> str:
    if status == 101:
        return "the backend switched protocols (101), which the gateway does not relay"
    return f"the backend answered with an invalid status line ({status:03d} {reason})"


# The headers that say where an answer ends.
_FRAMING: Final = (b"content-length", b"transfer-encoding")


def _ends_at_close(exchange: _Exchange) -> bool:
    """Whether an answer whose head has arrived is delimited by the connection's close:
    no Content-Length and no Transfer-Encoding (RFC 9112 6.3, last rule)."""
    if exchange.status < 200 or exchange.error is not None or not exchange.head.done():
        return False
    if exchange.head_request or exchange.status in (204, 304):
        return False  # no body at all: complete already when the head came
    return all(name.lower() not in _FRAMING for name, _ in exchange.raw_headers)


class UpstreamResponse:
    """An answer whose head has arrived; the body is read with ``chunks()``.

    It reads its own exchange, and the connection only to take chunks (which may resume
    reading) and to hand it back or close it."""

    __slots__ = ("_conn", "_done", "_exchange", "headers", "reason", "status")

    def __init__(self, conn: _Connection, exchange: _Exchange) -> None:
        self._conn = conn
        self._exchange = exchange
        self._done = False
        self.status = exchange.status
        self.reason = exchange.reason
        self.headers = [
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in exchange.raw_headers
        ]

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def whole_body(self) -> bytes | None:
        """The whole body if it has already arrived in one piece, else None (then read it
        with ``chunks()``). A small answer usually comes in the same packet as its head:
        taken whole, it needs no loop, no per-chunk bookkeeping and no timer."""
        exchange = self._exchange
        if not exchange.complete or exchange.error is not None:
            return None
        chunks = exchange.chunks
        if not chunks:
            return b""
        if len(chunks) == 1:
            return self._conn.take_chunk(exchange)
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Raises UpstreamTimeout or UpstreamError mid-way."""
        conn = self._conn
        exchange = self._exchange
        while True:
            if exchange.chunks:
                yield conn.take_chunk(exchange)
                continue
            if exchange.complete:
                return
            if exchange.error is not None:
                raise exchange.error
            conn.arm_timer()
            await conn.wait_data(exchange)

    async def pipe(
        self, sink: Callable[[bytes], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """The body, chunk by chunk as it arrives, to ``sink``, called from the
        connection's own callback: no future, no task switch and no generator step per
        chunk, which is most of what relaying a small chunk (a token) costs in Python.
        ``sink`` returns False when its receiver is full: reading from the backend stops
        until ``drain()`` returns (which raises, should the receiver be gone). Returns
        at the end of the answer; raises as ``chunks()`` does. ``sink`` must not block.
        ``headers`` is empty from the first call on: a piped answer may stay open for
        minutes, thousands at a time, and of its head only what finding its end needs
        (_ends_at_close) is kept."""
        conn = self._conn
        exchange = self._exchange
        self.headers = []
        exchange.raw_headers = [
            (name, value) for name, value in exchange.raw_headers if name.lower() in _FRAMING
        ]
        while exchange.chunks:  # what came before
            if not sink(conn.take_chunk(exchange)):
                await drain()
        exchange.sink = sink
        try:
            while True:
                if exchange.sink_error is not None:
                    raise exchange.sink_error
                if exchange.complete:
                    return
                if exchange.error is not None:
                    raise exchange.error
                if conn.reading_paused:
                    await drain()
                    conn.resume()
                    continue
                conn.arm_timer()
                await conn.wait_data(exchange)
        finally:
            exchange.sink = None

    def release(self) -> None:
        """Done with the answer: a complete keep-alive exchange returns the connection."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        exchange = self._exchange
        # DONE: complete and still open.
        if conn.state is _DONE and exchange.reusable and exchange.body_sent and not exchange.chunks:
            conn.client._put_idle(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the answer (and its connection)."""
        self._done = True
        self._conn.close()


BodySource = bytes | AsyncIterator[bytes] | None


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the backends' endpoints."""

    def __init__(
        self, ssl_context: ssl_module.SSLContext | None = None, writes: WriteBatch | None = None
    ) -> None:
        # Shared with the gateway's server side, so that the pass's answers to clients
        # and requests to backends go out together.
        self.writes = writes if writes is not None else WriteBatch()
        self._idle: dict[str, deque[_Connection]] = {}  # by Origin.key
        self._open: dict[str, int] = {}  # open connections by Origin.key, idle or in use
        self._ssl = ssl_context
        self._closed = False

    def open_connections(self, origin: Origin) -> int:
        """Connections open to ``origin`` now, idle or in use."""
        return self._open.get(origin.key, 0)

    def _opened(self, key: str) -> None:
        self._open[key] = self._open.get(key, 0) + 1

    def _closed_one(self, key: str) -> None:
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: BodySource,
        *,
        content_length: int | None = None,
        connect_timeout: float,
        read_timeout: float,
        elsewhere: bool = False,
    ) -> UpstreamResponse:
        """Send a request and wait for the answer's head.

        ``headers`` must hold no framing (Content-Length, Transfer-Encoding) and no Host:
        they are written here. A streamed body is sent with ``content_length`` when it
        is known, chunked otherwise. Errors are UpstreamError, UpstreamTimeout, or
        whatever the body iterator raised. A pooled connection found closed is retried
        on a new one, or with ``elsewhere`` (the caller has other endpoints) raises
        StaleConnection: a backend that closed it may be going away altogether."""
        head = _request_head(method, target, origin.host_header, headers, body, content_length)
        replayable = not isinstance(body, AsyncIterator)
        for attempt in (1, 2):
            # The retry takes a new connection: the other pooled ones are as likely to be
            # dead (a backend that restarted closed them all).
            conn = self._take_idle(origin) if attempt == 1 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            exchange = conn.begin(method == "HEAD", read_timeout)
            try:
                return await self._send(conn, exchange, head, body, content_length is None)
            except UpstreamError:
                conn.close()
                # A pooled connection the backend had already closed: the request never
                # reached it, so sending it again on a new connection is safe.
                if reused and replayable and not exchange.got_bytes and attempt == 1:
                    if elsewhere:
                        raise StaleConnection(
                            f"a kept-alive connection to {origin.host}:{origin.port} was closed"
                        ) from None
                    continue
                raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    async def _send(
        self,
        conn: _Connection,
        exchange: _Exchange,
        head: bytes,
        body: BodySource,
        chunked: bool,
    ) -> UpstreamResponse:
        """Write the request of the exchange just begun on ``conn``; wait for the head."""
        transport = conn.transport
        assert transport is not None
        writer = None
        if body is None:
            transport.write(head)
            exchange.body_sent = True
        elif isinstance(body, bytes):
            if len(body) <= _JOIN_BYTES:
                transport.write(head + body)  # one segment for the usual small request
            else:
                transport.write(head)  # no copy of a large body just to join it
                transport.write(body)
            exchange.body_sent = True
        else:
            transport.write(head)
            # The backend may answer before it has read the whole body (an early error);
            # writing in its own task lets that answer through.
            writer = asyncio.create_task(_write_stream(conn, exchange, body, chunked))
        conn.arm_timer()
        try:
            if writer is None:
                await exchange.head
            else:
                await asyncio.wait((exchange.head, writer), return_when=asyncio.FIRST_COMPLETED)
                if writer.done() and writer.exception() is not None:
                    raise writer.exception()  # type: ignore[misc]
                await exchange.head
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            raise
        if writer is not None and not writer.done():
            # The head came first; the rest of the body keeps going. If it never finishes,
            # the connection is not reused (the exchange is not complete).
            writer.add_done_callback(_retrieve)
        return UpstreamResponse(conn, exchange)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        while idle:
            conn = idle.pop()  # most recently used first: warmest, least likely closed
            # conn.loop, not asyncio.get_running_loop(): on Python 3.11 the latter makes
            # a getpid() system call, which under load was 8 % of the gateway's CPU.
            if conn.state is _IDLE and conn.loop.time() - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    def _put_idle(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        key = conn.origin.key
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        elif len(idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.state = _IDLE
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    async def _connect(self, origin: Origin, limit: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl_module.SSLContext | None = None
        if origin.tls:
            tls = self._ssl or ssl_module.create_default_context()
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {origin.host}:{origin.port} within {limit:g}s"
            ) from None
        except OSError as error:
            raise ConnectError(
                f"cannot connect to {origin.host}:{origin.port}: {error.strerror or error}"
            ) from None
        return conn

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _write_stream(
    conn: _Connection, exchange: _Exchange, body: AsyncIterator[bytes], chunked: bool
) -> None:
    transport = conn.transport
    assert transport is not None
    # What the body's source raises (the client gone mid-upload, a body too large) goes
    # to the caller as it is: it is not the backend's failure.
    async for chunk in body:
        if conn.state is _CLOSED:
            return
        if not chunk:
            continue
        if chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            transport.write(chunk)
        try:
            await conn.drain()
        except ConnectionResetError:
            return  # the backend went away; the reader side reports it
    if conn.state is _CLOSED:
        return
    if chunked:
        transport.write(b"0\r\n\r\n")
    exchange.body_sent = True


_CRLF = "\r\n"


def _request_head(
    method: str,
    target: str,
    host: str,
    headers: Iterable[tuple[str, str]],
    body: BodySource,
    content_length: int | None,
) -> bytes:
    # "name: value" lines joined by C loops (map over str.join), not one f-string each.
    fields = "\r\n".join(map(": ".join, headers))
    if isinstance(body, bytes):
        framing = f"Content-Length: {len(body)}\r\n"
    elif body is not None:
        if content_length is not None:
            framing = f"Content-Length: {content_length}\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n"
    elif method in _BODY_METHODS:
        framing = "Content-Length: 0\r\n"
    else:
        framing = ""
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
        f"{fields}{_CRLF if fields else ''}{framing}\r\n"
    ).encode("utf-8", "surrogateescape")
