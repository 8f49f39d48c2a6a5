"""The admin API, a module per resource."""

from __future__ import annotations

from aiohttp import web

from gateway.admin import canary, health, models, reload, routes, status, traces
from gateway.admin.common import TARGET, AdminTarget, auth_middleware, json_errors

__all__ = ["AdminTarget", "build_admin_app"]


def build_admin_app(
    target: AdminTarget, token: str, *, metrics_auth: bool = False
) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, auth_middleware(token, metrics_auth=metrics_auth)]
    )
    app[TARGET] = target
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/api/v1/routes", routes.list_routes)
    app.router.add_get("/api/v1/routes/{name}", routes.get_route)
    app.router.add_get("/api/v1/routes/{name}/shadow", routes.get_shadow)
    app.router.add_put("/api/v1/routes/{name}/weight", routes.put_weight)
    app.router.add_get("/api/v1/routes/{name}/canary", canary.get_canary)
    app.router.add_post("/api/v1/routes/{name}/canary/{command}", canary.post_command)
    app.router.add_get("/api/v1/traces", traces.list_traces)
    app.router.add_get("/api/v1/traces/{model}", traces.get_traces)
    app.router.add_post("/api/v1/reload", reload.reload)
    models.add_routes(app.router)  # /api/v1/models...
    status.add_routes(app.router)  # the status page: /, /static/status.{js,css}
    return app
