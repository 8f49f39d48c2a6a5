"""What every admin handler shares: the gateway it steers, JSON answers and errors,
the bearer-token check."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import GatewayConfig
from gateway.controller import CanaryController
from gateway.core.refused import Refused
from gateway.metrics import Metrics
from gateway.references import References
from gateway.registry import Registry
from gateway.runtime import RouteRuntime
from gateway.shadow import ShadowRunner
from gateway.steering import Steering
from gateway.store import StoreError
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
    def config(self) -> GatewayConfig: ...

    @property
    def registry(self) -> Registry | None: ...

    @property
    def references(self) -> References: ...

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


def refused(error: Refused) -> web.Response:
    return json_error(error.status, error.code, str(error))


def store_unavailable(error: StoreError) -> web.Response:
    # What lives in the store (canaries, the registry): without it there is nothing true
    # to show, and a change could not be shared with the other replicas.
    return json_error(503, "state_store_unavailable", f"the state store is unavailable: {error}")


def settle_shadows(request: web.Request) -> None:
    """Shadow answers are compared in batches: count the waiting ones before reporting."""
    runner = request.app[TARGET].shadow_runner
    if runner is not None:
        runner.compare_pending()


def auth_middleware(token: str, *, metrics_auth: bool = False) -> Middleware:
    """With a token, every ``/api/`` call (and ``/metrics`` with ``metrics_auth``) needs
    it as a bearer token. Without one, the listener is on loopback (the config says so)
    and only a request naming a loopback host is answered: a web page the operator
    visits could otherwise make their browser call it under a name of its own that
    resolves to 127.0.0.1 (DNS rebinding)."""
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not token:
            host = request.headers.get("Host")
            if host is not None and not loopback_host(host):
                return json_error(
                    403, "forbidden_host",
                    "without admin.token, the admin API answers only requests to a loopback "
                    "host (localhost, 127.0.0.1, [::1])",
                )  # fmt: skip
        elif request.path.startswith("/api/") or (metrics_auth and request.path == "/metrics"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 9110 11.1); the token is not.
            valid = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), expected
            )
            if not valid:
                return json_error(401, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    return check_token


def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback (with or without a port)."""
    name = host.strip()
    if name.startswith("["):  # [::1]:9090
        name = name[1 : name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
