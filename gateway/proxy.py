"""The one request pipeline (DESIGN section 1): route, key, split, forward, record.

The handler runs on aiohttp's low-level ``web.Server`` (no router, no middleware): the
route table is our own and everything per route was prepared at config load.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.core.compare import Answer
from gateway.core.split import (
    CHAMPION,
    VARIANT_TEXT,
    Variant,
    bucket_of,
    choose,
    parse_override,
)
from gateway.core.stats import ShadowOutcome
from gateway.core.usage import NO_USAGE, TokenCounts, UsageSniffer
from gateway.h1 import BodySource, UpstreamClient, UpstreamError, UpstreamResponse
from gateway.metrics import RouteMetrics
from gateway.routing import Router, body_model
from gateway.runtime import Lane, LoadTrace, RouteRuntime
from gateway.shadow import (
    BoundedCopy,
    MirroredRequest,
    ShadowPolicy,
    ShadowRunner,
    decode_body,
    tee_stream,
)

VARIANT_HEADER = "X-Gateway-Variant"

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


_ids = random.Random()  # seeded from os.urandom, per process


def new_request_id() -> str:
    """32 random hex digits, like uuid4().hex without its system call per request."""
    return f"{_ids.getrandbits(128):032x}"


class BodyTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class GatewayError:
    status: int
    code: str


NO_ROUTE = GatewayError(404, "no_route")
BODY_TOO_LARGE = GatewayError(413, "body_too_large")
UPSTREAM_UNAVAILABLE = GatewayError(502, "upstream_unavailable")
UPSTREAM_TIMEOUT = GatewayError(504, "upstream_timeout")
NO_HEALTHY_ENDPOINT = GatewayError(503, "no_healthy_endpoint")
DRAINING = GatewayError(503, "draining")


def error_response(
    error: GatewayError, message: str, request_id: str, request_id_header: str
) -> web.Response:
    body = orjson.dumps(
        {"error": {"code": error.code, "message": message, "request_id": request_id}}
    )
    return web.Response(
        status=error.status,
        body=body,
        content_type="application/json",
        headers={request_id_header: request_id},
    )


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


def upstream_request_headers(
    request: web.BaseRequest, request_id_header: str, request_id: str
) -> list[tuple[str, str]]:
    """The headers sent upstream: the client's, less hop-by-hop ones and framing (the
    upstream client writes Host, Content-Length or Transfer-Encoding itself)."""
    incoming = request.headers
    extra = connection_listed(incoming.getall("Connection", ()))
    lowered_id = request_id_header.lower()
    headers: list[tuple[str, str]] = []
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _NOT_COPIED_UPSTREAM or lower == lowered_id or (extra and lower in extra):
            continue
        headers.append((name, value))
    peer = request.remote or ""
    prior = incoming.get("X-Forwarded-For")
    headers.append((request_id_header, request_id))
    headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    headers.append(("X-Forwarded-Proto", request.scheme))
    headers.append(("X-Forwarded-Host", incoming.get("Host", "")))
    return headers


def copy_response_headers(
    upstream: UpstreamResponse,
    headers: CIMultiDict[str],
    request_id_header: str,
    request_id: str,
    variant: Variant,
) -> None:
    """Fill the client response's own headers (no intermediate copy)."""
    connection: list[str] = []
    for name, value in upstream.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                connection.append(value)
            continue
        headers.add(name, value)
    if connection:
        # Names the backend listed as hop-by-hop, which may have come before their
        # Connection header: one pass, then take them out again (rarely any).
        for listed in connection_listed(connection):
            headers.popall(listed, None)
    headers[request_id_header] = request_id
    headers[VARIANT_HEADER] = VARIANT_TEXT[variant]


