"""The admin API (DESIGN section 3): health, metrics, route views and runtime steering."""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import ConfigError
from gateway.metrics import Metrics
from gateway.runtime import RouteRuntime
from gateway.shadow import ShadowRunner
from gateway.tracing import TraceWriter


class AdminTarget(Protocol):
    """What the admin API steers: the running gateway."""

    @property
    def routes(self) -> Mapping[str, RouteRuntime]: ...

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

    async def set_weight(self, route: RouteRuntime, weight: float) -> bool: ...

    async def state_health(self) -> dict[str, Any]: ...

    async def reload(self) -> None: ...


TARGET = web.AppKey("target", AdminTarget)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def json_error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def route_view(route: RouteRuntime) -> dict[str, Any]:
    config = route.config
    match = config.match
    return {
        "name": route.name,
        "match": match.model_dump(exclude_none=True),
        "champion": config.champion,
        "challenger": config.challenger,
        "challenger_weight": route.weight,
        "split": {
            "key": config.split.key,
            "salt": config.split.salt,
            "allow_override": config.split.allow_override,
            "challenger_buckets": route.threshold,
        },
        "shadow": _shadow_summary(route),
        "canary": {"state": "idle", "config": config.canary.model_dump()}
        if config.canary
        else None,
    }


def _shadow_summary(route: RouteRuntime) -> dict[str, Any] | None:
    policy = route.shadow
    if policy is None:
        return None
    tally = policy.stats.tally
    return {
        "target": policy.target.name,
        "sample_rate": policy.config.sample_rate,
        "sampling": policy.config.sampling,
        "in_flight": policy.in_flight,
        "outcomes": {o.value: n for o, n in tally.counts.items()},
        "agreement_rate": tally.agreement_rate,
    }


def shadow_report(route: RouteRuntime) -> dict[str, Any]:
    policy = route.shadow
    assert policy is not None
    report: dict[str, Any] = dataclasses.asdict(policy.stats.snapshot())
    return {**(_shadow_summary(route) or {}), **report}


def _auth_middleware(token: str) -> Middleware:
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
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 pages become JSON errors like every other admin answer."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = error.reason.lower().replace(" ", "_")
        return json_error(error.status, code, f"{request.method} {request.path}: {error.reason}")


def _settle_shadows(request: web.Request) -> None:
    """Shadow answers are compared in batches: count the waiting ones before reporting."""
    runner = request.app[TARGET].shadow_runner
    if runner is not None:
        runner.compare_pending()


def _route_or_404(request: web.Request) -> RouteRuntime | web.Response:
    name = request.match_info["name"]
    route = request.app[TARGET].routes.get(name)
    if route is None:
        return json_error(404, "unknown_route", f"no route named {name!r}")
    return route


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    return json_response({"status": target.status}, 200 if target.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    _settle_shadows(request)
    body = request.app[TARGET].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def list_routes(request: web.Request) -> web.Response:
    _settle_shadows(request)
    target = request.app[TARGET]
    return json_response(
        {
            "routes": [route_view(r) for r in target.routes.values()],
            "state": await target.state_health(),
        }
    )


async def get_route(request: web.Request) -> web.Response:
    _settle_shadows(request)
    found = _route_or_404(request)
    if isinstance(found, web.Response):
        return found
    return json_response({**route_view(found), "state": await request.app[TARGET].state_health()})


async def list_traces(request: web.Request) -> web.Response:
    tracer = request.app[TARGET].tracer
    if tracer is None:
        return json_error(404, "tracing_disabled", "tracing is not enabled")
    return json_response(
        {
            "models": [
                {"model": m, "pending": tracer.pending(m), "windows": len(tracer.recent(m))}
                for m in tracer.models()
            ]
        }
    )


async def get_traces(request: web.Request) -> web.Response:
    """The last closed windows of a model, as written (or to be written) to Redis."""
    tracer = request.app[TARGET].tracer
    if tracer is None:
        return json_error(404, "tracing_disabled", "tracing is not enabled")
    model = request.match_info["model"]
    if model not in tracer.models():
        return json_error(404, "unknown_model", f"no traffic traced for model {model!r}")
    return json_response(
        {
            "model": model,
            "pending": tracer.pending(model),
            "current": tracer.current(model),
            "windows": tracer.recent(model),
        }
    )


async def get_shadow(request: web.Request) -> web.Response:
    _settle_shadows(request)
    found = _route_or_404(request)
    if isinstance(found, web.Response):
        return found
    if found.shadow is None:
        return json_error(404, "no_shadow", f"route {found.name!r} has no shadow configured")
    return json_response(shadow_report(found))


async def put_weight(request: web.Request) -> web.Response:
    found = _route_or_404(request)
    if isinstance(found, web.Response):
        return found
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as error:
        return json_error(400, "bad_json", f"body is not valid JSON: {error}")
    if not isinstance(body, dict) or "challenger_weight" not in body:
        return json_error(400, "bad_request", 'body must be {"challenger_weight": <0..1>}')
    unknown = sorted(set(body) - {"challenger_weight"})
    if unknown:
        return json_error(400, "bad_request", f"unknown keys: {', '.join(unknown)}")
    weight = body["challenger_weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return json_error(400, "bad_weight", f"challenger_weight must be a number, got {weight!r}")
    if not 0.0 <= weight <= 1.0:
        return json_error(
            400, "bad_weight", f"challenger_weight must be between 0 and 1, got {weight}"
        )
    if found.challenger is None and weight > 0:
        return json_error(409, "no_challenger", f"route {found.name!r} has no challenger")
    persisted = await request.app[TARGET].set_weight(found, float(weight))
    # Applied either way: a rollback must work even while the store is down.
    return json_response({**route_view(found), "persisted": persisted})


async def reload(request: web.Request) -> web.Response:
    try:
        await request.app[TARGET].reload()
    except ConfigError as error:
        return json_response(
            {"error": {"code": "bad_config", "message": str(error), "problems": error.problems}},
            400,
        )
    return json_response({"status": "reloaded"})


def build_admin_app(target: AdminTarget, token: str) -> web.Application:
    app = web.Application(middlewares=[_json_errors, _auth_middleware(token)])
    app[TARGET] = target
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/routes", list_routes)
    app.router.add_get("/api/v1/routes/{name}", get_route)
    app.router.add_get("/api/v1/routes/{name}/shadow", get_shadow)
    app.router.add_put("/api/v1/routes/{name}/weight", put_weight)
    app.router.add_get("/api/v1/traces", list_traces)
    app.router.add_get("/api/v1/traces/{model}", get_traces)
    app.router.add_post("/api/v1/reload", reload)
    return app
