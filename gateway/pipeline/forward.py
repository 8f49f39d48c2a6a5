"""Step 4, Forward: send the request to one endpoint of the chosen backend and stream its
answer back as it comes (server-sent events and chunked LLM output flow token by token).

Hop-by-hop headers are dropped both ways (RFC 9110 7.6.1); ``X-Forwarded-*`` are set by
the gateway. A small body that has fully arrived goes out with the request head in one
write; anything else streams. The answer is relayed chunk by chunk; on the way it is
read for the trace's token counts and copied for the shadow, each only when asked for.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeGuard

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict

from gateway.core.split import VARIANT_TEXT, Variant
from gateway.core.usage import DecodingUsageSniffer, UsageSniffer, usage_of_encoded
from gateway.edge import answer_is_a_stream, close_after_answer
from gateway.metrics import RouteMetrics
from gateway.pipeline import record
from gateway.pipeline.body import BufferBudget, body_chunks
from gateway.pipeline.errors import (
    BAD_REQUEST,
    BAD_UPSTREAM_RESPONSE,
    BODY_TOO_LARGE,
    NO_HEALTHY_ENDPOINT,
    OVERLOADED,
    REQUEST_TIMEOUT,
    UPSTREAM_OVERLOADED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    BodyTimeout,
    BodyTooLarge,
    GatewayError,
    Overloaded,
    error_response,
)
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.split import VARIANT_HEADER
from gateway.shadow import BoundedCopy
from gateway.upstream import (
    BackendPool,
    BodySource,
    ConnectError,
    ConnectTimeout,
    Endpoint,
    NoHealthyEndpoint,
    StaleConnection,
    UpstreamClient,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamResponse,
)
from gateway.writes import BatchedTransport, watch_client

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Not hop-by-hop, but the gateway sets them itself on the upstream request.
_NOT_COPIED_UPSTREAM = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
_INLINE_BODY_BYTES = 64 * 1024


_NO_NAMES: frozenset[str] = frozenset()


def connection_listed(values: Sequence[str]) -> frozenset[str]:
    """Header names the sender marked hop-by-hop through its ``Connection`` header(s)."""
    if not values:
        return _NO_NAMES
    if len(values) == 1:
        return _listed_in(values[0])
    return _parse_connection(values)


# Senders repeat the same value ("keep-alive" on nearly every answer): parsing it once
# saves half a microsecond per header, and the bound keeps odd values from growing it.
@functools.lru_cache(maxsize=256)
def _listed_in(value: str) -> frozenset[str]:
    return _parse_connection((value,))


def _parse_connection(values: Sequence[str]) -> frozenset[str]:
    names = {token.strip().lower() for value in values for token in value.split(",")}
    names.discard("")
    # The common "keep-alive"/"close" tokens name no header worth looking for.
    names -= {"close", "keep-alive"}
    return frozenset(names) if names else _NO_NAMES


# What becomes of a client's request header upstream, by name (see _header_kind).
_COPY, _DROP, _FORWARDED_FOR, _HOST, _VARIANT, _CONNECTION = range(6)
# Header names seen, with their kind and lowercase form: clients send the same few
# names again and again, so each is classified once (the bound keeps odd names from
# growing it; when full it starts over).
_HEADER_KINDS: dict[str, tuple[int, str]] = {}
_HEADER_KINDS_SIZE = 1024


def _header_kind(name: str) -> tuple[int, str]:
    lower = name.lower()
    if lower == "connection":
        kind = _CONNECTION
    elif lower == "x-forwarded-for":
        kind = _FORWARDED_FOR
    elif lower == "host":
        kind = _HOST
    elif lower in _NOT_COPIED_UPSTREAM:
        kind = _DROP
    elif lower.startswith("x-gateway-"):
        # The gateway's own headers (X-Gateway-Shadow marks shadow calls) are never a
        # client's to send upstream; only a route that lets clients force a variant
        # passes that choice on.
        kind = _VARIANT if lower == "x-gateway-variant" else _DROP
    else:
        kind = _COPY
    entry = (kind, lower)
    if len(_HEADER_KINDS) >= _HEADER_KINDS_SIZE:
        _HEADER_KINDS.clear()
    _HEADER_KINDS[name] = entry
    return entry


def upstream_request_headers(
    request: web.BaseRequest,
    request_id_header: str,
    request_id: str,
    *,
    keep_variant: bool = False,
) -> list[tuple[str, str]]:
    """The headers sent upstream: the client's, less hop-by-hop ones and framing (the
    upstream client writes Host, Content-Length or Transfer-Encoding itself), less the
    gateway's own ``X-Gateway-*`` (``X-Gateway-Variant`` stays with ``keep_variant``,
    where the route honours it). ``X-Forwarded-For`` is every one the client sent, in
    order, then the client's address; ``-Proto`` and ``-Host`` are the gateway's."""
    lowered_id = request_id_header.lower()
    kinds = _HEADER_KINDS
    headers: list[tuple[str, str]] = []
    forwarded_for: list[str] | None = None
    host = ""
    connection: list[str] | None = None
    for name, value in request.headers.items():
        entry = kinds.get(name)
        if entry is None:
            entry = _header_kind(name)
        kind = entry[0]
        if kind == _COPY:
            if entry[1] != lowered_id:
                headers.append((name, value))
        elif kind == _HOST:
            if not host:
                host = value
        elif kind == _FORWARDED_FOR:
            if forwarded_for is None:
                forwarded_for = [value]
            else:
                forwarded_for.append(value)
        elif kind == _VARIANT:
            if keep_variant:
                headers.append((name, value))
        elif kind == _CONNECTION:
            if connection is None:
                connection = [value]
            else:
                connection.append(value)
    if connection is not None:
        extra = connection_listed(connection)
        if extra:  # names the client marked hop-by-hop (rare)
            headers = [(n, v) for n, v in headers if n.lower() not in extra]
    peer = request.remote or ""
    headers.append((request_id_header, request_id))
    if forwarded_for is None:
        headers.append(("X-Forwarded-For", peer))
    else:
        forwarded_for.append(peer)
        headers.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    headers.append(("X-Forwarded-Proto", request.scheme))
    headers.append(("X-Forwarded-Host", host))
    return headers


def copy_response_headers(
    upstream: UpstreamResponse,
    headers: CIMultiDict[str],
    request_id_header: str,
    request_id: str,
    variant: Variant,
) -> str | None:
    """Fill the client response's own headers (no intermediate copy); returns the
    answer's Content-Encoding, if it has one (the trace reads the answer decoded)."""
    connection: list[str] = []
    coding = None
    for name, value in upstream.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                connection.append(value)
            continue
        if lower == "content-encoding":
            coding = value
        headers.add(name, value)
    if connection:
        # Names the backend listed as hop-by-hop, which may have come before their
        # Connection header: one pass, then take them out again (rarely any).
        for listed in connection_listed(connection):
            headers.popall(listed, None)
    headers[request_id_header] = request_id
    headers[VARIANT_HEADER] = VARIANT_TEXT[variant]
    return coding


