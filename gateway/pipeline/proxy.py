"""The one request pipeline, one step per module:

    route.py    1. Route     the route a request belongs to (its path, headers, body model)
    split.py    2-3. Key and Split   the sticky key and the variant it falls on
    forward.py  4. Forward   to an endpoint of the variant's backend, the answer streamed back
    record.py   5. Record    in-flight, status and latency, the load trace
    mirror.py   6. Shadow    a sampled copy to the shadow target, once the client is answered

``Proxy.handle`` runs them in that order, on the request target's normalised path
(``target.py``: anything but an origin-form target is refused with 400 first). It runs
on aiohttp's low-level ``web.Server`` (no router, no middleware; ``gateway.edge`` bounds
what a client may send and how slowly): the route table is our own, and everything per
route was prepared at config load (``gateway.runtime``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.core.split import CHAMPION
from gateway.metrics import RouteMetrics
from gateway.pipeline import mirror, record
from gateway.pipeline.body import BufferBudget, HeldBody, read_body, read_model, read_rest
from gateway.pipeline.errors import (
    BAD_REQUEST,
    DRAINING,
    NO_ROUTE,
    BodyTimeout,
    BodyTooLarge,
    Overloaded,
)
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.forward import Forwarder
from gateway.pipeline.record import LoadTracer
from gateway.pipeline.route import Router
from gateway.pipeline.split import choose_variant
from gateway.pipeline.target import Target, Targets
from gateway.runtime import RouteRuntime
from gateway.shadow import ShadowRunner
from gateway.upstream import UpstreamClient

_ids = random.Random()  # seeded from os.urandom, per process

# What the proxy relays, for OPTIONS * (a question about the server, not a resource).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_BODY_ERRORS = (BodyTooLarge, BodyTimeout, Overloaded, RequestPayloadError)


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
        max_buffered_bytes: int | None = None,
        body_timeout_seconds: float = 60.0,
        reject: Callable[[str, str], None] | None = None,
        new_request_id: Callable[[], str] = new_request_id,
        shadow_runner: ShadowRunner | None = None,
        tracer: LoadTracer | None = None,
    ) -> None:
        self.router = router
        self.budget = BufferBudget(
            max_buffered_bytes if max_buffered_bytes is not None else 16 * max_body_bytes
        )
        self.forwarder = Forwarder(
            client,
            request_id_header=request_id_header,
            max_body_bytes=max_body_bytes,
            budget=self.budget,
            body_timeout_seconds=body_timeout_seconds,
            reject=reject,
        )
        self.targets = Targets()
        self._targets = self.targets.known  # read directly per request: one dict lookup
        self.unrouted = unrouted_metrics
        self.request_id_header = request_id_header
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
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
        raw = request.raw_path
        target = self._targets.get(raw)
        if target is None:
            target = self.targets.get(raw)
        if target.problem is not None or request.method == "CONNECT":
            return self._off_target(request, target, request_id, started)
        if request.body_exists and request.headers.get("Expect", "").lower() == "100-continue":
            # The body is streamed upstream as it comes, so the client may send it now;
            # without this, curl waits a second before every large upload.
            await _send_continue(request)

        # 1. Route. The body is read only when a candidate route matches on its model.
        match = self.router.match(target.path)
        held: HeldBody | None = None
        route = match.only
        if route is None:
            model: str | None = None
            if match.needs_body:
                try:
                    held, model = await read_model(
                        request, self.max_body_bytes, self.budget, self.body_timeout_seconds
                    )
                except _BODY_ERRORS as error:
                    return forwarder.refuse(self.unrouted, error, request_id, started, request)
            route = match.select(request.headers, model)
            if route is None:
                if held is not None:
                    held.release()
                return forwarder.fail(
                    self.unrouted, NO_ROUTE, f"no route matches {target.path}", request_id,
                    started,
                )  # fmt: skip
        try:
            # 2-3. Key and split.
            variant = choose_variant(route, request, request_id)
            lane = route.champion_lane if variant is CHAMPION else route.challenger_lane
            if lane.rewrite is not None and lane.rewrite.model_name is not None:
                try:
                    held = await self._whole_body(request, held)
                except _BODY_ERRORS as error:
                    return forwarder.refuse(lane.metrics, error, request_id, started, request)
            if held is None:  # the usual request
                exchange = Exchange(request, request_id, route, lane, started)
            else:
                exchange = Exchange(
                    request, request_id, route, lane, started,
                    held.data if held.complete else None,
                )  # fmt: skip
                exchange.held = held
            exchange.target = target
            rewrite = lane.rewrite
            exchange.path = target.upstream if rewrite is None else rewrite.target(target)
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
        finally:
            if held is not None:
                held.release()

    async def _whole_body(self, request: web.BaseRequest, held: HeldBody | None) -> HeldBody:
        """The whole body in memory, for a backend whose model name replaces the body's."""
        if held is None:
            return await read_body(
                request, self.max_body_bytes, self.budget, self.body_timeout_seconds
            )
        if held.complete:
            return held
        return await read_rest(request, held, self.max_body_bytes, self.body_timeout_seconds)

    def _off_target(
        self, request: web.BaseRequest, target: Target, request_id: str, started: float
    ) -> web.StreamResponse:
        """A request that is not for a resource here: ``OPTIONS *`` (answered), CONNECT,
        or a target that is not a path this gateway routes (400)."""
        if request.method == "OPTIONS" and request.raw_path == "*":
            record.count(self.unrouted, 200, started)
            return web.Response(
                status=200, headers={"Allow": ALLOWED_METHODS, self.request_id_header: request_id}
            )
        if request.method == "CONNECT":
            problem = "CONNECT is not served: this gateway is a reverse proxy"
        else:
            problem = target.problem or "bad request target"
        self.forwarder.reject("bad_request", f"request {request_id}: {problem}")
        response = self.forwarder.fail(self.unrouted, BAD_REQUEST, problem, request_id, started)
        response.force_close()  # whatever follows on this connection is not HTTP we know
        return response


async def _send_continue(request: web.BaseRequest) -> None:
    if request.version >= (1, 1) and request.content_length != 0:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
