"""Active health checks: ``GET health_check.path`` on every endpoint of every backend
that configures them, off the request path.

Each endpoint is checked every ``interval_seconds``, give or take 10 % (and first at a
random point of its first interval), so that the checks of many endpoints and many
gateways spread out. A check passes on a 2xx answer within ``timeout_seconds``. What a
run of passed or failed checks does is the pool's (``BackendPool.checked``), which asks
``gateway.core.health``.

Checks use connections of their own (their own ``UpstreamClient``), never the proxy's:
a check never waits behind a request for a connection, and the proxy's connection cap
counts requests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping

from gateway.config import HealthCheckConfig
from gateway.core.health import check_delay
from gateway.upstream.client import UpstreamClient, UpstreamError
from gateway.upstream.pool import BackendPool, Endpoint

log = logging.getLogger("gateway.health")

# A health answer's body is read (so that its connection can be kept) up to this much;
# past it the connection is closed and only the status counts.
MAX_BODY_BYTES = 64 * 1024
USER_AGENT = "model-gateway-health-check"


class HealthChecker:
    """Checks the endpoints of the pools it was given (``adopt``) until closed."""

    def __init__(
        self, client: UpstreamClient | None = None, draw: Callable[[], float] = random.random
    ) -> None:
        self._client = client if client is not None else UpstreamClient()
        self._draw = draw
        # By pool (the object: a reload that changes a backend makes a new pool, whose
        # checks start afresh on the same endpoints' state).
        self._tasks: dict[int, tuple[BackendPool, asyncio.Task[None]]] = {}

    @property
    def checked_pools(self) -> list[BackendPool]:
        return [pool for pool, _ in self._tasks.values()]

    def adopt(self, pools: Mapping[str, BackendPool]) -> None:
        """Check ``pools`` (those with a ``health_check``) from now on, and no others: a
        pool kept by a reload goes on being checked where it was."""
        wanted = {id(pool): pool for pool in pools.values() if _health_check(pool) is not None}
        for key in [key for key in self._tasks if key not in wanted]:
            _, task = self._tasks.pop(key)
            task.cancel()
        for key, pool in wanted.items():
            if key not in self._tasks:
                task = asyncio.create_task(self._check_pool(pool), name=f"health:{pool.name}")
                self._tasks[key] = (pool, task)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.close()

    @contextlib.asynccontextmanager
    async def running(self, pools: Mapping[str, BackendPool]) -> AsyncIterator[HealthChecker]:
        """Checking ``pools`` while in the block (``adopt`` changes what is checked)."""
        self.adopt(pools)
        try:
            yield self
        finally:
            await self.close()

    async def _check_pool(self, pool: BackendPool) -> None:
        await asyncio.gather(*(self._watch(pool, endpoint) for endpoint in pool.endpoints))

    async def _watch(self, pool: BackendPool, endpoint: Endpoint) -> None:
        settings = _health_check(pool)
        assert settings is not None
        interval = settings.interval_seconds
        await asyncio.sleep(interval * self._draw())  # spread the first checks out
        while True:
            passed = await self.check(pool, endpoint)
            was_healthy = not endpoint.check_failing
            pool.checked(endpoint, passed)
            if was_healthy and endpoint.check_failing:
                log.warning(
                    "backend %s: %s failed %d health checks in a row: out of rotation",
                    pool.name, endpoint.base, endpoint.check_fails,
                )  # fmt: skip
            elif not was_healthy and not endpoint.check_failing:
                log.info("backend %s: %s passes its health checks again", pool.name, endpoint.base)
            await asyncio.sleep(check_delay(interval, self._draw()))

    async def check(self, pool: BackendPool, endpoint: Endpoint) -> bool:
        """One check of ``endpoint``: whether it answered 2xx in time."""
        settings = _health_check(pool)
        assert settings is not None
        limit = settings.timeout_seconds
        try:
            async with asyncio.timeout(limit):
                response = await self._client.request(
                    endpoint.origin,
                    "GET",
                    endpoint.target(settings.path),
                    [("User-Agent", USER_AGENT), ("Accept", "*/*")],
                    None,
                    connect_timeout=limit,
                    read_timeout=limit,
                )
                read = 0
                try:
                    async for chunk in response.chunks():
                        read += len(chunk)
                        if read > MAX_BODY_BYTES:
                            response.close()
                            break
                finally:
                    response.release()
        except (TimeoutError, UpstreamError, OSError):
            return False
        return 200 <= response.status < 300


def _health_check(pool: BackendPool) -> HealthCheckConfig | None:
    return pool.config.health_check if pool.config is not None else None