class _OneWriteResponse(web.StreamResponse):
    """A response whose head waits for its body so that both leave in one write (one
    system call instead of two), as ``web.Response`` does. Only for an answer already
    complete: a streamed one sends its head at once, before a first token that may be
    seconds away. (A private aiohttp switch: should it go, this is a plain
    StreamResponse again.)"""

    _send_headers_immediately = False


class Forwarder:
    """Forwards exchanges with the one shared upstream client, and answers the errors
    that happen on the way (502, 503, 504, 413) as gateway-made JSON errors."""

    def __init__(
        self,
        client: UpstreamClient,
        *,
        request_id_header: str,
        max_body_bytes: int,
        budget: BufferBudget | None = None,
        body_timeout_seconds: float = 60.0,
        reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.client = client
        self.request_id_header = request_id_header
        self.max_body_bytes = max_body_bytes
        # Bodies held in memory at once, over all requests (server.max_buffered_bytes).
        self.budget = budget if budget is not None else BufferBudget(16 * max_body_bytes)
        self.body_timeout_seconds = body_timeout_seconds
        # Requests refused for what the client did (gateway_requests_rejected_total).
        self.reject = reject if reject is not None else _ignore_rejection

    def fail(
        self,
        metrics: RouteMetrics,
        error: GatewayError,
        message: str,
        request_id: str,
        started: float,
    ) -> web.Response:
        """A gateway-made error answer, counted like any other (and naming the variant,
        once the request has one)."""
        record.count(metrics, error.status, started)
        return error_response(
            error, message, request_id, self.request_id_header, metrics.variant
        )

    def too_large(self, metrics: RouteMetrics, request_id: str, started: float) -> web.Response:
        self.reject("too_large", f"request {request_id}: body past {self.max_body_bytes} bytes")
        return self.fail(
            metrics, BODY_TOO_LARGE, f"request body exceeds {self.max_body_bytes} bytes",
            request_id, started,
        )  # fmt: skip

    def refuse(
        self,
        metrics: RouteMetrics,
        error: Exception,
        request_id: str,
        started: float,
        request: web.BaseRequest | None = None,
    ) -> web.StreamResponse:
        """The answer to a request whose body could not be taken: too large (413), not
        arriving (408, and the connection closes: what is left of the body is not
        read), past the buffer budget (503 overloaded) or malformed (400)."""
        if isinstance(error, BodyTooLarge):
            return self.too_large(metrics, request_id, started)
        if isinstance(error, BodyTimeout):
            seconds = self.body_timeout_seconds
            self.reject("body_timeout", f"request {request_id}: no body data for {seconds:g}s")
            response = self.fail(
                metrics, REQUEST_TIMEOUT, f"the request body stalled for {seconds:g}s",
                request_id, started,
            )  # fmt: skip
            response.force_close()
            if request is not None:
                close_after_answer(request)
            return response
        if isinstance(error, Overloaded):
            self.reject("overloaded", f"request {request_id}: body buffer budget in use")
            return self.fail(
                metrics, OVERLOADED,
                "the gateway holds as many request bodies as it may: retry shortly",
                request_id, started,
            )  # fmt: skip
        self.reject("bad_request", f"request {request_id}: malformed body: {error}")
        response = self.fail(
            metrics, BAD_REQUEST, "malformed request body", request_id, started
        )
        response.force_close()
        return response

    def _request_body(self, exchange: Exchange) -> tuple[BodySource, int | None]:
        """What to send upstream as the body (and its length when known), copying it for
        the shadow when the request is mirrored. Raises BodyTooLarge. A body read whole
        goes with its model replaced where the backend names its model differently (the
        shadow is sent the client's own, and replaces it for its own backend)."""
        request = exchange.request
        mirror = exchange.mirror
        if exchange.body is not None:
            if mirror is not None:
                mirror.request_body = exchange.body
            rewrite = exchange.lane.rewrite
            body = exchange.body if rewrite is None else rewrite.body(exchange.body)
            return body, len(body)
        if not request.body_exists:
            return None, None
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise BodyTooLarge
        content = request.content
        held = exchange.held
        if held is not None:
            # Its start was read to find the model; the rest streams after it. A declared
            # length is enforced by the HTTP parser; a chunked body is counted.
            rest = body_chunks(
                content,
                self.body_timeout_seconds,
                None if length is not None else self.max_body_bytes - len(held.data),
            )
            source: AsyncIterator[bytes] = _after(held.data, rest)
        elif length is not None and length <= _INLINE_BODY_BYTES and content.is_eof():
            # Small and fully received (the usual JSON inference call): sent with the
            # request head in one write.
            body = content.read_nowait(-1)
            if mirror is not None:
                mirror.request_body = body
            return body, length
        else:
            limit = None if length is not None else self.max_body_bytes
            source = body_chunks(content, self.body_timeout_seconds, limit)
        if mirror is not None:
            teed = mirror.tee(source, length)
            if teed is None:
                exchange.mirror = None
            else:
                source = teed
        return source, length

    async def forward(self, exchange: Exchange) -> web.StreamResponse:
        lane = exchange.lane
        pool, metrics = lane.pool, lane.metrics
        request, request_id, started = exchange.request, exchange.request_id, exchange.started
        try:
            data, length = self._request_body(exchange)
        except BodyTooLarge:
            return self.too_large(metrics, request_id, started)
        endpoint = pool.pick()
        if endpoint is not None:
            endpoint.active += 1
        else:
            try:
                endpoint = await pool.acquire()  # its slot counted
            except NoHealthyEndpoint as error:
                metrics.upstream_error("no_healthy_endpoint")
                # A registry reference that points nowhere says so (upstream/unresolved.py).
                return self.fail(
                    metrics, NO_HEALTHY_ENDPOINT,
                    str(error) or f"backend {pool.name} has no healthy endpoint",
                    request_id, started,
                )  # fmt: skip
            except UpstreamOverloaded:
                metrics.upstream_error("overloaded")
                return self.fail(
                    metrics, UPSTREAM_OVERLOADED,
                    f"backend {pool.name} is at {pool.max_connections} connections per "
                    f"endpoint and none freed within {pool.queue_timeout_seconds:g}s",
                    request_id, started,
                )  # fmt: skip

        headers = upstream_request_headers(
            request, self.request_id_header, request_id, keep_variant=exchange.route.allow_override
        )
        client = self.client
        try:
            try:
                try:
                    upstream = await client.request(
                        endpoint.origin,
                        request.method,
                        endpoint.target(exchange.path),
                        headers,
                        data,
                        content_length=length,
                        connect_timeout=pool.connect_timeout_seconds,
                        read_timeout=pool.timeout_seconds,
                        elsewhere=pool.several,
                    )
                except (ConnectError, ConnectTimeout) as error:
                    # Nothing was sent (or, on a kept-alive connection found closed, nothing
                    # reached the backend): once more, on another endpoint within the retry
                    # budget. A closed kept-alive connection is no failure of the endpoint
                    # (backends close idle ones), and is retried there if nowhere else.
                    _forget(error)
                    stale = isinstance(error, StaleConnection)
                    other = pool.other_than(endpoint)
                    if other is None or not pool.may_retry():
                        if not stale:
                            raise
                        other = endpoint
                    if not stale:
                        hung = isinstance(error, TimeoutError)
                        metrics.upstream_error("timeout" if hung else "connect")
                        pool.failed(endpoint, timed_out=hung)
                    if other is not endpoint:
                        _release(pool, endpoint)
                        endpoint = other
                        endpoint.active += 1
                    pool.retries += 1
                    try:
                        upstream = await client.request(
                            endpoint.origin,
                            request.method,
                            endpoint.target(exchange.path),
                            headers,
                            data,
                            content_length=length,
                            connect_timeout=pool.connect_timeout_seconds,
                            read_timeout=pool.timeout_seconds,
                        )
                    finally:
                        pool.retries -= 1
            except (BodyTooLarge, BodyTimeout, RequestPayloadError) as error:
                # The client's body: too large, stalled or malformed on its way through.
                return self.refuse(metrics, error, request_id, started, request)
            except TimeoutError as error:
                _forget(error)
                if request.transport is None:
                    return _client_left(metrics, started)
                pool.failed(endpoint, timed_out=True)
                metrics.upstream_error("timeout")
                return self.fail(
                    metrics, UPSTREAM_TIMEOUT,
                    f"backend {pool.name} did not answer within {pool.timeout_seconds:g}s",
                    request_id, started,
                )  # fmt: skip
            except (UpstreamError, OSError) as error:
                _forget(error)
                if request.transport is None:
                    # The client went away (mid-upload): not the backend's failure.
                    return _client_left(metrics, started)
                pool.failed(endpoint)
                reason = error.reason if isinstance(error, UpstreamError) else "connect"
                metrics.upstream_error(reason)
                if reason == "protocol":
                    return self.fail(
                        metrics, BAD_UPSTREAM_RESPONSE,
                        f"backend {pool.name} sent an invalid answer: {error}", request_id, started,
                    )  # fmt: skip
                return self.fail(
                    metrics, UPSTREAM_UNAVAILABLE,
                    f"backend {pool.name} is unavailable: {error}", request_id, started,
                )  # fmt: skip
            if upstream.status >= 500:
                pool.failed(endpoint)
            elif endpoint.consecutive_failures:  # no call and no write on the usual path
                pool.succeeded(endpoint)
            response, complete = await self._relay(exchange, upstream, pool, endpoint)
        finally:
            if pool.waiting:
                pool.release(endpoint)  # its slot goes to the first waiting request
            else:
                endpoint.active -= 1
        if complete and exchange.mirror is not None:
            exchange.mirror.submit(
                request, request_id, headers, upstream, started, exchange.target,
                exchange.route.config.match.path_prefix,
            )  # fmt: skip
        return response

    async def _relay(
        self, exchange: Exchange, upstream: UpstreamResponse, pool: BackendPool, endpoint: Endpoint
    ) -> tuple[web.StreamResponse, bool]:
        """Stream the upstream answer to the client chunk by chunk as it arrives.

        Returns the response and whether the whole answer reached the client. However it
        ends (the client gone, the backend failing, anything raised), the upstream
        connection is released or closed here."""
        request, metrics = exchange.request, exchange.lane.metrics
        exchange.answered = True
        complete = False
        watched = False
        try:
            body = upstream.whole_body()
            response = (web.StreamResponse if body is None else _OneWriteResponse)(
                status=upstream.status, reason=upstream.reason
            )
            coding = copy_response_headers(
                upstream,
                response.headers,
                self.request_id_header,
                exchange.request_id,
                exchange.lane.variant,
            )
            traced = exchange.trace is not None
            copy: BoundedCopy | None = None
            if exchange.mirror is not None:
                copy = exchange.mirror.copy_answer()
            await response.prepare(request)
            if body is not None:
                # The usual small answer, already here with its head: it goes out in one
                # write and is read in one piece.
                if traced:  # counted even if the client leaves early: the work was done
                    if coding is None:
                        exchange.answer = body
                    else:
                        exchange.tokens = usage_of_encoded(body, coding)
                await response.write_eof(body)
                if copy is not None:
                    copy.feed(body)
            else:
                # Streamed: should the client go away while the backend is between two
                # chunks (an LLM thinking), the upstream connection is closed at once,
                # not when the next chunk finds nobody to write to.
                watched = watch_client(request, upstream.close)
                answer_is_a_stream(request)
                usage: UsageSniffer | DecodingUsageSniffer | None = None
                if traced:
                    usage = UsageSniffer() if coding is None else DecodingUsageSniffer(coding)
                writer = response._payload_writer
                try:
                    if _plain_chunked(writer):
                        # The usual stream (an LLM's tokens): each chunk framed and handed
                        # to the transport here, in one write, rather than through two
                        # coroutines and a join of three pieces per chunk in aiohttp.
                        await _relay_chunked(upstream, writer, usage, copy)
                    else:
                        async for chunk in upstream.chunks():
                            await response.write(chunk)
                            if usage is not None:
                                usage.feed(chunk)
                            if copy is not None:
                                copy.feed(chunk)
                finally:
                    if usage is not None:
                        exchange.tokens = usage.usage()
                await response.write_eof()
            complete = True
        except TimeoutError as error:
            # Headers are gone already; all we can do is cut the connection so the
            # client sees an incomplete answer rather than a clean, truncated one.
            _forget(error)
            pool.failed(endpoint, timed_out=True)
            metrics.upstream_error("timeout")
            _cut_off(metrics, upstream.status)
            _abort(request)
            upstream.close()
        except UpstreamError as error:
            _forget(error)
            upstream.close()
            if request.transport is not None:  # else the client left, and closed it
                pool.failed(endpoint)
                metrics.upstream_error("stream_reset")
                _cut_off(metrics, upstream.status)
                _abort(request)
        except ConnectionError as error:
            # The client went away (reset, broken pipe, aiohttp's "Connection lost"):
            # stop reading from the backend; a connection whose answer was complete may
            # serve again.
            _forget(error)
            upstream.release()
        except BaseException:
            upstream.close()
            raise
        else:
            upstream.release()
        finally:
            if watched:
                watch_client(request, None)
        exchange.finished = record.count(metrics, upstream.status, exchange.started)
        return response, complete


def _plain_chunked(writer: AbstractStreamWriter | None) -> TypeGuard[StreamWriter]:
    """Whether the answer goes out as aiohttp's StreamWriter sends a chunked body with
    nothing in between (no compression, no declared length, no per-chunk hook): then
    ``_relay_chunked`` may frame the chunks itself."""
    return (
        type(writer) is StreamWriter
        and writer.chunked
        and writer.length is None
        and writer._compress is None
        and writer._on_chunk_sent is None
        and writer.on_body_write is None
        and writer._headers_written
    )


async def _relay_chunked(
    upstream: UpstreamResponse,
    writer: StreamWriter,
    usage: UsageSniffer | DecodingUsageSniffer | None,
    copy: BoundedCopy | None,
) -> None:
    """What ``StreamResponse.write`` does for each chunk of a plain chunked answer, done
    from the upstream connection's callback as each chunk arrives (``pipe``): the chunk
    in its frame, in one write to the client's socket transport (not held to the end of
    the loop pass as other writes are: see below), read for the trace and copied for
    the shadow. While that transport is above its high-water mark the backend is not
    read, so a client that reads slowly slows the backend; one gone raises
    ConnectionResetError, as aiohttp's write would."""
    protocol = writer.protocol
    # Chunks go to the socket's own transport, not through the pass's write batch: a
    # stream writes one chunk per connection per loop pass, so holding it to the pass's
    # end saves no wake-up and costs two Python calls a chunk. What is held already (the
    # answer's head) goes first, so the order stays as written.
    client = protocol.transport
    if isinstance(client, BatchedTransport):
        client.flush()
        client = client.transport
    if client is None:
        raise ConnectionResetError("Cannot write to closing transport")
    relay = _ChunkRelay(protocol, client, usage, copy)

    async def drain() -> None:
        transport = protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        await writer.drain()

    try:
        await upstream.pipe(relay.sink, drain)
    finally:
        writer.output_size += relay.sent  # the response's body_length, as aiohttp counts it


class _ChunkRelay:
    """``_relay_chunked``'s sink: one object with slots rather than a closure, whose
    cells are an object each, as it is read for every chunk of thousands of streams
    whose objects are no longer in the CPU's caches. For the same reason a chunk that
    goes out whole touches the client's transport (and, under TLS, its TLS layer), not
    aiohttp's protocol, nor bound methods kept here."""

    __slots__ = ("client", "copy", "protocol", "sent", "usage")

    def __init__(
        self,
        protocol: BaseProtocol,
        client: asyncio.Transport,
        usage: UsageSniffer | DecodingUsageSniffer | None,
        copy: BoundedCopy | None,
    ) -> None:
        self.protocol = protocol
        self.client = client
        self.usage = usage
        self.copy = copy
        self.sent = 0

    def sink(self, chunk: bytes) -> bool:
        client = self.client
        if client.is_closing():  # closed when the protocol lets go of it
            return False  # drain() raises
        client.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        self.sent += len(chunk)
        usage = self.usage
        if usage is not None:
            usage.feed(chunk)
        copy = self.copy
        if copy is not None:
            copy.feed(chunk)
        # Above the high-water mark the transport has paused its protocol; with nothing
        # held back it cannot be.
        return client.get_write_buffer_size() == 0 or not self.protocol._paused


def _forget(error: BaseException | None) -> None:
    """Let go of the frames a caught error's traceback holds (and those of the errors it
    was raised from). The error is also held by what raised it (the exchange it broke,
    the future it failed), which the frames hold in turn: a cycle, which only the cycle
    collector frees, and the gateway runs it rarely (app.tune_gc). Meanwhile the frames
    hold the response, the request and the last chunk of the answer: aborted downloads
    held megabytes each that way."""
    for _ in range(8):  # a chain is a few errors long; a bound all the same
        if error is None:
            return
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


def _release(pool: BackendPool, endpoint: Endpoint) -> None:
    if pool.waiting:
        pool.release(endpoint)
    else:
        endpoint.active -= 1


def _client_left(metrics: RouteMetrics, started: float) -> web.Response:
    """An answer for a client that went away before it could get one: nobody reads it,
    but it is counted, as 499 (nginx's "client closed request"), not as a failure."""
    record.count(metrics, 499, started)
    return web.Response(status=499)


async def _after(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _ignore_rejection(reason: str, detail: str) -> None:
    return None


def _cut_off(metrics: RouteMetrics, status: int) -> None:
    """An answer that broke off is a failure, once: a 5xx counts as one already."""
    if status < 500:
        metrics.cut_off += 1


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
