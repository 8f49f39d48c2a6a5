"""Builds a running gateway from its config: start, reload, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.admin import build_admin_app
from gateway.config import GatewayConfig, load
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.routing import RouteMatcher, Router
from gateway.runtime import RouteRuntime, build_route
from gateway.shadow import ShadowRunner
from gateway.upstream import build_pools, new_session

log = logging.getLogger("gateway")


def build_routes(config: GatewayConfig, metrics: Metrics) -> dict[str, RouteRuntime]:
    pools = build_pools(config.backends)
    return {route.name: build_route(route, pools, metrics) for route in config.routes}


def build_router(routes: Mapping[str, RouteRuntime]) -> Router[RouteRuntime]:
    matchers = []
    for route in routes.values():
        match = route.config.match
        matchers.append(
            RouteMatcher(
                path_prefix=match.path_prefix,
                target=route,
                model=match.model,
                header_name=match.header.name if match.header else None,
                header_value=match.header.value if match.header else None,
            )
        )
    return Router(matchers)


class Gateway:
    """One gateway process: the proxy listener and the admin listener."""

    def __init__(
        self,
        config: GatewayConfig,
        config_path: str | Path | None = None,
        *,
        metrics: Metrics | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.metrics = metrics if metrics is not None else Metrics()
        self.reuse_port = reuse_port
        self.routes: dict[str, RouteRuntime] = build_routes(config, self.metrics)
        self._session: aiohttp.ClientSession | None = None
        self.shadow_runner: ShadowRunner | None = None
        self._proxy: Proxy | None = None
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._status = "starting"
        self.proxy_port = 0
        self.admin_port = 0

    # --- AdminTarget ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._status == "ready"

    @property
    def status(self) -> str:
        return self._status

    async def set_weight(self, route: RouteRuntime, weight: float) -> None:
        route.set_weight(weight)
        log.info("route %s: challenger weight set to %g", route.name, weight)

    async def reload(self) -> None:
        """Re-read the config file. A bad file raises ConfigError and changes nothing."""
        if self.config_path is None:
            raise RuntimeError("this gateway was not started from a file")
        new_config = load(self.config_path)
        old_config = self.config
        routes = build_routes(new_config, self.metrics)
        # A weight set at runtime outlives a reload unless the file changed that weight.
        old_by_name = {r.name: r for r in old_config.routes}
        for name, route in routes.items():
            old = old_by_name.get(name)
            previous = self.routes.get(name)
            unchanged = (
                old is not None
                and old.split.challenger_weight == route.config.split.challenger_weight
            )
            if previous is not None and unchanged and route.challenger is not None:
                route.set_weight(previous.weight)
        for name in set(self.routes) - set(routes):
            self.metrics.challenger_weight.remove(name)
        if new_config.server != old_config.server or new_config.admin != old_config.admin:
            log.warning("reload: changes to 'server' and 'admin' take effect after a restart")
        self.routes = routes
        self.config = new_config
        if self._proxy is not None:
            self._proxy.router = build_router(routes)
        log.info("reloaded %s: %d routes", self.config_path, len(routes))

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        server_cfg = self.config.server
        self._session = new_session()
        self.shadow_runner = ShadowRunner(self._session)
        self._proxy = Proxy(
            build_router(self.routes),
            self._session,
            self.metrics.unrouted(),
            request_id_header=server_cfg.request_id_header,
            max_body_bytes=server_cfg.max_body_bytes,
            shadow_runner=self.shadow_runner,
        )
        server = web.Server(self._proxy.handle, access_log=None, handler_cancellation=False)
        self._proxy_runner = web.ServerRunner(
            server, shutdown_timeout=server_cfg.drain_timeout_seconds
        )
        await self._proxy_runner.setup()
        proxy_site = web.TCPSite(
            self._proxy_runner,
            server_cfg.host,
            server_cfg.port,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        await proxy_site.start()
        self.proxy_port = _bound_port(self._proxy_runner)

        admin_cfg = self.config.admin
        self._admin_runner = web.AppRunner(
            build_admin_app(self, admin_cfg.token), access_log=None, shutdown_timeout=5.0
        )
        await self._admin_runner.setup()
        admin_site = web.TCPSite(
            self._admin_runner, admin_cfg.host, admin_cfg.port, reuse_port=self.reuse_port or None
        )
        await admin_site.start()
        self.admin_port = _bound_port(self._admin_runner)
        self._status = "ready"
        log.info(
            "gateway listening on %s:%d (admin %s:%d), %d routes",
            server_cfg.host, self.proxy_port, admin_cfg.host, self.admin_port, len(self.routes),
        )  # fmt: skip

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain timeout), close."""
        self._status = "draining"
        if self._proxy is not None:
            self._proxy.draining = True
        if self._proxy_runner is not None:
            # aiohttp closes the listener and idle keep-alive connections first, then
            # waits up to shutdown_timeout for running handlers.
            await self._proxy_runner.cleanup()
            self._proxy_runner = None
        if self.shadow_runner is not None:
            await self.shadow_runner.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        self._status = "stopped"

    async def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
            log.info(
                "signal received: draining (up to %gs)", self.config.server.drain_timeout_seconds
            )
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("listener has no TCP address")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for the demo and tests)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
