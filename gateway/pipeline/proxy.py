"""The one request pipeline, one step per module:

    route.py    1. Route     the route a request belongs to (its path, headers, body model)
    split.py    2-3. Key and Split   the sticky key and the variant it falls on
    forward.py  4. Forward   to an endpoint of the variant's backend, the answer streamed back
    record.py   5. Record    in-flight, status and latency, the load trace
    mirror.py   6. Shadow    a sampled copy to the shadow target, once the client is answered

``Proxy.handle`` runs them in that order. It runs on aiohttp's low-level ``web.Server``
(no router, no middleware): the route table is our own, and everything per route was
prepared at config load (``gateway.runtime``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from aiohttp import web

from gateway.core.split import CHAMPION
from gateway.metrics import RouteMetrics
from gateway.pipeline import mirror, record
from gateway.pipeline.body import read_body
from gateway.pipeline.errors import DRAINING, NO_ROUTE, BodyTooLarge
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.forward import Forwarder
from gateway.pipeline.record import LoadTracer
from gateway.pipeline.route import Router, body_model
from gateway.pipeline.split import choose_variant
from gateway.runtime import RouteRuntime
from gateway.shadow import ShadowRunner
from gateway.upstream import UpstreamClient

_ids = random.Random()  # seeded from os.urandom, per process


def new_request_id() -> str:
    """32 random hex digits, like uuid4().hex without its system call per request."""
    return f"{_ids.getrandbits(128):032x}"


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
        self.forwarder = Forwarder(
            client, request_id_header=request_id_header, max_body_bytes=max_body_bytes
        )
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
        forwarder = self.forwarder
        if self.draining:
            return forwarder.fail(
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
                    return forwarder.too_large(self.unrouted, request_id, started)
                model = body_model(body)
            route = match.select(request.headers, model)
        if route is None:
            return forwarder.fail(
                self.unrouted, NO_ROUTE, f"no route matches {request.path}", request_id, started
            )

        # 2-3. Key and split.
        variant = choose_variant(route, request, request_id)
        lane = route.champion_lane if variant is CHAMPION else route.challenger_lane
        exchange = Exchange(request, request_id, route, lane, started, body)
        # 6. Shadow: decided now, run once the client has its answer.
        runner = self.shadow_runner
        if route.shadow is not None and variant is CHAMPION and runner is not None:
            exchange.mirror = mirror.sample(route, request, request_id, runner)

        # 4-5. Forward and record.
        tracer = self.tracer
        record.begin(exchange, tracer)
        try:
            return await forwarder.forward(exchange)
        finally:
            record.end(exchange, tracer)


async def _send_continue(request: web.BaseRequest) -> None:
    if request.version >= (1, 1) and request.content_length != 0:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
