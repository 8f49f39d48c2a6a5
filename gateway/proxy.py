"""The one request pipeline (DESIGN section 1): route, key, split, forward, record.

The handler runs on aiohttp's low-level ``web.Server`` (no router, no middleware): the
route table is our own and everything per route was prepared at config load.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.split import Variant, bucket_of, choose, parse_override
from gateway.metrics import RouteMetrics
from gateway.routing import Router, body_model
from gateway.runtime import RouteRuntime
from gateway.upstream import BackendPool

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
_NOT_COPIED_UPSTREAM = HOP_BY_HOP | {"host", "expect", "x-forwarded-proto", "x-forwarded-host"}
_READ_CHUNK = 64 * 1024


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


def connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Header names the sender marked hop-by-hop through its ``Connection`` header."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    names = {token.strip().lower() for value in values for token in value.split(",")}
    names.discard("")
    # The common "keep-alive"/"close" tokens name no header worth looking for.
    names -= {"close", "keep-alive"}
    return frozenset(names)


def upstream_request_headers(
    request: web.BaseRequest, request_id_header: str, request_id: str
) -> CIMultiDict[str]:
    incoming = request.headers
    extra = connection_listed(incoming)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _NOT_COPIED_UPSTREAM or (extra and lower in extra):
            continue
        headers.add(name, value)
    headers[request_id_header] = request_id
    peer = request.remote or ""
    prior = incoming.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = incoming.get("Host", "")
    return headers


def client_response_headers(
    upstream: aiohttp.ClientResponse,
    request_id_header: str,
    request_id: str,
    variant: Variant,
) -> CIMultiDict[str]:
    incoming = upstream.headers
    extra = connection_listed(incoming)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or (extra and lower in extra):
            continue
        headers.add(name, value)
    headers[request_id_header] = request_id
    headers[VARIANT_HEADER] = variant.value
    return headers


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refusing at once anything past ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    content = request.content
    while True:
        chunk = await content.read(_READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def limited_stream(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """A chunked request body streamed upstream, cut off past ``limit`` bytes."""
    size = 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        yield chunk


class Proxy:
    """The request handler. Swap ``router`` to reload; each request reads it once."""

    def __init__(
        self,
        router: Router[RouteRuntime],
        session: aiohttp.ClientSession,
        unrouted_metrics: RouteMetrics,
        *,
        request_id_header: str = "X-Request-ID",
        max_body_bytes: int = 10 * 1024 * 1024,
        new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.router = router
        self.session = session
        self.unrouted = unrouted_metrics
        self.request_id_header = request_id_header
        self.max_body_bytes = max_body_bytes
        self.new_request_id = new_request_id
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
        groups = self.router.candidates(request.path)
        body: bytes | None = None
        model: str | None = None
        if any(group.needs_body for group in groups):
            try:
                body = await read_body(request, self.max_body_bytes)
            except BodyTooLarge:
                return self._too_large(self.unrouted, request_id, started)
            model = body_model(body)
        route: RouteRuntime | None = None
        for group in groups:
            route = group.select(request.headers, model)
            if route is not None:
                break
        if route is None:
            return self._fail(
                self.unrouted, NO_ROUTE, f"no route matches {request.path}", request_id, started
            )

        # 2-3. Key and split.
        variant = self._variant(route, request, request_id)
        pool = route.pool(variant)
        metrics = route.metrics[variant]

        # 4-5. Forward and record.
        metrics.in_flight.inc()
        try:
            return await self._forward(
                request, request_id, route, variant, pool, metrics, body, started
            )
        finally:
            metrics.in_flight.dec()

    def _variant(self, route: RouteRuntime, request: web.BaseRequest, request_id: str) -> Variant:
        if route.allow_override:
            forced = parse_override(request.headers.get(VARIANT_HEADER))
            if forced is not None and (forced is Variant.CHAMPION or route.challenger is not None):
                return forced
        cut = route.threshold
        if cut <= 0:
            return Variant.CHAMPION
        key = route.key_source.extract(request, request_id)
        return choose(bucket_of(key, route.salt), cut)

    async def _forward(
        self,
        request: web.BaseRequest,
        request_id: str,
        route: RouteRuntime,
        variant: Variant,
        pool: BackendPool,
        metrics: RouteMetrics,
        body: bytes | None,
        started: float,
    ) -> web.StreamResponse:
        endpoint = pool.pick()
        if endpoint is None:
            metrics.upstream_error("no_healthy_endpoint")
            return self._fail(
                metrics, NO_HEALTHY_ENDPOINT, f"backend {pool.name} has no healthy endpoint",
                request_id, started,
            )  # fmt: skip

        data: bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            length = request.content_length
            if length is not None and length > self.max_body_bytes:
                return self._too_large(metrics, request_id, started)
            # A declared length is enforced by the HTTP parser; only a chunked body
            # needs counting on the way through.
            data = (
                request.content
                if length is not None
                else limited_stream(request.content, self.max_body_bytes)
            )

        headers = upstream_request_headers(request, self.request_id_header, request_id)
        endpoint.active += 1
        try:
            try:
                upstream = await self.session.request(
                    request.method,
                    endpoint.url(request.raw_path),
                    headers=headers,
                    data=data,
                    timeout=pool.timeout,
                    allow_redirects=False,
                    compress=None,
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
            except aiohttp.ClientError as error:
                if isinstance(error.__cause__, BodyTooLarge):
                    return self._too_large(metrics, request_id, started)
                pool.failed(endpoint)
                metrics.upstream_error("connect" if _is_connect_error(error) else "protocol")
                return self._fail(
                    metrics, UPSTREAM_UNAVAILABLE,
                    f"backend {pool.name} is unavailable: {type(error).__name__}",
                    request_id, started,
                )  # fmt: skip
            pool.succeeded(endpoint)
            return await self._relay(request, upstream, request_id, variant, metrics, started)
        finally:
            endpoint.active -= 1

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        variant: Variant,
        metrics: RouteMetrics,
        started: float,
    ) -> web.StreamResponse:
        """Stream the upstream answer to the client chunk by chunk as it arrives."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=client_response_headers(upstream, self.request_id_header, request_id, variant),
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except TimeoutError:
            # Headers are gone already; all we can do is cut the connection so the
            # client sees an incomplete answer rather than a clean, truncated one.
            metrics.upstream_error("timeout")
            _abort(request)
            upstream.close()
        except aiohttp.ClientPayloadError:
            metrics.upstream_error("stream_reset")
            _abort(request)
            upstream.close()
        except ConnectionResetError:
            # The client went away: stop reading from the backend.
            upstream.close()
        else:
            upstream.release()
        metrics.count(upstream.status, time.perf_counter() - started)
        return response

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


def _is_connect_error(error: aiohttp.ClientError) -> bool:
    return isinstance(error, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError)


async def _send_continue(request: web.BaseRequest) -> None:
    if request.version >= (1, 1) and request.content_length != 0:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
