"""What the canary tests share: load with distinct request IDs, and the canary's admin
API as an operator calls it (on an in-process gateway or a replica's admin URL)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gateway.app import Gateway
from tests.helpers.waiting import wait_until
from tests.support import admin_url, proxy_url


@contextlib.asynccontextmanager
async def traffic(
    http: aiohttp.ClientSession, *gateways: Gateway | str, path: str = "/m/predict"
) -> AsyncIterator[list[int]]:
    """Requests with distinct IDs (the split's key), round robin over ``gateways`` (or
    their base URLs), until the block ends; yields the statuses the clients got (0: the
    connection failed, as to a gateway killed under the load)."""
    statuses: list[int] = []
    numbers = itertools.count()
    urls = [g + path if isinstance(g, str) else proxy_url(g, path) for g in gateways]

    async def client() -> None:
        while True:
            n = next(numbers)
            url = urls[n % len(urls)]
            try:
                async with http.post(url, data=b"{}", headers={"X-Request-ID": f"t-{n}"}) as r:
                    await r.read()
                    statuses.append(r.status)
            except aiohttp.ClientError:
                statuses.append(0)
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(client()) for _ in range(4)]
    try:
        yield statuses
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _admin(gateway: Gateway | str, path: str) -> str:
    return gateway + path if isinstance(gateway, str) else admin_url(gateway, path)


async def canary(http: aiohttp.ClientSession, gateway: Gateway | str, route: str = "m") -> Any:
    async with http.get(_admin(gateway, f"/api/v1/routes/{route}/canary")) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def command(
    http: aiohttp.ClientSession, gateway: Gateway | str, verb: str, route: str = "m"
) -> tuple[int, Any]:
    async with http.post(_admin(gateway, f"/api/v1/routes/{route}/canary/{verb}")) as r:
        return r.status, await r.json()


async def reaches(
    http: aiohttp.ClientSession,
    gateway: Gateway | str,
    *states: str,
    within: float = 20,
    route: str = "m",
) -> Any:
    """The canary's view once it is in one of ``states``."""

    async def check() -> Any:
        view = await canary(http, gateway, route)
        return view if view["state"] in states else None

    return await wait_until(check, f"the canary to be {' or '.join(states)}", within=within)
