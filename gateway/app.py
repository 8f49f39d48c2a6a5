"""Builds a running gateway from its config: start, reload, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from gateway.admin import build_admin_app
from gateway.config import GatewayConfig, load
from gateway.core.usage import usage_of_answer
from gateway.h1 import UpstreamClient
from gateway.metrics import Metrics, multiprocess_dir, sync_periodically
from gateway.proxy import Proxy
from gateway.routing import RouteMatcher, Router
from gateway.runtime import RouteRuntime, build_route
from gateway.shadow import ShadowRunner
from gateway.store import StateStore, StoreError, open_store
from gateway.store.redis import default_client as default_redis_client
from gateway.tracing import TraceWriter
from gateway.upstream import BackendPool, build_pools
from gateway.weights import WeightSync
from gateway.writes import BatchedServer, WriteBatch

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
        self._upstream: UpstreamClient | None = None  # the proxy's own calls
        self.shadow_runner: ShadowRunner | None = None
        self.store: StateStore | None = None
        self.weights: WeightSync | None = None
        self.tracer: TraceWriter | None = None
        self._trace_redis: aioredis.Redis | None = None
        self._proxy: Proxy | None = None
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._metrics_sync: asyncio.Task[None] | None = None
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

    async def set_weight(self, route: RouteRuntime, weight: float) -> bool:
        """Apply at once, then persist; returns whether the store took it."""
        route.set_weight(weight)
        log.info("route %s: challenger weight set to %g", route.name, weight)
        return await self.weights.save(route) if self.weights is not None else False

    async def state_health(self) -> dict[str, Any]:
        if self.store is None:
            return {"backend": self.config.state.backend, "status": "stopped", "detail": ""}
        return (await self.store.health()).as_dict()

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
        for section in ("server", "admin", "state", "tracing"):
            if getattr(new_config, section) != getattr(old_config, section):
                log.warning("reload: changes to %r take effect after a restart", section)
        self.routes = routes
        self.config = new_config
        if self._proxy is not None:
            self._proxy.router = build_router(routes)
        log.info("reloaded %s: %d routes", self.config_path, len(routes))

    # --- lifecycle ----------------------------------------------------------------------

    async def _start_state(self) -> None:
        state = self.config.state
        self.store = open_store(
            state.backend, state.path, state.redis_url, f"{state.key_prefix}:state:"
        )
        self.weights = WeightSync(self.store, lambda: self.routes)
        try:
            await self.weights.restore()
        except StoreError as error:
            # Serving with the file's weights beats not serving: the watcher retries.
            log.warning("state store unavailable at start, using configured weights: %s", error)
        self.weights.start()

    def _start_tracing(self) -> None:
        tracing = self.config.tracing
        if not tracing.enabled:
            return
        url = tracing.redis_url or (
            self.config.state.redis_url if self.config.state.backend == "redis" else None
        )
        self._trace_redis = default_redis_client(url) if url else None
        writes = {o: self.metrics.trace_writes.labels(o) for o in ("ok", "error", "dropped")}
        self.tracer = TraceWriter(
            self._trace_redis,
            key_prefix=tracing.key_prefix,
            interval_seconds=tracing.interval_seconds,
            ttl_seconds=tracing.ttl_seconds,
            on_write=lambda outcome: writes[outcome].inc(),
        )
        self.tracer.start()

    def _shadow_load(self, pool: BackendPool) -> Callable[[bytes | None], None]:
        """Shadow calls are load on their target: count them into its traces."""
        tracer = self.tracer
        if tracer is None:
            return _ignore
        handle = tracer.add(pool.model)

        def done(body: bytes | None) -> None:
            if body is None:
                tracer.discard(handle)
                return
            prompt_tokens, completion_tokens = usage_of_answer(body)
            tracer.done(handle, prompt_tokens, completion_tokens)

        return done

    async def start(self) -> None:
        server_cfg = self.config.server
        await self._start_state()
        self._start_tracing()
        # One batch for both sides: a pass's answers and backend requests go out together.
        writes = WriteBatch()
        self._upstream = UpstreamClient(writes=writes)
        self.shadow_runner = ShadowRunner(self._upstream, on_load=self._shadow_load)
        self._proxy = Proxy(
            build_router(self.routes),
            self._upstream,
            self.metrics.unrouted(),
            request_id_header=server_cfg.request_id_header,
            max_body_bytes=server_cfg.max_body_bytes,
            shadow_runner=self.shadow_runner,
            tracer=self.tracer,
        )
        server = BatchedServer(
            self._proxy.handle, writes=writes, access_log=None, handler_cancellation=False
        )
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
        if multiprocess_dir() is not None:
            self._metrics_sync = asyncio.create_task(
                sync_periodically(self.metrics), name="metrics-sync"
            )
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
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None
        if self.weights is not None:
            await self.weights.stop()
        if self.tracer is not None:
            # Writes the open window too, so a restart loses no counts.
            await self.tracer.stop(flush_open=True)
        if self._trace_redis is not None:
            await self._trace_redis.aclose()
            self._trace_redis = None
        if self.store is not None:
            await self.store.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._metrics_sync is not None:
            self._metrics_sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_sync
            self._metrics_sync = None
        # The last requests' counts: under --workers they outlive this process in its
        # metric files.
        self.metrics.sync()
        self._status = "stopped"

    async def serve_until_signalled(self, *, supervisor: int | None = None) -> None:
        """Run until SIGTERM or SIGINT, then drain and stop.

        ``supervisor`` is for ``--workers``: the PID of the process that started this
        worker. Should it die (even by SIGKILL, which it cannot pass on), the worker
        drains and stops too, instead of serving on with nobody left to stop or
        restart it."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        tune_gc()
        watchdog = (
            asyncio.create_task(_wait_until_orphaned(supervisor), name="orphan-watch")
            if supervisor is not None
            else None
        )
        if watchdog is not None:
            watchdog.add_done_callback(lambda _: stop.set())
        try:
            await stop.wait()
            reason = "supervisor gone" if watchdog is not None and watchdog.done() else "signal"
            log.info("%s: draining (up to %gs)", reason, self.config.server.drain_timeout_seconds)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()


async def _wait_until_orphaned(parent: int, interval: float = 0.5) -> None:
    """Return once this process's parent is no longer ``parent`` (it died and the
    process was handed to init or a subreaper), at once if that happened already."""
    # Polling: nothing signals a parent's death to a child that did not ask the kernel
    # for it (prctl), and a worker must not depend on how it was started.
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(interval)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    Everything built at start (config, routes, modules) is moved out of the collector's
    view, and the youngest generation is collected after 50,000 allocations rather than
    700. Under load CPython's default spent ~15 % of the gateway's CPU in the collector
    and caused most p99 spikes; reference counting frees almost everything a request
    allocates anyway, so the cycle collector has little to find."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _ignore(_: bytes | None) -> None:
    return None


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("listener has no TCP address")
