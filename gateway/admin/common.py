"""What every admin handler shares: the gateway it steers, JSON answers and errors,
the bearer-token check."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.controller import CanaryController
from gateway.metrics import Metrics
from gateway.runtime import RouteRuntime
from gateway.shadow import ShadowRunner
from gateway.steering import Steering
from gateway.tracing import TraceWriter


class AdminTarget(Protocol):
    """What the admin API steers: the running gateway."""

    @property
    def routes(self) -> Mapping[str, RouteRuntime]: ...

    @property
    def steering(self) -> Steering: ...

    @property
    def controller(self) -> CanaryController: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def ready(self) -> bool: ...

    @property
    def status(self) -> str: ...

    @property
    def tracer(self) -> TraceWriter | None: ...

    @property
    def shadow_runner(self) -> ShadowRunner | None: ...

    @property
    def config_path(self) -> Path | None: ...

    async def state_health(self) -> dict[str, Any]: ...

    async def reload(self) -> None: ...


log = logging.getLogger("gateway.admin")

TARGET = web.AppKey("target", AdminTarget)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def json_error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def settle_shadows(request: web.Request) -> None:
    """Shadow answers are compared in batches: count the waiting ones before reporting."""
    runner = request.app[TARGET].shadow_runner
    if runner is not None:
        runner.compare_pending()


def auth_middleware(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path.startswith("/api/"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 9110 11.1); the token is not.
            valid = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), expected
            )
            if not valid:
                return json_error(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    return check_token


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 pages become JSON errors like every other admin answer, and
    so does a handler's bug: logged with its traceback, answered 500 without it."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = error.reason.lower().replace(" ", "_")
        return json_error(error.status, code, f"{request.method} {request.path}: {error.reason}")
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return json_error(500, "internal_error", f"{request.method} {request.path} failed")