async def limited_stream(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """A body as it arrives, cut off past ``limit`` bytes."""
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        yield chunk


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refusing at once anything past ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    return b"".join([chunk async for chunk in limited_stream(request.content, limit)])


class _OneWriteResponse(web.StreamResponse):
    """A response whose head waits for its body so that both leave in one write (one
    system call instead of two), as ``web.Response`` does. Only for an answer already
    complete: a streamed one sends its head at once, before a first token that may be
    seconds away. (A private aiohttp switch: should it go, this is a plain
    StreamResponse again.)"""

    _send_headers_immediately = False


class LoadTracer(Protocol):
    """Counts each backend's load into trace windows (gateway.tracing.TraceWriter)."""

    perf_offset: float  # wall-clock time minus perf_counter(), kept current by the tracer

    def trace_of(self, model: str) -> LoadTrace: ...


@dataclass(slots=True)
class Exchange:
    """One request's way through the pipeline, once its route and variant are known."""

    request: web.BaseRequest
    request_id: str
    route: RouteRuntime
    lane: Lane  # the variant's pool, metrics and trace
    started: float
    # The whole request body, when it was read at once (to match on its model, or small
    # enough to send in one write); None while it streams.
    body: bytes | None = None
    mirror: ShadowPolicy | None = None
    request_copy: BoundedCopy | None = None
    answer_copy: BoundedCopy | None = None
    trace: LoadTrace | None = None  # the backend model's load trace, when traces are on
    tokens: TokenCounts = NO_USAGE  # (prompt, completion) from a streamed answer's usage
    answer: bytes | None = None  # or the whole answer, when traced: its trace reads usage
    answered: bool = False  # the backend sent an answer (its headers at least)
    finished: float = 0.0  # perf_counter() when the answer was relayed, if it was


class Proxy:
    """The request handler. Swap ``router`` to reload; each request reads it once."""

    def __init__(
        self,
        router: Router[RouteRuntime],
        client: UpstreamClient,
        unrouted_metrics: RouteMetrics,
        *,
        request_id_header: str = "X-Request-ID",
        max_body_bytes: int = 10 * 1024 * 1024,
        new_request_id: Callable[[], str] = new_request_id,
        shadow_runner: ShadowRunner | None = None,
        tracer: LoadTracer | None = None,
    ) -> None:
        self.router = router
        self.client = client
        self.unrouted = unrouted_metrics
        self.request_id_header = request_id_header
        self.max_body_bytes = max_body_bytes
        self.new_request_id = new_request_id
        self.shadow_runner = shadow_runner
        self.tracer = tracer
        self.draining = False

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get(self.request_id_header) or self.new_request_id()
        if self.draining:
            return self._fail(
                self.unrouted, DRAINING, "the gateway is shutting down", request_id, started
            )
        if request.body_exists and request.headers.get("Expect", "").lower() == "100-continue":
            # The body is streamed upstream as it comes, so the client may send it now;
            # without this, curl waits a second before every large upload.
            await _send_continue(request)

        # 1. Route. The body is read only when a candidate route matches on its model.
        match = self.router.match(request.path)
        body: bytes | None = None
        route = match.only
        if route is None:
            model: str | None = None
            if match.needs_body:
                try:
                    body = await read_body(request, self.max_body_bytes)
                except BodyTooLarge:
                    return self._too_large(self.unrouted, request_id, started)
                model = body_model(body)
            for group in match.groups:
                route = group.select(request.headers, model)
                if route is not None:
                    break
        if route is None:
            return self._fail(
                self.unrouted, NO_ROUTE, f"no route matches {request.path}", request_id, started
            )

        # 2-3. Key and split.
        variant = self._variant(route, request, request_id)
        lane = route.champion_lane if variant is CHAMPION else route.challenger_lane
        exchange = Exchange(request, request_id, route, lane, started, body)
        # 6 (decided now, run last). Only answers the clients got from the champion are
        # mirrored: the challenger's own answers are not what it is compared against.
        policy = route.shadow
        if (
            policy is not None
            and variant is CHAMPION
            and self.shadow_runner is not None
            and policy.samples(request.method, self._shadow_key(policy, request, request_id))
        ):
            if policy.in_flight >= policy.config.max_in_flight:
                # No room now; copying bodies for a sample that will be dropped is waste.
                policy.fail(ShadowOutcome.DROPPED)
            else:
                exchange.mirror = policy

        # 4-5. Forward and record.
        tracer = self.tracer
        trace = None
        if tracer is not None:
            trace = lane.trace
            if trace is None:
                trace = lane.trace = tracer.trace_of(lane.pool.model)
            trace.add(started + tracer.perf_offset)
            exchange.trace = trace
        metrics = lane.metrics
        metrics.in_flight += 1
        try:
            return await self._forward(exchange)
        finally:
            metrics.in_flight -= 1
            if tracer is not None and trace is not None:
                now = (exchange.finished or time.perf_counter()) + tracer.perf_offset
                if exchange.answer is not None:
                    trace.done_answer(now, exchange.answer)
                elif exchange.answered:
                    prompt_tokens, completion_tokens = exchange.tokens
                    trace.done(now, prompt_tokens, completion_tokens)
                else:  # the backend never answered: no tokens to count
                    trace.discard(now)

    def _variant(self, route: RouteRuntime, request: web.BaseRequest, request_id: str) -> Variant:
        if route.allow_override:
            forced = parse_override(request.headers.get(VARIANT_HEADER))
            if forced is not None and (forced is CHAMPION or route.challenger is not None):
                return forced
        cut = route.threshold
        if cut <= 0:
            return CHAMPION
        key = route.key_source.extract(request, request_id)
        return choose(bucket_of(key, route.salt), cut)

    @staticmethod
    def _shadow_key(policy: ShadowPolicy, request: web.BaseRequest, request_id: str) -> str:
        if policy.config.sampling != "key" or policy.route_key is None:
            return request_id
        return policy.route_key.extract(request, request_id)

    def _request_body(self, exchange: Exchange) -> tuple[BodySource, int | None]:
        """What to send upstream as the body (and its length when known), copying it for
        the shadow when the request is mirrored. Raises BodyTooLarge."""
        request = exchange.request
        mirror = exchange.mirror
        if exchange.body is not None:
            return exchange.body, len(exchange.body)
        if not request.body_exists:
            return None, None
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise BodyTooLarge
        content = request.content
        if length is not None and length <= _INLINE_BODY_BYTES and content.is_eof():
            # Small and fully received (the usual JSON inference call): sent with the
            # request head in one write.
            body = content.read_nowait(-1)
            if mirror is not None:
                exchange.body = body
            return body, length
        # A declared length is enforced by the HTTP parser; only a chunked body needs
        # counting on the way through.
        source: AsyncIterator[bytes] = (
            content.iter_any()
            if length is not None
            else limited_stream(content, self.max_body_bytes)
        )
        if mirror is not None:
            if length is not None and length > mirror.config.max_body_bytes:
                mirror.fail(ShadowOutcome.DROPPED)
                exchange.mirror = None
            else:
                copy = exchange.request_copy = BoundedCopy(mirror.config.max_body_bytes)
                source = tee_stream(source, copy)
        return source, length

    async def _forward(self, exchange: Exchange) -> web.StreamResponse:
        lane = exchange.lane
        pool, metrics = lane.pool, lane.metrics
        request, request_id, started = exchange.request, exchange.request_id, exchange.started
        try:
            data, length = self._request_body(exchange)
        except BodyTooLarge:
            return self._too_large(metrics, request_id, started)
        endpoint = pool.pick()
        if endpoint is None:
            metrics.upstream_error("no_healthy_endpoint")
            return self._fail(
                metrics, NO_HEALTHY_ENDPOINT, f"backend {pool.name} has no healthy endpoint",
                request_id, started,
            )  # fmt: skip

        headers = upstream_request_headers(request, self.request_id_header, request_id)
        endpoint.active += 1
        try:
            try:
                upstream = await self.client.request(
                    endpoint.origin,
                    request.method,
                    endpoint.target(request.raw_path),
                    headers,
                    data,
                    content_length=length,
                    connect_timeout=pool.connect_timeout_seconds,
                    read_timeout=pool.timeout_seconds,
                )
            except BodyTooLarge:
                return self._too_large(metrics, request_id, started)
            except TimeoutError:
                metrics.upstream_error("timeout")
                return self._fail(
                    metrics, UPSTREAM_TIMEOUT,
                    f"backend {pool.name} did not answer within {pool.timeout_seconds:g}s",
                    request_id, started,
                )  # fmt: skip
            except (UpstreamError, OSError) as error:
                pool.failed(endpoint)
                reason = error.reason if isinstance(error, UpstreamError) else "connect"
                metrics.upstream_error(reason)
                return self._fail(
                    metrics, UPSTREAM_UNAVAILABLE,
                    f"backend {pool.name} is unavailable: {error}", request_id, started,
                )  # fmt: skip
            if endpoint.consecutive_failures:  # no call and no write on the usual path
                pool.succeeded(endpoint)
            response, complete = await self._relay(exchange, upstream)
        finally:
            endpoint.active -= 1
        if complete and exchange.mirror is not None:
            self._submit_shadow(exchange, upstream, headers)
        return response

    async def _relay(
        self, exchange: Exchange, upstream: UpstreamResponse
    ) -> tuple[web.StreamResponse, bool]:
        """Stream the upstream answer to the client chunk by chunk as it arrives.

        Returns the response and whether the whole answer reached the client."""
        request, metrics = exchange.request, exchange.lane.metrics
        exchange.answered = True
        body = upstream.whole_body()
        response = (web.StreamResponse if body is None else _OneWriteResponse)(
            status=upstream.status, reason=upstream.reason
        )
        copy_response_headers(
            upstream,
            response.headers,
            self.request_id_header,
            exchange.request_id,
            exchange.lane.variant,
        )
        traced = exchange.trace is not None
        copy: BoundedCopy | None = None
        if exchange.mirror is not None:
            copy = exchange.answer_copy = BoundedCopy(exchange.mirror.config.max_body_bytes)
        complete = False
        try:
            await response.prepare(request)
            if body is not None:
                # The usual small answer, already here with its head: it goes out in one
                # write and is read in one piece.
                if traced:  # counted even if the client leaves early: the work was done
                    exchange.answer = body
                await response.write_eof(body)
                if copy is not None:
                    copy.feed(body)
            elif not traced and copy is None:
                async for chunk in upstream.chunks():
                    await response.write(chunk)
                await response.write_eof()
            else:
                usage = UsageSniffer() if traced else None
                try:
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
        except TimeoutError:
            # Headers are gone already; all we can do is cut the connection so the
            # client sees an incomplete answer rather than a clean, truncated one.
            metrics.upstream_error("timeout")
            _abort(request)
            upstream.close()
        except UpstreamError:
            metrics.upstream_error("stream_reset")
            _abort(request)
            upstream.close()
        except ConnectionResetError:
            # The client went away: stop reading from the backend.
            upstream.close()
        else:
            upstream.release()
        exchange.finished = finished = time.perf_counter()
        metrics.count(upstream.status, finished - exchange.started)
        return response, complete

    def _submit_shadow(
        self,
        exchange: Exchange,
        upstream: UpstreamResponse,
        headers: list[tuple[str, str]],
    ) -> None:
        policy = exchange.mirror
        assert policy is not None and self.shadow_runner is not None
        request_body = exchange.body
        if request_body is None and exchange.request_copy is not None:
            request_body = exchange.request_copy.value()
            if request_body is None:
                policy.fail(ShadowOutcome.DROPPED)
                return
        answer = exchange.answer_copy.value() if exchange.answer_copy is not None else None
        decoded = (
            decode_body(answer, upstream.header("Content-Encoding")) if answer is not None else None
        )
        if decoded is None:
            policy.fail(ShadowOutcome.DROPPED)
            return
        request = exchange.request
        self.shadow_runner.submit(
            policy,
            MirroredRequest(
                exchange.request_id,
                request.method,
                request.raw_path,
                headers,
                request_body,
            ),
            Answer(upstream.status, upstream.header("Content-Type") or "", decoded),
            time.perf_counter() - exchange.started,
        )

    def _too_large(self, metrics: RouteMetrics, request_id: str, started: float) -> web.Response:
        return self._fail(
            metrics, BODY_TOO_LARGE, f"request body exceeds {self.max_body_bytes} bytes",
            request_id, started,
        )  # fmt: skip

    def _fail(
        self,
        metrics: RouteMetrics,
        error: GatewayError,
        message: str,
        request_id: str,
        started: float,
    ) -> web.Response:
        metrics.count(error.status, time.perf_counter() - started)
        return error_response(error, message, request_id, self.request_id_header)


async def _send_continue(request: web.BaseRequest) -> None:
    if request.version >= (1, 1) and request.content_length != 0:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
